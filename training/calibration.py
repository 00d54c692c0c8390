"""Calibration: low-cost sensor -> reference, on the UCI gas and PurpleAir PM2.5 data.

Splits follow the drift the sensors show: time (train on the earlier months, test on the
later ones) and, for PurpleAir, site (each site held out once, trained on the others).
Baselines are linear regressions fitted on the same training rows; PurpleAir is also
compared with the published US-EPA correction.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edge.features import GAS_FEATURES, PM25_FEATURES, GasFeatures, pm25_features
from training.datasets import (
    PurpleAirColocation,
    UciAirQuality,
    epa_purpleair_correction,
)

UCI_SPLIT = datetime(2004, 11, 1, tzinfo=UTC)  # train Mar-Oct 2004, test Nov 2004-Apr 2005
PURPLEAIR_SPLIT = "2023-01-01"  # train 2021-2022, test 2023


def scores(predicted: NDArray[np.float64], truth: NDArray[np.float64]) -> dict[str, float]:
    error = predicted - truth
    ss_tot = float(np.sum((truth - truth.mean()) ** 2))
    return {
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "r2": 1.0 - float(np.sum(error**2)) / ss_tot if ss_tot else 0.0,
    }


@dataclass
class Fitted:
    """A fitted model with its input feature names and evaluation."""

    name: str
    target: str
    unit: str
    estimator: Any
    features: tuple[str, ...]
    X_test: NDArray[np.float32]
    y_test: NDArray[np.float64]
    metrics: dict[str, Any]
    data: dict[str, Any]


# Which learner and which features for which gas, chosen on the training months only
# (see the model card): trees for CO, whose response saturates; a small MLP on the
# baseline-relative features for NO2, whose sensor drifts most.
GAS_SETUP: dict[str, tuple[str, tuple[str, ...]]] = {
    "co": ("gbt", GAS_FEATURES),
    "no2": ("mlp", tuple(f for f in GAS_FEATURES if not f.startswith("log_"))),
}
_OWN_SENSOR = {"co": 0, "no2": 3}  # PT08.S1 targets CO, PT08.S4 targets NO2


def gas_feature_matrix(uci: UciAirQuality) -> NDArray[np.float32]:
    state = GasFeatures()
    rows = np.full((len(uci.times_ms), len(GAS_FEATURES)), np.nan, dtype=np.float32)
    for i, t in enumerate(uci.times_ms.tolist()):
        mox = uci.mox[i]
        extra = (uci.temperature[i], uci.rh[i], uci.abs_humidity[i])
        if np.isnan(mox).any() or np.isnan(extra).any():
            continue  # the device was off: no features, and the baseline waits
        rows[i] = state.update(int(t), tuple(mox.tolist()), *map(float, extra))
    return rows


def fit(model: Any, X: NDArray[Any], y: NDArray[Any]) -> Any:
    """``model.fit`` without ConvergenceWarning: the iteration caps are deliberate (the CI
    slice stops early; early stopping decides the full runs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, y)


def _learner(kind: str, seed: int, small: bool) -> Any:
    if kind == "gbt":
        return GradientBoostingRegressor(
            n_estimators=100 if small else 300,
            max_depth=4,
            learning_rate=0.05,
            subsample=0.8,
            random_state=seed,
        )
    return _mlp((32, 16), 1e-3, 300 if small else 800, seed)


def _mlp(hidden: tuple[int, ...], alpha: float, max_iter: int, seed: int) -> Any:
    """A small MLP on standardized inputs, early-stopped on a held-back 10%."""
    return make_pipeline(
        StandardScaler(),
        MLPRegressor(
            hidden_layer_sizes=hidden,
            alpha=alpha,
            max_iter=max_iter,
            early_stopping=True,
            random_state=seed,
        ),
    )


def gas_split(
    uci: UciAirQuality, target: str, *, small: bool = False
) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_]]:
    """Features (the model's columns), reference, train and test masks."""
    _, names = GAS_SETUP[target]
    features = gas_feature_matrix(uci)
    columns = [GAS_FEATURES.index(n) for n in names]
    y = uci.co if target == "co" else uci.no2
    usable = ~np.isnan(features).any(axis=1) & ~np.isnan(y)
    usable[: 24 * 7] = False  # the first week: the running baseline is still filling
    train = usable & (uci.times_ms < int(UCI_SPLIT.timestamp() * 1000))
    test = usable & ~train
    if small:
        train &= np.arange(len(y)) % 3 == 0
    return features[:, columns], y, train, test


