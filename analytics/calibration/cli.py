"""``civicmesh calibration drift --day YYYY-MM-DD [--json]``: the day's drift alarms."""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from analytics.accounting.load import parse_day
from analytics.calibration.drift import (
    HOUR_MS,
    METRICS,
    DriftAlarm,
    DriftRule,
    analyse,
    correction_for,
    detect_drift,
)
from analytics.calibration.load import load_network
from analytics.settings import AnalyticsSettings
from analytics.store import open_existing_store
from civicmesh.config import load_settings
from civicmesh.errors import CivicmeshError
from civicmesh.registry import Registry

DAY_MS = 24 * HOUR_MS


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``calibration`` command group."""
    calibration = sub.add_parser(
        "calibration", help="network calibration: drift against neighbours (docs/calibration.md)"
    )
    actions = calibration.add_subparsers(
        dest="calibration_command", metavar="ACTION", required=True
    )
    drift = actions.add_parser(
        "drift",
        help="drift alarms of the day: every device against its neighbours and references",
    )
    drift.add_argument("--day", required=True, help="UTC day, YYYY-MM-DD")
    drift.add_argument("--json", action="store_true", help="print the alarms as JSON")
    drift.add_argument(
        "--metric",
        action="append",
        choices=METRICS,
        help=f"metric to check (repeatable; default: {', '.join(METRICS)})",
    )
    drift.add_argument(
        "--radius-km",
        type=float,
        default=DriftRule().radius_km,
        help="neighbours: devices within this distance (default %(default)s)",
    )
    drift.add_argument("--config", type=Path, help="TOML settings file (optional)")
    drift.add_argument("--database-url", help="store URL (overrides database_url)")
    drift.add_argument("--registry", type=Path, help="registry JSON (overrides registry_file)")
    drift.set_defaults(func=_drift)


def drift_report(
    store: Any, registry: Registry | None, day: str, metrics: tuple[str, ...], rule: DriftRule
) -> dict[str, Any]:
    """The alarms active on ``day`` with their evidence and correction estimate, from the
    day and the days before it (the baseline), as a pure function of the stored data."""
    day_start = parse_day(day)
    lookback = -(-(rule.baseline_h + rule.gap_h + rule.smooth_h) // 24) * DAY_MS
    out: dict[str, Any] = {"day": day, "rule": _rule_dict(rule), "metrics": {}, "alarms": []}
    for metric in metrics:
        network = load_network(store, metric, day_start - lookback, day_start + DAY_MS, registry)
        det = analyse(network, rule)
        alarms = [a for a in detect_drift(network, rule) if a.end_ms > day_start]
        out["metrics"][metric] = {
            "devices": len(network.devices),
            "with_neighbours": sum(1 for n in det.neighbours if n.size),
            "references": sum(1 for d in network.devices if d.reference),
        }
        for alarm in alarms:
            entry = alarm.to_dict()
            entry["correction"] = correction_for(network, alarm, rule, det).to_dict()
            out["alarms"].append(entry)
    return out


def _rule_dict(rule: DriftRule) -> dict[str, Any]:
    return {name: getattr(rule, name) for name in rule.__slots__}


def _drift(args: argparse.Namespace) -> int:
    name = "civicmesh calibration drift"
    overrides: dict[str, Any] = {}
    if args.database_url:
        overrides["database_url"] = args.database_url
    if args.registry:
        if not args.registry.exists():
            print(f"{name}: no registry file {args.registry}", file=sys.stderr)
            return 2
        overrides["registry_file"] = args.registry
    try:
        parse_day(args.day)
        if not (math.isfinite(args.radius_km) and args.radius_km > 0):
            raise ValueError(f"--radius-km must be a positive distance, got {args.radius_km}")
        rule = DriftRule(radius_km=args.radius_km)
        settings = load_settings(AnalyticsSettings, args.config, overrides)
        registry = (
            Registry.load(settings.registry_file) if settings.registry_file.exists() else None
        )
        store = open_existing_store(settings.database_url)
    except (ValueError, CivicmeshError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    try:
        report = drift_report(store, registry, args.day, tuple(args.metric or METRICS), rule)
    except CivicmeshError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def render_text(report: dict[str, Any]) -> str:
    lines = [f"Drift {report['day']} (neighbours within {report['rule']['radius_km']:g} km)"]
    empty = [m for m, info in report["metrics"].items() if not info["devices"]]
    for metric, info in report["metrics"].items():
        if not info["devices"]:
            continue
        refs = info["references"]
        ref_text = (
            f", {refs} reference{'s' if refs != 1 else ''}"
            if refs
            else ", no references (neighbours only)"
        )
        lines.append(
            f"  {metric}: {info['devices']} devices, {info['with_neighbours']} with "
            f"neighbours{ref_text}"
        )
    if empty:
        lines.append(f"  no hourly data for {', '.join(empty)}")
    if not report["alarms"]:
        lines.append("No drift alarms.")
    day_end = parse_day(report["day"]) + DAY_MS
    for a in report["alarms"]:
        near = ", ".join(
            f"{n['device_id']} ({n['distance_km']:.1f} km{', reference' if n['reference'] else ''}"
            f", x{n['ratio_during_alarm']:.2f})"
            for n in a["neighbours"][:6]
        )
        more = f" and {len(a['neighbours']) - 6} more" if len(a["neighbours"]) > 6 else ""
        corr = a["correction"]
        until = (
            "still on at the day's end" if a["end_ms"] >= day_end else f"to {_when(a['end_ms'])}"
        )
        lines.append(
            f"{a['device_id']} {a['metric']} drifting {a['direction']} since "
            f"{_when(a['since_ms'])} (alarm from {_when(a['start_ms'])}, {until}): "
            f"x{a['departure_factor']:.2f} ({report['rule']['smooth_h']}-h median) against "
            f"its usual ratio {a['baseline_ratio']:.2f} to its neighbours, "
            f"tolerance x{a['tolerance_factor']:.2f}"
        )
        lines.append(f"    neighbours (its reading over theirs in the alarm): {near}{more}")
        lines.append(
            f"    correction estimate: subtract {corr['offset']} or multiply by {corr['factor']}"
        )
    return "\n".join(lines)


__all__ = ["DriftAlarm", "drift_report", "register", "render_text"]
