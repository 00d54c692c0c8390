"""``civicmesh models train``: fit, export, quantize, measure, choose, write model cards.

An artifact directory per model holds ``model.onnx`` (the variant that ships),
``model.fp32.onnx``, ``model.int8.onnx`` and ``card.json`` / ``card.md``. The card's
``runtime`` block is what a release manifest carries to the device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training import export
from training.calibration import Fitted, scores, train_gas, train_pm25
from training.datasets import load_purpleair, load_uci
from training.errors import TrainingError
from training.faults import train_fault

log = logging.getLogger(__name__)

MODELS = ("cal-co", "cal-no2", "cal-pm25", "fault")
# ONNX must reproduce the trained model within this much (absolute, in the target's unit
# or in probability): float32 inference against scikit-learn's float64.
PARITY_TOLERANCE = 1e-3
# INT8 ships when it keeps the error within 2 % of fp32 and is smaller or faster.
INT8_ACCURACY_MARGIN = 0.02
MAX_MODEL_BYTES = 1_000_000


def _trainer(name: str, seed: int, small: bool) -> Callable[[], Fitted]:
    if name == "cal-co":
        return lambda: train_gas(load_uci(), "co", seed, small=small)
    if name == "cal-no2":
        return lambda: train_gas(load_uci(), "no2", seed, small=small)
    if name == "cal-pm25":
        return lambda: train_pm25(load_purpleair(), seed, small=small)
    if name == "fault":
        return lambda: train_fault(seed, small=small)
    raise TrainingError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def _quality(fitted: Fitted, output: np.ndarray) -> float:
    """Lower is better: MAE for calibration, 1 - mean F1 over fault classes."""
    if fitted.target == "*":
        from edge.features import decide
        from training.faults import f1_per_class

        labels = fitted.y_test.astype(np.int64)
        threshold = float(fitted.data["threshold"])
        per_class = f1_per_class(
            labels, decide(output, fitted.X_test, threshold), np.ones(len(labels))
        )
        return 1.0 - float(np.mean([v["f1"] for v in per_class.values()]))
    return scores(output[:, 0].astype(np.float64), fitted.y_test)["mae"]


def _reference_output(fitted: Fitted) -> np.ndarray:
    if fitted.target == "*":
        return np.asarray(fitted.estimator.predict_proba(fitted.X_test))
    return np.asarray(fitted.estimator.predict(fitted.X_test)).reshape(-1, 1)


def build(name: str, out_dir: Path, seed: int = 0, *, small: bool = False) -> dict[str, Any]:
    """Train one model and write its artifact directory; returns its card."""
    fitted = _trainer(name, seed, small)()
    fp32 = export.to_onnx(fitted.estimator, len(fitted.features))
    int8 = export.quantize(fp32)
    reference = _reference_output(fitted)
    variants: dict[str, dict[str, Any]] = {}
    row = fitted.X_test[:1]
    batch = fitted.X_test[:8]
    blobs = {"fp32": fp32} if int8 is None else {"fp32": fp32, "int8": int8}
    sessions = {variant: export.session(blob) for variant, blob in blobs.items()}
    # latency in alternating rounds, so that a busy moment hits both variants alike
    rounds: dict[str, dict[str, list[float]]] = {v: {"1": [], "8": []} for v in blobs}
    for _ in range(5):
        for variant, sess in sessions.items():
            rounds[variant]["1"].append(export.median_latency_us(sess, row, repeat=400))
            rounds[variant]["8"].append(export.median_latency_us(sess, batch, repeat=400))
    for variant, blob in blobs.items():
        output = export.run_rows(sessions[variant], fitted.X_test)
        variants[variant] = {
            "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "latency_us_median_1_row": statistics.median(rounds[variant]["1"]),
            "latency_us_median_8_rows": statistics.median(rounds[variant]["8"]),
            "max_abs_diff_vs_trained": float(np.max(np.abs(output - reference))),
            "error": _quality(fitted, output),
        }
    parity = variants["fp32"]["max_abs_diff_vs_trained"]
    if parity > PARITY_TOLERANCE:
        raise TrainingError(
            f"{name}: the ONNX model differs from the trained one by {parity:.2g} "
            f"(tolerance {PARITY_TOLERANCE})"
        )
    f, q = variants["fp32"], variants.get("int8")
    if q is None:
        ships, why = "fp32", "INT8 does not apply: a tree ensemble has no weights to quantize"
    else:
        int8_holds = q["error"] <= f["error"] * (1 + INT8_ACCURACY_MARGIN) + 1e-9
        int8_pays = q["bytes"] < f["bytes"] * 0.95 or (
            q["latency_us_median_1_row"] < f["latency_us_median_1_row"] * 0.95
        )
        ships = "int8" if int8_holds and int8_pays else "fp32"
        if ships == "int8":
            why = "INT8 keeps the accuracy and is smaller or faster"
        elif not int8_holds:
            why = "INT8 loses accuracy"
        else:
            why = "INT8 is neither smaller nor faster"
    shipped = int8 if ships == "int8" and int8 is not None else fp32
    if len(shipped) > MAX_MODEL_BYTES:
        raise TrainingError(f"{name}: {len(shipped)} bytes is over the {MAX_MODEL_BYTES} limit")
    target_sensors = {
        "cal-co": ["uci-mox-5"],
        "cal-no2": ["uci-mox-5"],
        "cal-pm25": ["purpleair-pa-ii"],
        "fault": ["*"],
    }[name]
    card: dict[str, Any] = {
        "name": name,
        "seed": seed,
        "small": small,
        "data": fitted.data,
        "metrics": fitted.metrics,
        "variants": variants,
        "ships": ships,
        "why": why,
        "parity_tolerance": PARITY_TOLERANCE,
        "operations": export.operation_count(fitted.estimator),
        "measured_on": f"{platform.machine()} {platform.processor() or ''}".strip()
        + ", onnxruntime CPU, one thread",
        "runtime": {
            "kind": "fault" if name == "fault" else "calibration",
            "target_metric": fitted.target,
            "unit": fitted.unit,
            "features": list(fitted.features),
            "feature_set": {
                "cal-co": "gas-v1",
                "cal-no2": "gas-v1",
                "cal-pm25": "pm25-v1",
                "fault": "stream-v4",
            }[name],
            "classes": fitted.data.get("classes", []),
            "threshold": fitted.data.get("threshold"),
            "target_sensor_types": target_sensors,
            # the gas models learned from hourly means; the others from any window
            "window_s": 3600 if name in ("cal-co", "cal-no2") else None,
        },
    }
    directory = out_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.fp32.onnx").write_bytes(fp32)
    if int8 is not None:
        (directory / "model.int8.onnx").write_bytes(int8)
    (directory / "model.onnx").write_bytes(shipped)
    (directory / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    (directory / "card.md").write_text(card_markdown(card))
    log.info("%s: ships %s (%d bytes) in %s", name, ships, len(shipped), directory)
    return card


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def card_markdown(card: dict[str, Any]) -> str:
    """The model card for people: data, split, metrics, size, latency, the choice."""
    lines = [f"# Model card: {card['name']}", ""]
    runtime = card["runtime"]
    lines += [
        f"- Kind: {runtime['kind']}; target: {runtime['target_metric']} {runtime['unit']}".rstrip(),
        f"- Data: {card['data']['data_set']} (../shared/datasets); "
        f"learner: {card['data']['learner']}",
        f"- Split: {card['metrics']['split']}",
        f"- Seed: {card['seed']}{' (CI slice)' if card['small'] else ''}",
        f"- Features ({runtime['feature_set']}): {', '.join(runtime['features'])}",
        f"- Target sensor types: {', '.join(runtime['target_sensor_types'])}",
        "",
        "## Metrics (held-out data)",
        "",
        "```json",
        json.dumps(card["metrics"], indent=2, sort_keys=True, default=_fmt),
        "```",
        "",
        "## fp32 and INT8",
        "",
        "| variant | bytes | median latency, 1 row (µs) | 8 rows (µs) | error "
        "| max diff vs trained |",
        "|---|---|---|---|---|---|",
    ]
    for variant, v in card["variants"].items():
        lines.append(
            f"| {variant} | {v['bytes']} | {v['latency_us_median_1_row']:.1f} "
            f"| {v['latency_us_median_8_rows']:.1f} | {v['error']:.4f} "
            f"| {v['max_abs_diff_vs_trained']:.2g} |"
        )
    lines += [
        "",
        f"Error is MAE for calibration and 1 - mean F1 for the fault model. Ships: "
        f"**{card['ships']}** ({card['why']}).",
        "",
        f"Latency measured on {card['measured_on']} (x86 figures). Work per row: "
        f"{json.dumps(card['operations'])}; scale by the CPU's speed on that kind of work to "
        "estimate a Raspberry Pi.",
        "",
    ]
    return "\n".join(lines)
