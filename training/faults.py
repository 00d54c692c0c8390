"""Fault detection: real streams, injected faults, labels, features, evaluation.

Faults are injected with firmware_sim's injector into real Sensor.Community and Aarhus
streams; the label of a sample is the fault that actually changed it. Samples a fault
window covers but cannot be told apart yet (a stuck value in its first two repeats, a
drift still smaller than half the stream's typical level) carry weight 0: they are
neither trained on nor scored. The streams' own faults are labelled by rule: DHT22
humidity stuck at its 99.9 % ceiling, isolated PM spikes, gaps and values out of range.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sklearn.ensemble import RandomForestClassifier

from civicmesh.metrics import BY_NAME
from edge.features import FAULT_CLASSES, FAULT_FEATURES, decide, metric_scale, stream_features
from firmware_sim.faults import Fault, apply_faults
from training.calibration import Fitted
from training.datasets import Stream, load_aarhus, load_aberdeen

DAY_MS = 86_400_000
CLASS = {name: i for i, name in enumerate(FAULT_CLASSES)}
INJECTED = ("stuck", "spike", "drift", "dropout", "out_of_range")


@dataclass(frozen=True)
class Labelled:
    """A stream's features with one label and weight per sample."""

    device: str
    metric: str
    times_ms: NDArray[np.int64]
    features: NDArray[np.float32]
    labels: NDArray[np.int64]
    weights: NDArray[np.float64]
    real_fault: NDArray[np.bool_]  # labelled by rule from the data set's own faults
    windows: NDArray[np.int64]  # class of the injected fault whose window covers the sample


