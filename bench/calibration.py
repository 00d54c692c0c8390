"""Network-wide drift detection on REAL streams (issue 23): evaluation harness and script.

``python -m bench.calibration [--split-only] [--tune] [--heldout] [--json] [--repeats N]``

Data: the Sensor.Community Aberdeen week (SDS011 PM2.5 and PM10, real 145-s samples),
hourly means on one grid. Sensor 22068 moved during the week (two locations) and is
left out. The scored devices are split ONCE, with a fixed seed, into a tuning half and
a held-out half (``bench/calibration_split.json``, written before any tuning); every
device's clean stream stays in the network as everybody's neighbour, but only the
tuning half's scores were ever looked at while choosing the detector's parameters.

Drifts are injected on the real samples with ``firmware_sim.faults`` (the injector
``training.faults`` uses): a linear drift of the PM channel starting at a random hour,
ramping over a random 6-48 h to a random 1-3x the stream's median level (the size
``training.faults`` gives its drifts), after which the offset stays (a drifted sensor
does not repair itself). One drift per scenario, ``repeats`` scenarios per device and
channel. Scored (issue 23 acceptance):

- event-level F1: a drift is caught when an alarm on its device starts at or after the
  drift's start; a false positive is an alarm of the drift run that the clean run does
  not have and that is no catch (on any device: a drift must not blame a neighbour);
- false alarms per device-day on the clean streams (both channels of a device summed,
  over the hours the detector can judge);
- the correction: MAE of the offset-corrected hourly means against the true (clean)
  ones over the 24 h after the alarm, against the pre-drift MAE of the network's
  estimate of the device (its baseline ratio times its neighbours' median, 48 h before
  the drift). The literal pre-drift MAE of the device against its true stream is 0 on
  real data (the clean stream IS the truth), so that is the yardstick.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from analytics.calibration.drift import (
    HOUR_MS,
    METRIC_FLOOR,
    DriftAlarm,
    DriftRule,
    Network,
    NetworkDevice,
    analyse,
    correction_for,
    detect_drift,
)
from analytics.geo import distances_km
from firmware_sim.faults import Fault, apply_faults
from training.datasets import datasets_dir, load_aberdeen

SPLIT_FILE = Path(__file__).resolve().parent / "calibration_split.json"
SPLIT_SEED = 23
EVAL_SEED = 2023
METRICS = ("pm25", "pm10")
MOVED = {"22068"}  # two locations within the week (SOURCE.md)


@dataclass(frozen=True)
class City:
    """The real fleet on one hour grid: raw samples and hourly means per device."""

    start_ms: int
    hours: int
    devices: tuple[str, ...]
    positions: dict[str, tuple[float, float]]
    raw: dict[tuple[str, str], tuple[NDArray[np.int64], NDArray[np.float64]]]
    hourly: dict[tuple[str, str], NDArray[np.float64]]

    def network(
        self, metric: str, replaced: dict[str, NDArray[np.float64]] | None = None
    ) -> Network:
        replaced = replaced or {}
        devices = tuple(
            NetworkDevice(
                d,
                self.positions[d][0],
                self.positions[d][1],
                replaced.get(d, self.hourly[(d, metric)]),
            )
            for d in self.devices
        )
        return Network(metric, self.start_ms, devices)


def hourly_means(
    times: NDArray[np.int64], values: NDArray[np.float64], start_ms: int, hours: int
) -> NDArray[np.float64]:
    index = (times - start_ms) // HOUR_MS
    keep = (index >= 0) & (index < hours) & np.isfinite(values)
    sums = np.bincount(index[keep], values[keep], minlength=hours)
    counts = np.bincount(index[keep], minlength=hours)
    with np.errstate(all="ignore"):
        means: NDArray[np.float64] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means


def _positions(root: Path) -> dict[str, tuple[float, float]]:
    path = root / "sensor_community_aberdeen" / "sensors_index_DERIVED.csv"
    out: dict[str, tuple[float, float]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["sensor_type"] == "SDS011":
                out.setdefault(f"sds011-{row['sensor_id']}", (float(row["lat"]), float(row["lon"])))
    return out


def load_city(root: Path | None = None, limit_sensors: int | None = None) -> City:
    """The Aberdeen SDS011 fleet (``limit_sensors``: the first few, for tests)."""
    root = root or datasets_dir()
    positions = _positions(root)
    streams = [
        s
        for s in load_aberdeen(root, limit_sensors=limit_sensors)
        if s.metric in METRICS and s.device.split("-")[-1] not in MOVED
    ]
    start = min(int(s.times_ms[0]) for s in streams) // HOUR_MS * HOUR_MS
    end = max(int(s.times_ms[-1]) for s in streams)
    hours = (end - start) // HOUR_MS + 1
    raw = {(s.device, s.metric): (s.times_ms, s.values) for s in streams}
    hourly = {key: hourly_means(t, v, start, hours) for key, (t, v) in raw.items()}
    devices = tuple(sorted({s.device for s in streams if s.device in positions}))
    return City(start, hours, devices, positions, raw, hourly)


def make_split(devices: tuple[str, ...], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    order = np.random.default_rng(seed).permutation(len(devices))
    half = len(devices) // 2
    return {
        "seed": [str(seed)],
        "tuning": sorted(devices[k] for k in order[:half]),
        "heldout": sorted(devices[k] for k in order[half:]),
    }


def read_split(path: Path = SPLIT_FILE) -> dict[str, list[str]]:
    split: dict[str, list[str]] = json.loads(path.read_text(encoding="utf-8"))
    return split


@dataclass(frozen=True)
class Episode:
    device: str
    metric: str
    start_hour: int
    ramp_h: float
    magnitude: float  # offset reached at the ramp's end, metric units
    level: float


def plan_episodes(city: City, devices: list[str], repeats: int, seed: int) -> list[Episode]:
    episodes = []
    for device, metric in itertools.product(devices, METRICS):
        key = zlib.crc32(f"{device}/{metric}".encode())
        rng = np.random.default_rng([seed, key])
        level = max(float(np.nanmedian(city.hourly[(device, metric)])), 1.0)
        for _ in range(repeats):
            ramp = float(rng.uniform(6.0, 48.0))
            last = city.hours - int(np.ceil(ramp)) - 12
            start = int(rng.integers(60, max(last, 61)))
            magnitude = float(rng.uniform(1.0, 3.0)) * level
            episodes.append(Episode(device, metric, start, ramp, magnitude, level))
    return episodes


def drifted_hourly(city: City, episode: Episode, seed: int) -> NDArray[np.float64]:
    """The episode's drift on the device's real samples, as hourly means."""
    times, values = city.raw[(episode.device, episode.metric)]
    begin = city.start_ms + episode.start_hour * HOUR_MS
    stop = begin + int(episode.ramp_h * HOUR_MS)
    fault = Fault("drift", episode.metric, begin, stop, episode.magnitude)
    t, v = apply_faults(episode.metric, times, values, [fault], seed)
    v = v + np.where(t >= stop, episode.magnitude, 0.0)  # the offset stays
    return hourly_means(t, v, city.start_ms, city.hours)


def _alarm_hours(alarms: list[DriftAlarm]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for a in alarms:
        out.setdefault(a.device_id, set()).update(range(a.start_hour, a.end_hour))
    return out


def has_neighbour(city: City, device: str, rule: DriftRule) -> bool:
    net = city.network(METRICS[0])
    dist = distances_km(net.devices)
    i = city.devices.index(device)
    return bool(np.sum(dist[i] <= rule.radius_km) > 1)


def clean_false_alarms(city: City, devices: list[str], rule: DriftRule) -> dict[str, float]:
    alarms, judged = 0, 0.0
    per_device: dict[str, int] = {}
    for metric in METRICS:
        net = city.network(metric)
        det = analyse(net, rule)
        found = detect_drift(net, rule)
        for d in devices:
            i = city.devices.index(d)
            if metric == METRICS[0]:
                judged += float(det.judged[i].sum()) / 24.0
            n = sum(1 for a in found if a.device_id == d)
            alarms += n
            per_device[d] = per_device.get(d, 0) + n
    return {
        "alarms": alarms,
        "device_days": round(judged, 2),
        "per_device_day": alarms / judged if judged else float("nan"),
    }


def _correction_figures(
    net: Network, alarm: DriftAlarm, episode: Episode, clean: NDArray[np.float64], rule: DriftRule
) -> dict[str, float] | None:
    det = analyse(net, rule)
    corr = correction_for(net, alarm, rule, det)
    i = [d.device_id for d in net.devices].index(alarm.device_id)
    window = slice(alarm.start_hour, min(alarm.start_hour + 24, net.hours))
    n = window.stop - window.start
    if n < 6:
        return None
    drifted = net.devices[i].values[window]
    fixed = corr.corrected(net.devices[i].values[alarm.start_hour :])[:n]
    truth = clean[window]
    floor = METRIC_FLOOR[net.metric]
    gain = float(np.exp(det.baseline[i, alarm.since_hour]))
    pre = slice(max(0, episode.start_hour - 48), episode.start_hour)
    expected_pre = gain * (det.neighbour_median[i, pre] + floor) - floor
    with np.errstate(all="ignore"):
        pre_mae = float(np.nanmean(np.abs(expected_pre - clean[pre])))
        return {
            "pre_drift_network_mae": pre_mae,
            "uncorrected_mae": float(np.nanmean(np.abs(drifted - truth))),
            "corrected_mae": float(np.nanmean(np.abs(fixed - truth))),
            "corrected_mae_last6h": float(np.nanmean(np.abs(fixed[-6:] - truth[-6:]))),
        }


def evaluate(
    city: City, devices: list[str], rule: DriftRule, repeats: int, seed: int = EVAL_SEED
) -> dict[str, Any]:
    """F1, false alarms and correction figures of ``rule`` on ``devices``' streams."""
    clean_alarms = {m: _alarm_hours(detect_drift(city.network(m), rule)) for m in METRICS}
    tp = fp = fn = 0
    delays: list[float] = []
    corrections: list[dict[str, float]] = []
    for episode in plan_episodes(city, devices, repeats, seed):
        drifted = drifted_hourly(city, episode, seed)
        net = city.network(episode.metric, {episode.device: drifted})
        alarms = detect_drift(net, rule)
        before = clean_alarms[episode.metric]
        caught = [
            a
            for a in alarms
            if a.device_id == episode.device and a.start_hour >= episode.start_hour
        ]
        for a in alarms:
            if a in caught:
                continue
            if not set(range(a.start_hour, a.end_hour)) & before.get(a.device_id, set()):
                fp += 1
        if caught:
            tp += 1
            first = caught[0]
            delays.append(float(first.start_hour - episode.start_hour))
            figures = _correction_figures(
                net, first, episode, city.hourly[(episode.device, episode.metric)], rule
            )
            if figures is not None:
                corrections.append(figures)
        else:
            fn += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    ratios = [c["corrected_mae"] / c["pre_drift_network_mae"] for c in corrections]
    return {
        "devices": len(devices),
        "episodes": tp + fn,
        "caught": tp,
        "false_positives": fp,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "median_delay_h": float(np.median(delays)) if delays else None,
        "clean": clean_false_alarms(city, devices, rule),
        "correction": _summarise(corrections, ratios),
    }


