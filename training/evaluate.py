"""``civicmesh models evaluate``: the shipped ONNX artifacts on the held-out data again.

Rebuilds each model's held-out set from the data sets (same split, same seed as its
card), runs ``model.onnx`` through ONNX Runtime and compares with the card's figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edge.features import decide
from training import export
from training.calibration import PURPLEAIR_SPLIT, gas_split, pm25_feature_matrix, scores
from training.datasets import load_purpleair, load_uci
from training.errors import TrainingError
from training.faults import f1_per_class, false_alarms_per_device_day, fault_data, stack


def evaluate_model(folder: Path) -> dict[str, Any]:
    try:
        card = json.loads((folder / "card.json").read_text())
        sess = export.session((folder / "model.onnx").read_bytes())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{folder} is not a model folder: {exc}") from None
    name, small, seed = card["name"], bool(card["small"]), int(card["seed"])
    metrics = card["metrics"]
    shipped_error = float(card["variants"][card["ships"]]["error"])
    result: dict[str, Any]
    if name in ("cal-co", "cal-no2"):
        X, y, _, test = gas_split(load_uci(), name.removeprefix("cal-"), small=small)
        result = scores(export.run_rows(sess, X[test])[:, 0].astype(np.float64), y[test])
        diff = abs(result["mae"] - shipped_error)
    elif name == "cal-pm25":
        pa = load_purpleair()
        test = pa.day >= PURPLEAIR_SPLIT
        X = pm25_feature_matrix(pa)
        result = scores(export.run_rows(sess, X[test])[:, 0].astype(np.float64), pa.reference[test])
        diff = abs(result["mae"] - shipped_error)
    elif name == "fault":
        _, test_items, _, clean_test = fault_data(seed, small=small)
        Xt, yt, wt = stack(test_items)
        threshold = float(card["runtime"]["threshold"])
        per_class = f1_per_class(yt, decide(export.run_rows(sess, Xt), Xt, threshold), wt)
        rate, _, _ = false_alarms_per_device_day(
            clean_test,
            [decide(export.run_rows(sess, c.features), c.features, threshold) for c in clean_test],
        )
        result = {
            "f1": {k: round(v["f1"], 4) for k, v in per_class.items()},
            "false_alarms_per_device_day": round(rate, 3),
        }
        diff = max(abs(per_class[k]["f1"] - metrics["injected"][k]["f1"]) for k in per_class)
    else:
        raise TrainingError(f"{folder}: unknown model {name!r}")
    return {**result, "max_diff_vs_card": round(float(diff), 6)}


def evaluate_folder(folder: Path) -> dict[str, dict[str, Any]]:
    cards = sorted(folder.glob("*/card.json"))
    if not cards:
        raise TrainingError(f"no model folders (with card.json) in {folder}")
    return {path.parent.name: evaluate_model(path.parent) for path in cards}