def _real_labels(
    stream: Stream, times: NDArray[np.int64], values: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """The stream's own faults, by rule."""
    labels = np.zeros(len(values), dtype=np.int64)
    info = BY_NAME[stream.metric]
    gaps = np.zeros(len(values), dtype=bool)
    gaps[1:] = np.diff(times) > 1.5 * stream.interval_ms
    labels[gaps] = CLASS["dropout"]
    if stream.metric == "relativehumidity":
        ceiling = values >= 99.85
        run = np.zeros(len(values), dtype=np.int64)
        for i in range(1, len(values)):
            run[i] = run[i - 1] + 1 if ceiling[i] and values[i] == values[i - 1] else 0
        labels[ceiling & (run >= 2)] = CLASS["stuck"]
    if stream.metric in ("pm25", "pm10"):
        padded = np.pad(values, 5, mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, 11)
        around = np.median(np.delete(windows, 5, axis=1), axis=1)
        labels[(values > 50.0) & (values > 4.0 * np.maximum(around, 1.0))] = CLASS["spike"]
    outside = (values < info.minimum) | (values > info.maximum)
    labels[outside] = CLASS["out_of_range"]
    return labels, labels != CLASS["ok"]


def _fault_plan(stream: Stream, seed: int) -> list[tuple[str, Fault]]:
    """One fault per day of the stream, its kind cycling, its window and size random."""
    rng = np.random.default_rng([seed, zlib.crc32(f"{stream.device}/{stream.metric}".encode())])
    resolution, scale = metric_scale(stream.metric)
    info = BY_NAME[stream.metric]
    level = max(float(np.nanmedian(stream.values)), scale)
    kinds = [k for k in INJECTED if k != "drift" or stream.partner is not None]
    start, end = int(stream.times_ms[0]), int(stream.times_ms[-1])
    plan: list[tuple[str, Fault]] = []
    offset = int(rng.integers(len(kinds)))
    for day, day_start in enumerate(range(start, end - DAY_MS // 2, DAY_MS)):
        kind = kinds[(day + offset) % len(kinds)]
        hours = {
            "stuck": (1, 6),
            "spike": (3, 8),
            "drift": (6, 14),
            "dropout": (0.3, 2),
            "out_of_range": (0.5, 3),
        }[kind]
        length = int(rng.uniform(*hours) * 3_600_000)
        begin = day_start + int(rng.uniform(0, max(DAY_MS - length, 1)))
        stop = begin + length
        if kind == "stuck":
            fault = Fault("stuck", stream.metric, begin, stop)
        elif kind == "spike":
            magnitude = float(rng.uniform(6, 25)) * scale
            fault = Fault("spike", stream.metric, begin, stop, magnitude, rate=0.15)
        elif kind == "drift":
            magnitude = float(rng.uniform(1.0, 3.0)) * level
            fault = Fault("drift", stream.metric, begin, stop, magnitude)
        elif kind == "dropout":
            fault = Fault("dropout", stream.metric, begin, stop, 1.0)
        else:
            beyond = float(rng.uniform(0.05, 0.5)) * (info.maximum - info.minimum)
            hold = info.maximum + beyond if rng.random() < 0.5 else info.minimum - 10 * resolution
            fault = Fault("stuck", stream.metric, begin, stop, hold_value=hold)
        plan.append((kind, fault))
    return plan


def _label_fault(
    kind: str,
    fault: Fault,
    times: NDArray[np.int64],
    masks: tuple[NDArray[np.bool_], NDArray[np.bool_]],
    offset: NDArray[np.float64],
    level: float,
    labels: NDArray[np.int64],
    weights: NDArray[np.float64],
) -> None:
    """Label (in place) the samples an injected stuck, spike, drift or out-of-range fault
    changed; weight 0 for those inside its window it did not visibly change. ``masks``:
    the fault's window (outside real faults) and the samples it changed there."""
    window, changed = masks
    if kind == "stuck":
        run = np.cumsum(window) * window
        labels[window & (run >= 3) & changed] = CLASS["stuck"]
        weights[window & ~((run >= 3) & changed)] = 0.0
    elif kind == "spike":
        labels[changed] = CLASS["spike"]
    elif kind == "drift":
        strong = window & (np.abs(offset) >= 0.5 * level)
        labels[strong] = CLASS["drift"]
        weights[window & ~strong] = 0.0
        # after the window the sensor is repaired; the slow baseline needs a while
        recovery = (times >= fault.end_ms) & (times < fault.end_ms + 12 * 3_600_000)
        weights[recovery & (labels == CLASS["ok"])] = 0.0
    else:
        labels[changed] = CLASS["out_of_range"]
        weights[window & ~changed] = 0.0


def labelled_stream(stream: Stream, seed: int, *, inject: bool = True) -> Labelled:
    """Features and labels of a stream, with injected faults when ``inject``."""
    times, clean = stream.times_ms, stream.values
    labels, real = _real_labels(stream, times, clean)
    weights = np.ones(len(clean))
    values = clean.copy()
    partner = stream.partner
    keep = np.ones(len(clean), dtype=bool)
    windows = np.zeros(len(clean), dtype=np.int64)
    if inject:
        resolution, _ = metric_scale(stream.metric)
        level = max(float(np.nanmedian(clean)), metric_scale(stream.metric)[1])
        for kind, fault in _fault_plan(stream, seed):
            _, faulted = apply_faults(
                stream.metric, times, values, [fault], seed, remove_dropouts=False
            )
            covered = fault.window(times)
            windows[covered] = CLASS[kind]
            window = covered & ~real
            changed = window & (np.abs(faulted - values) > resolution / 2)
            if kind == "dropout":
                dropped = window
                keep &= ~dropped
                after = np.searchsorted(times, fault.end_ms)
                if after < len(times):
                    labels[after] = CLASS["dropout"]
                continue
            values = faulted
            _label_fault(
                kind, fault, times, (window, changed), faulted - clean, level, labels, weights
            )
    times, values, labels, weights, real, windows = (
        times[keep],
        values[keep],
        labels[keep],
        weights[keep],
        real[keep],
        windows[keep],
    )
    if partner is not None:
        partner = partner[keep]
    if inject:
        # a sample after removed ones starts a gap whatever the label says
        gaps = np.zeros(len(times), dtype=bool)
        gaps[1:] = np.diff(times) > 1.5 * stream.interval_ms
        labels[gaps] = CLASS["dropout"]
        weights[gaps] = 1.0
    # what a sample shows first: a value out of range, else the gap before it
    info = BY_NAME[stream.metric]
    outside = (values < info.minimum) | (values > info.maximum)
    labels[outside] = CLASS["out_of_range"]
    weights[outside] = 1.0
    features = stream_features(stream.metric, times, values, stream.interval_ms, partner)
    return Labelled(stream.device, stream.metric, times, features, labels, weights, real, windows)


def split_devices(devices: list[str], seed: int, test_fraction: float = 0.3) -> set[str]:
    """The held-out devices: a seeded share of each source (Aberdeen, Aarhus)."""
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for prefix in sorted({d.split("-")[0] for d in devices}):
        group = sorted({d for d in devices if d.split("-")[0] == prefix})
        count = max(1, round(len(group) * test_fraction))
        held.update(str(d) for d in rng.choice(group, count, replace=False))
    return held


def stack(
    items: list[Labelled],
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.float64]]:
    if not items:
        return (
            np.empty((0, len(FAULT_FEATURES)), np.float32),
            np.empty(0, np.int64),
            np.empty(0),
        )
    return (
        np.concatenate([i.features for i in items]),
        np.concatenate([i.labels for i in items]),
        np.concatenate([i.weights for i in items]),
    )


def f1_per_class(
    labels: NDArray[np.int64], predicted: NDArray[np.int64], weights: NDArray[np.float64]
) -> dict[str, dict[str, float]]:
    """Precision, recall and F1 of each fault class, over samples with weight > 0."""
    scored = weights > 0
    y, p = labels[scored], predicted[scored]
    out: dict[str, dict[str, float]] = {}
    for name in FAULT_CLASSES[1:]:
        c = CLASS[name]
        tp = int(np.sum((y == c) & (p == c)))
        fp = int(np.sum((y != c) & (p == c)))
        fn = int(np.sum((y == c) & (p != c)))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    return out


def _runs(mask: NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(first, last) index of each run of True in ``mask``."""
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    ends = np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]]))
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def episodes(
    items: list[Labelled], predicted: list[NDArray[np.int64]], name: str
) -> dict[str, float]:
    """Event view of one fault class: runs of samples labelled ``name`` (episodes), how
    many got at least one alarm of that class, and the median delay to the first one;
    and the alarms: runs of ``name`` predictions, true when they touch that fault's
    injected window (its early, unscored part included), false anywhere else (the hours
    after a repair included). Event F1 from the two."""
    c = CLASS[name]
    total = found = alarms = true_alarms = 0
    delays: list[float] = []
    for item, pred in zip(items, predicted, strict=True):
        for begin, end in _runs(pred == c):
            alarms += 1
            true_alarms += bool(np.any(item.windows[begin : end + 1] == c))
        for begin, end in _runs(item.labels == c):
            total += 1
            hits = np.flatnonzero(pred[begin : end + 1] == c)
            if hits.size:
                found += 1
                delays.append(
                    (int(item.times_ms[begin + hits[0]]) - int(item.times_ms[begin])) / 3.6e6
                )
    recall = found / total if total else 0.0
    precision = true_alarms / alarms if alarms else 0.0
    return {
        "episodes": total,
        "detected": found,
        "median_delay_h": float(np.median(delays)) if delays else float("nan"),
        "alarms": alarms,
        "true_alarms": true_alarms,
        "event_precision": precision,
        "event_recall": recall,
        "event_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }


def false_alarms_per_device_day(
    items: list[Labelled], predicted: list[NDArray[np.int64]]
) -> tuple[float, int, float]:
    """Alarms (runs of non-ok predictions starting on a sample labelled ok) per device-day
    on clean streams; returns (rate, alarms, device-days)."""
    alarms = 0
    for item, pred in zip(items, predicted, strict=True):
        starts = [begin for begin, _ in _runs(pred != CLASS["ok"])]
        alarms += int(np.sum(item.labels[starts] == CLASS["ok"]))
    days = device_days(items)
    return (alarms / days if days else 0.0), alarms, days


def device_days(items: list[Labelled]) -> float:
    """Days covered, per device the longest of its streams, summed."""
    spans: dict[str, float] = {}
    for item in items:
        span = (int(item.times_ms[-1]) - int(item.times_ms[0])) / DAY_MS
        spans[item.device] = max(spans.get(item.device, 0.0), span)
    return sum(spans.values())


def fault_data(
    seed: int, *, small: bool = False
) -> tuple[list[Labelled], list[Labelled], list[Labelled], list[Labelled]]:
    """Injected train and test streams, and the same devices' clean streams."""
    streams = load_aberdeen(limit_sensors=3 if small else None) + load_aarhus(
        limit_points=3 if small else 12, days=3 if small else 7
    )
    held = split_devices([s.device for s in streams], seed)
    injected = [labelled_stream(s, seed) for s in streams]
    clean = [labelled_stream(s, seed, inject=False) for s in streams]
    return (
        [i for i in injected if i.device not in held],
        [i for i in injected if i.device in held],
        [c for c in clean if c.device not in held],
        [c for c in clean if c.device in held],
    )


THRESHOLDS = (0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1)
RARE_CLASS_WEIGHT = 2.0  # spikes and drift are rare samples; weigh them up in training
MAX_FALSE_ALARMS = 1.0  # per device and day, the bar


FOLDS = 3  # for the alarm threshold: devices held out of training, as in the field


def _fit_forest(items: list[Labelled], seed: int, small: bool) -> RandomForestClassifier:
    X, y, w = stack(items)
    model = RandomForestClassifier(
        n_estimators=10 if small else 30,
        max_leaf_nodes=200,
        min_samples_leaf=5,
        n_jobs=2,
        random_state=seed,
    )
    weights = np.where(np.isin(y, [CLASS["spike"], CLASS["drift"]]), RARE_CLASS_WEIGHT, 1.0)
    model.fit(X[w > 0], y[w > 0], sample_weight=weights[w > 0])
    return model


def out_of_fold_false_alarms(
    train: list[Labelled], clean_train: list[Labelled], seed: int, *, small: bool = False
) -> dict[float, float]:
    """False alarms per device-day at each of :data:`THRESHOLDS`, on clean streams of
    training devices that the model scoring them did not see (:data:`FOLDS` seeded
    device splits, alarms and device-days pooled). In-sample, the same rule promised at
    most one and gave 1.75 on two of three such splits."""
    devices = sorted({i.device for i in train})
    alarms = dict.fromkeys(THRESHOLDS, 0)
    days = 0.0
    for fold in range(1, FOLDS + 1):
        held = split_devices(devices, seed + fold)
        model = _fit_forest([i for i in train if i.device not in held], seed, small)
        clean = [c for c in clean_train if c.device in held]
        probabilities = [model.predict_proba(c.features) for c in clean]
        for threshold in THRESHOLDS:
            predicted = [
                decide(p, c.features, threshold) for p, c in zip(probabilities, clean, strict=True)
            ]
            alarms[threshold] += false_alarms_per_device_day(clean, predicted)[1]
        days += device_days(clean)
    return {t: (alarms[t] / days if days else 0.0) for t in THRESHOLDS}


def train_fault(seed: int, *, small: bool = False) -> Fitted:
    """The fault classifier: Aberdeen PM/T/RH and Aarhus traffic streams, split by device.

    The alarm threshold on p(ok) is the highest of :data:`THRESHOLDS` that keeps the
    out-of-fold false alarms on the training devices' clean streams under the bar.
    """
    train, test, clean_train, clean_test = fault_data(seed, small=small)
    held = {i.device for i in test}
    model = _fit_forest(train, seed, small)

    def classify(items: list[Labelled], threshold: float) -> list[NDArray[np.int64]]:
        return [decide(model.predict_proba(i.features), i.features, threshold) for i in items]

    fold_rates = out_of_fold_false_alarms(train, clean_train, seed, small=small)
    threshold = next((t for t in THRESHOLDS if fold_rates[t] <= MAX_FALSE_ALARMS), THRESHOLDS[-1])
    Xt, yt, wt = stack(test)
    predicted_test = classify(test, threshold)
    per_class = f1_per_class(yt, np.concatenate(predicted_test), wt)
    drift_events = episodes(test, predicted_test, "drift")
    predicted_clean = classify(clean_test, threshold)
    rate, count, days = false_alarms_per_device_day(clean_test, predicted_clean)
    _, yc, wc = stack(clean_test)
    real = f1_per_class(yc, np.concatenate(predicted_clean), wc)
    metrics = {
        "split": "device: a seeded 30% of the Aberdeen and of the Aarhus devices held out",
        "devices": {"train": len({i.device for i in train}), "test": len(held)},
        "samples": {
            "train": sum(int((i.weights > 0).sum()) for i in train),
            "test": int((wt > 0).sum()),
        },
        "threshold_p_ok": threshold,
        "threshold_rule": f"highest with at most {MAX_FALSE_ALARMS:g} false alarm per device-day"
        f" out of fold ({FOLDS} device splits of the training devices)",
        "false_alarms_out_of_fold": {str(t): round(r, 3) for t, r in fold_rates.items()},
        "injected": per_class,
        "false_alarms_per_device_day": rate,
        "drift_episodes": drift_events,
        "false_alarms": count,
        "clean_device_days": days,
        "real_faults_recall": {
            name: {"recall": v["recall"], "support": v["support"]}
            for name, v in real.items()
            if v["support"]
        },
        "target_met": all(v["f1"] >= 0.9 for v in per_class.values()) and rate <= 1.0,
    }
    return Fitted(
        name="fault",
        target="*",
        unit="",
        estimator=model,
        features=FAULT_FEATURES,
        X_test=Xt,
        y_test=yt.astype(np.float64),
        metrics=metrics,
        data={
            "data_set": "sensor_community_aberdeen + aarhus_citypulse",
            "learner": "random forest",
            "classes": list(FAULT_CLASSES),
            "threshold": threshold,
        },
    )