def _summarise(corrections: list[dict[str, float]], ratios: list[float]) -> dict[str, Any]:
    if not corrections:
        return {"episodes": 0}
    keys = corrections[0].keys()
    out: dict[str, Any] = {k: float(np.median([c[k] for c in corrections])) for k in keys}
    out["episodes"] = len(corrections)
    out["median_ratio_to_pre_drift"] = float(np.median(ratios))
    out["share_within_1_5x"] = float(np.mean(np.array(ratios) <= 1.5))
    return out


def with_neighbours(city: City, devices: list[str], rule: DriftRule) -> list[str]:
    return [d for d in devices if has_neighbour(city, d, rule)]


GRID = {  # the second grid (the first, coarser one showed gap 24 and smoothing >= 12 best)
    "k": (3.0, 4.0),
    "tol_floor": (0.25, 0.3, 0.35),
    "persist_h": (4, 8),
    "smooth_h": (12, 18),
    "gap_h": (24, 36),
}


def _try(args: tuple[City, list[str], DriftRule, int]) -> dict[str, Any]:
    city, devices, rule, repeats = args
    result = evaluate(city, devices, rule, repeats)
    return {
        "rule": asdict(rule),
        **{k: result[k] for k in ("f1", "precision", "recall")},
        "false_alarms": result["clean"]["per_device_day"],
    }


