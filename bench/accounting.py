"""Contributor accounting: scoring a city-day (issue 22 target: 200 devices at 1-minute
readings in <= 30 s on 2 cores).

``python -m bench.accounting [--devices 200] [--store] [--json]``

The city comes from ``firmware_sim`` (its device kinds and positions, one day of 1-minute
readings, a few faults and one copied stream so that every check has work). Figures:

- ``score_s``: :func:`analytics.accounting.score_day` over the in-memory day (every
  check, the duplicate-stream search and the cell caps);
- baseline, measured in the same run: one vectorised pass that only computes each
  device-metric's hourly means (the least any per-hour score must do), and the ratio;
- with ``--store``: the day written into a fresh embedded (SQLite) store as signed
  batches, then ``load_day`` from it (what the CLI and the API add before scoring).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from analytics.accounting import DeviceDay, MetricSeries, score_day
from analytics.accounting.load import load_day
from analytics.accounting.model import DAY_MS, HOUR_MS
from firmware_sim.city import SimulatedCity
from firmware_sim.driver import METRICS_BY_KIND, signal_params
from firmware_sim.faults import Fault, apply_faults
from firmware_sim.signals import simulate

D0 = 1_795_651_200_000  # 2026-11-26 00:00 UTC
MIN = 60_000


def city_day(devices: int, seed: int = 22) -> list[DeviceDay]:
    """One simulated day of ``devices`` devices at 1-minute readings."""
    city = SimulatedCity.generate(seed, devices=devices, zones=max(1, min(8, devices // 10)))
    times = np.arange(D0, D0 + DAY_MS, MIN, dtype=np.int64)
    out: list[DeviceDay] = []
    for index, dev in enumerate(city.devices):
        params = signal_params(dev.seed, dev.driver_options["zone_profile"], MIN)
        metrics = METRICS_BY_KIND[dev.kind]
        values = simulate(params, times, metrics)
        faults: tuple[Fault, ...] = ()
        if index % 10 == 1:
            faults = (Fault("stuck", metrics[0], D0 + 3 * HOUR_MS, D0 + 7 * HOUR_MS),)
        elif index % 10 == 2:
            faults = (Fault("dropout", "*", D0 + 12 * HOUR_MS, D0 + DAY_MS, magnitude=1.0),)
        series = {}
        for metric in metrics:
            t, v = apply_faults(metric, times, values[metric], faults, dev.seed)
            if index == 3 and metric in out[0].series:  # device 3 republishes device 0
                v = np.roll(out[0].series[metric].values, 5)
                t = out[0].series[metric].times
            series[metric] = MetricSeries(t, np.round(v, 3), np.zeros(t.size, np.int64))
        sealed = D0 + np.arange(1, 25, dtype=np.int64) * HOUR_MS
        out.append(
            DeviceDay(
                dev.name,
                f"op-{index % 50}",
                dev.kind,
                dev.lat,
                dev.lon,
                index,
                series,
                sealed,
                sealed + 1_500,
            )
        )
    return out


def baseline_s(days: list[DeviceDay]) -> float:
    """Hourly means of every device-metric, vectorised: a floor for any hourly score."""
    start = time.perf_counter()
    for dev in days:
        for series in dev.series.values():
            hours = (series.times - D0) // HOUR_MS
            sums = np.bincount(hours, weights=series.values, minlength=24)
            counts = np.bincount(hours, minlength=24)
            _ = sums / np.maximum(counts, 1)
    return time.perf_counter() - start


def through_store(days: list[DeviceDay]) -> dict[str, float]:
    """Write the day into a fresh SQLite store as signed batches; time ``load_day``."""
    from analytics.store import open_store
    from analytics.store.base import StoredBatch
    from civicmesh.identity import Ed25519Signer
    from civicmesh.protocol import GENESIS_HASH, Reading, make_payload, seal_batch, wrap_envelope
    from civicmesh.registry import DeviceRecord

    gateway = Ed25519Signer.from_seed(hashlib.sha256(b"bench/acc/gw").digest())
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{Path(tmp) / 'bench.db'}")
        try:
            store.migrate()
            start = time.perf_counter()
            for dev in days:
                signer = Ed25519Signer.from_seed(hashlib.sha256(dev.device_id.encode()).digest())
                store.upsert_devices(
                    [
                        DeviceRecord(
                            signer.key_id,
                            signer.verify_key().to_text(),
                            "z",
                            dev.lat,
                            dev.lon,
                            "air",
                        )
                    ]
                )
                prev, batches = GENESIS_HASH, []
                for hour in range(24):
                    lo, hi = D0 + hour * HOUR_MS, D0 + (hour + 1) * HOUR_MS
                    rows = [
                        Reading(int(t), metric, float(v))
                        for metric, s in dev.series.items()
                        for t, v in zip(s.times, s.values, strict=True)
                        if lo <= t < hi
                    ]
                    if not rows:
                        continue
                    payload = make_payload(signer.key_id, hour + 1, prev, hi, rows, "bench")
                    batch = seal_batch(signer, payload)
                    env = wrap_envelope(gateway, batch.message, hi + 1_500)
                    batches.append(
                        StoredBatch(
                            signer.key_id,
                            hour + 1,
                            batch.hash,
                            prev,
                            hi,
                            "bench",
                            gateway.key_id,
                            hi + 1_500,
                            hi + 2_000,
                            batch.message,
                            env.message,
                            batch.payload.readings,
                        )
                    )
                    prev = batch.hash
                store.write_batches(batches)
            write_s = time.perf_counter() - start
            start = time.perf_counter()
            loaded = load_day(store, D0)
            load_s = time.perf_counter() - start
            readings = sum(s.times.size for d in loaded for s in d.series.values())
        finally:
            store.close()
    return {"write_s": write_s, "load_s": load_s, "readings_loaded": readings}


def run(devices: int = 200, store: bool = False) -> dict[str, Any]:
    days = city_day(devices)
    readings = sum(s.times.size for d in days for s in d.series.values())
    base = baseline_s(days)
    start, cpu = time.perf_counter(), time.process_time()
    scores = score_day(days, D0)
    score_s, score_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    result: dict[str, Any] = {
        "devices": devices,
        "readings": readings,
        "score_s": round(score_s, 3),
        "score_cpu_s": round(score_cpu_s, 3),  # wall minus waiting on a shared machine
        "baseline_hourly_means_s": round(base, 3),
        "ratio_score_vs_baseline": round(score_s / max(base, 1e-9), 1),
        "target_s": 30.0,
        "duplicates_found": sum(
            1 for d in scores.devices if d.not_rewarded_because.startswith("duplicate")
        ),
        "capped": sum(1 for d in scores.devices if d.not_rewarded_because.startswith("capped")),
        "mean_score": round(float(np.mean([d.score for d in scores.devices])), 4),
    }
    if store:
        result.update({k: round(v, 3) for k, v in through_store(days).items()})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.accounting", description=__doc__)
    parser.add_argument("--devices", type=int, default=200, help="devices in the city (1..1000)")
    parser.add_argument("--store", action="store_true", help="also write + load via SQLite")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.devices <= 1000:
        parser.error("--devices must be within 1..1000")
    result = run(args.devices, args.store)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
