"""Run the benchmarks and print one table: ``python -m bench [--quick] [--only NAME]``.

Every figure is a ratio against a baseline measured in the same run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small data, for a smoke run")
    parser.add_argument(
        "--only",
        choices=["ingest", "queries", "dashboard", "edge", "audit"],
        help="run one benchmark",
    )
    parser.add_argument("--workers", type=int, default=2, help="ingest workers (K)")
    parser.add_argument(
        "--backend",
        choices=["postgresql", "timescaledb"],
        default="postgresql",
        help="ingest: the store path to measure (timescaledb: on the TimescaleDB test server)",
    )
    parser.add_argument(
        "--compare-backends",
        action="store_true",
        help="ingest: both paths in one run, on the same (TimescaleDB) server",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument(
        "--models", help="edge: a `civicmesh models train` folder (default: train one now)"
    )
    args = parser.parse_args(argv)
    rows: list[tuple[str, str, str]] = []
    figures: dict[str, object] = {}
    result: dict[str, Any]  # each benchmark's own figures
    if args.only in (None, "ingest"):
        import bench.ingest as ingest

        devices, batches = (20, 10) if args.quick else (200, 25)
        backends = ingest.BACKENDS if args.compare_backends else (args.backend,)
        result = ingest.run(
            devices, batches, 60, args.workers, backends, week_devices=5 if args.quick else 20
        )
        figures["ingest"] = result
        rows += ingest.rows(result)
    if args.only in (None, "queries"):
        import bench.queries as queries

        days, devices = (3, 20) if args.quick else (30, 200)
        result = queries.run(days, devices)
        figures["queries"] = result
        for name, stats in result["queries"].items():
            rows.append(
                (f"{name}: p50 / p95 ms", f"{stats['p50']:.1f} / {stats['p95']:.1f}",
                 f"raw readings: {stats['raw_p50']:.0f} / {stats['raw_p95']:.0f} ms "
                 f"({stats['raw_p50'] / max(stats['p50'], 1e-6):.0f}x)")
            )  # fmt: skip
        rows.append(("query data set", f"{result['rows']:,} readings", result["shape"]))
    if args.only in (None, "dashboard"):
        import bench.dashboard as dashboard

        result = dashboard.run(devices=20, days=2 if args.quick else 7)
        figures["dashboard"] = result
        rows += [
            ("dashboard overview: first paint, ms", f"{result['first_paint_ms_median']:.0f}",
             f"median of {result['loads']} signed-in loads in Chromium; "
             f"{result['readings']:,} readings (the demo's backfill); target <= 1000"),
            ("dashboard overview: map drawn, ms", f"{result['overview_ready_ms_median']:.0f}",
             f"baseline (a static file, same browser): {result['baseline_ms_median']:.0f} ms"),
        ]  # fmt: skip
    if args.only in (None, "edge"):
        from pathlib import Path

        import bench.edge_models as edge_models

        result = edge_models.run(Path(args.models) if args.models else None, quick=args.quick)
        figures["edge"] = result
        for name, m in result["models"].items():
            rows.append(
                (f"edge model {name}: inference per window, µs",
                 f"{m['inference_us_median']:.1f}",
                 f"{m['rows_per_window']} row(s), one thread, {m['variant']}, {m['bytes']:,} B; "
                 f"{m['vs_windowing']:.2f}x the window's own windowing "
                 f"({result['windowing_us']:.1f} µs); target <= 1000 µs, <= 1 MB")
            )  # fmt: skip
        rss = result["rss"]
        rows += [
            ("edge runtime per window (PM device), µs", f"{result['runtime_per_window_us']:.0f}",
             f"4 streams of features ({result['stream_features_us_per_metric']:.0f} µs each, "
             "Python) + fault model + PM2.5 calibration"),
            ("edge agent peak RSS with models, MB", f"{rss['with_models']['peak_rss_mb']:.0f}",
             f"models {rss['with_models']['models']}; without models "
             f"{rss['without_models']['peak_rss_mb']:.0f} MB "
             f"({rss['with_models']['peak_rss_mb'] / rss['without_models']['peak_rss_mb']:.2f}x); "
             "target <= 100"),
            ("edge agent peak RSS, PM device, MB", f"{rss['pm_device']['peak_rss_mb']:.0f}",
             f"models {rss['pm_device']['models']}"),
            ("edge agent peak RSS, gas device, MB", f"{rss['gas_device']['peak_rss_mb']:.0f}",
             f"models {rss['gas_device']['models']}"),
        ]  # fmt: skip
    if args.only in (None, "audit"):
        import bench.audit as audit

        result = audit.run(quick=args.quick)
        figures["audit"] = result
        rows += audit.rows(result)
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print()
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>{value_width}}  {note}")
    if args.json:
        print(json.dumps(figures, default=str, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