def tune(
    city: City, devices: list[str], repeats: int, workers: int = 2
) -> tuple[DriftRule, list[dict[str, Any]]]:
    """Grid search on the tuning devices only: the highest F1 with <= 1 false alarm per
    device-day (ties: fewer false alarms)."""
    from multiprocessing import get_context

    settings: list[dict[str, Any]] = [
        dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())
    ]
    rules = [replace(DriftRule(), **setting) for setting in settings]
    with get_context("fork").Pool(workers) as pool:
        tried = pool.map(_try, [(city, devices, rule, repeats) for rule in rules])
    for t in tried:
        r = t["rule"]
        print(
            "  "
            + " ".join(f"{k} {r[k]:g}" for k in GRID)
            + f": F1 {t['f1']:.3f} P {t['precision']:.3f} R {t['recall']:.3f} "
            f"FA {t['false_alarms']:.3f}"
        )
    best = max(
        range(len(tried)),
        key=lambda i: (
            tried[i]["f1"] if tried[i]["false_alarms"] <= 1.0 else -1.0,
            -tried[i]["false_alarms"],
        ),
    )
    return rules[best], tried


def _line(name: str, result: dict[str, Any]) -> str:
    c = result["correction"]
    corr = (
        f"correction: MAE {c['uncorrected_mae']:.2f} -> {c['corrected_mae']:.2f} "
        f"(pre-drift network {c['pre_drift_network_mae']:.2f}; "
        f"ratio {c['median_ratio_to_pre_drift']:.2f}, "
        f"{c['share_within_1_5x']:.0%} within 1.5x)"
        if c.get("episodes")
        else "correction: none"
    )
    return (
        f"{name}: {result['devices']} devices, {result['episodes']} drifts, caught "
        f"{result['caught']}, false positives {result['false_positives']}: "
        f"P {result['precision']:.3f} R {result['recall']:.3f} F1 {result['f1']:.3f}; "
        f"median delay {result['median_delay_h']} h; clean false alarms "
        f"{result['clean']['per_device_day']:.3f} per device-day "
        f"({result['clean']['alarms']} in {result['clean']['device_days']} device-days); {corr}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__)
    parser.add_argument("--split-only", action="store_true", help="write the split and stop")
    parser.add_argument("--tune", action="store_true", help="grid search on the tuning half")
    parser.add_argument("--heldout", action="store_true", help="score the held-out half too")
    parser.add_argument("--repeats", type=int, default=4, help="drifts per device and channel")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    city = load_city()
    if args.split_only:
        if SPLIT_FILE.exists():
            print(f"{SPLIT_FILE} exists; not overwritten", file=sys.stderr)
            return 1
        SPLIT_FILE.write_text(json.dumps(make_split(city.devices), indent=2) + "\n")
        print(f"wrote {SPLIT_FILE}")
        return 0
    split = read_split()
    rule = DriftRule()
    figures: dict[str, Any] = {}
    if args.tune:
        rule, tried = tune(city, with_neighbours(city, split["tuning"], rule), args.repeats)
        figures["grid"] = tried
        print(f"chosen on the tuning half: {asdict(rule)}")
    for name in ("tuning", "heldout") if args.heldout else ("tuning",):
        devices = split[name]
        near = with_neighbours(city, devices, rule)
        figures[name] = evaluate(city, near, rule, args.repeats)
        print(
            _line(
                f"{name} ({len(near)} of {len(devices)} with a neighbour within "
                f"{rule.radius_km:g} km)",
                figures[name],
            )
        )
    if args.json:
        print(json.dumps({"rule": asdict(rule), **figures}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