def _gas_fits(
    uci: UciAirQuality,
    target: str,
    X: NDArray[np.float32],
    y: NDArray[np.float64],
    train: NDArray[np.bool_],
    test: NDArray[np.bool_],
    seed: int,
    small: bool,
) -> tuple[Any, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Our model and the two linear baselines fitted on ``train``: the model and the
    three predictions of ``test``. The baselines: the usual field calibration (own
    sensor, T, RH) and a fit on all raw channels."""
    model = fit(_learner(GAS_SETUP[target][0], seed, small), X[train], y[train])
    raw = np.column_stack([uci.mox, uci.temperature, uci.rh, uci.abs_humidity])
    own = raw[:, [_OWN_SENSOR[target], 5, 6]]
    single = LinearRegression().fit(own[train], y[train]).predict(own[test])
    multi = LinearRegression().fit(raw[train], y[train]).predict(raw[test])
    return model, model.predict(X[test]), single, multi


def rolling_origin(
    uci: UciAirQuality,
    target: str,
    split: tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_]],
    seed: int,
    small: bool,
) -> dict[str, Any]:
    """Each test month predicted by models refitted on every month before it, as monthly
    re-releases from a co-located reference would be: does the season gap explain the
    held-out error? Ours and both baselines refitted alike; MAE per month and pooled.
    ``split`` is what :func:`gas_split` returns."""
    X, y, train, test = split
    usable = train | test
    times = uci.times_ms
    month = UCI_SPLIT
    months: list[dict[str, Any]] = []
    pooled: dict[str, list[NDArray[np.float64]]] = {"ours": [], "own": [], "all": [], "y": []}
    while int(month.timestamp() * 1000) <= int(times[test].max()):
        after = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
        start, end = (int(m.timestamp() * 1000) for m in (month, after))
        fit_rows = usable & (times < start)
        test_rows = test & (times >= start) & (times < end)
        if test_rows.any():
            _, ours, own, multi = _gas_fits(uci, target, X, y, fit_rows, test_rows, seed, small)
            truth = y[test_rows]
            for key, values in (("ours", ours), ("own", own), ("all", multi), ("y", truth)):
                pooled[key].append(values)
            months.append(
                {
                    "month": month.strftime("%Y-%m"),
                    "rows": int(test_rows.sum()),
                    "mae_ours": float(np.mean(np.abs(ours - truth))),
                    "mae_linear_own_sensor": float(np.mean(np.abs(own - truth))),
                    "mae_linear_all_channels": float(np.mean(np.abs(multi - truth))),
                }
            )
        month = after
    truth = np.concatenate(pooled["y"])
    mae = {k: float(np.mean(np.abs(np.concatenate(v) - truth))) for k, v in pooled.items()}
    return {
        "months": months,
        "mae_ours": mae["ours"],
        "mae_linear_own_sensor": mae["own"],
        "mae_linear_all_channels": mae["all"],
        "mae_reduction_vs_linear_own_sensor": 1.0 - mae["ours"] / mae["own"],
        "mae_reduction_vs_linear_all_channels": 1.0 - mae["ours"] / mae["all"],
    }


def train_gas(uci: UciAirQuality, target: str, seed: int, *, small: bool = False) -> Fitted:
    kind, names = GAS_SETUP[target]
    X, y, train, test = gas_split(uci, target, small=small)
    model, predicted, single, multi = _gas_fits(uci, target, X, y, train, test, seed, small)
    ours = scores(predicted, y[test])
    base = scores(single, y[test])
    base_all = scores(multi, y[test])
    unit = "mg/m³" if target == "co" else "µg/m³"
    metrics = {
        "split": f"time: train before {UCI_SPLIT.date()}, test from it",
        "rows": {"train": int(train.sum()), "test": int(test.sum())},
        "ours": ours,
        "raw": "not applicable: metal-oxide responses are resistances, not concentrations",
        "linear_own_sensor_t_rh": base,
        "linear_all_channels": base_all,
        "mae_reduction_vs_linear_own_sensor": 1.0 - ours["mae"] / base["mae"],
        "mae_reduction_vs_linear_all_channels": 1.0 - ours["mae"] / base_all["mae"],
        # "at least 30% below a linear-regression baseline": met only when it holds
        # against both the usual single-sensor calibration and a fit on every channel
        "target_met": min(1.0 - ours["mae"] / base["mae"], 1.0 - ours["mae"] / base_all["mae"])
        >= 0.30,
        # not the target's split; tells whether training data of the test season helps
        "rolling_origin_monthly": rolling_origin(uci, target, (X, y, train, test), seed, small),
    }
    return Fitted(
        name=f"cal-{target}",
        target=target,
        unit=unit,
        estimator=model,
        features=names,
        X_test=X[test].astype(np.float32),
        y_test=y[test],
        metrics=metrics,
        data={"data_set": "uci_air_quality", "learner": kind},
    )


def pm25_feature_matrix(pa: PurpleAirColocation) -> NDArray[np.float32]:
    return np.stack(
        [
            pm25_features(float(p), float(h), float(t))
            for p, h, t in zip(pa.pa_cf1, pa.rh, pa.temperature, strict=True)
        ]
    )


def _pm_learner(seed: int, small: bool) -> Any:
    return _mlp((16, 8), 1e-2, 500 if small else 2000, seed)


def train_pm25(pa: PurpleAirColocation, seed: int, *, small: bool = False) -> Fitted:
    X = pm25_feature_matrix(pa)
    y = pa.reference
    epa = epa_purpleair_correction(pa.pa_cf1, pa.rh)
    # site split: every site held out once, trained on the others
    sites = sorted(set(pa.site.tolist()))
    if small:
        sites = sites[:4]
    per_site = []
    held_pred, held_epa, held_lin, held_y, held_raw = [], [], [], [], []
    for site in sites:
        test = pa.site == site
        model = fit(_pm_learner(seed, small), X[~test], y[~test])
        linear = LinearRegression().fit(X[~test][:, :2], y[~test])
        p = model.predict(X[test])
        held_pred.append(p)
        held_epa.append(epa[test])
        held_lin.append(linear.predict(X[test][:, :2]))
        held_y.append(y[test])
        held_raw.append(pa.pa_cf1[test])
        per_site.append(
            {
                "site": site,
                "rows": int(test.sum()),
                "mae_ours": float(np.mean(np.abs(p - y[test]))),
                "mae_epa": float(np.mean(np.abs(epa[test] - y[test]))),
            }
        )
    yy = np.concatenate(held_y)
    site_split = {
        "raw": scores(np.concatenate(held_raw), yy),
        "linear_pm_rh": scores(np.concatenate(held_lin), yy),
        "us_epa": scores(np.concatenate(held_epa), yy),
        "ours": scores(np.concatenate(held_pred), yy),
        "sites_better_than_epa": sum(s["mae_ours"] < s["mae_epa"] for s in per_site),
        "sites": len(per_site),
        "per_site": per_site,
    }
    # time split: the shipped model is the one trained on 2021-2022 only
    train = pa.day < PURPLEAIR_SPLIT
    model = fit(_pm_learner(seed, small), X[train], y[train])
    linear = LinearRegression().fit(X[train][:, :2], y[train])
    time_split = {
        "rows": {"train": int(train.sum()), "test": int((~train).sum())},
        "raw": scores(pa.pa_cf1[~train], y[~train]),
        "linear_pm_rh": scores(linear.predict(X[~train][:, :2]), y[~train]),
        "us_epa": scores(epa[~train], y[~train]),
        "ours": scores(model.predict(X[~train]), y[~train]),
    }
    metrics = {
        "split": "site: leave one site out (all 18); time: train 2021-2022, test 2023",
        "site_split": site_split,
        "time_split": time_split,
        "target_met": site_split["ours"]["mae"] < site_split["us_epa"]["mae"],
    }
    return Fitted(
        name="cal-pm25",
        target="pm25",
        unit="µg/m³",
        estimator=model,
        features=PM25_FEATURES,
        X_test=X[~train].astype(np.float32),
        y_test=y[~train],
        metrics=metrics,
        data={"data_set": "purpleair_aqs_colocation", "learner": "mlp"},
    )
