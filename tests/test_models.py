"""Edge models: training on a slice of the real data, ONNX parity, the runtime's
degradation, signed releases, smoke checks, rollback and staged rollout over Mosquitto."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper

from civicmesh import topics
from civicmesh.config import load_settings
from civicmesh.drivers import SampleBlock
from civicmesh.identity import Ed25519Signer
from civicmesh.metrics import Quality
from civicmesh.mqtt import MqttLink
from civicmesh.protocol import Reading, encode_model_release, open_batch
from edge.agent import EdgeAgent
from edge.errors import ModelError
from edge.features import FAULT_CLASSES, FAULT_FEATURES, PM25_FEATURES, stream_features
from edge.models import ModelRuntime, load_model
from edge.ota import ModelStore, ModelUpdater
from edge.settings import EdgeSettings
from edge.windowing import Windower
from training.cli import manifest_for, publish_release
from training.evaluate import evaluate_model
from training.faults import CLASS, MAX_FALSE_ALARMS, THRESHOLDS, Labelled, episodes
from training.pipeline import MAX_MODEL_BYTES, PARITY_TOLERANCE, build

pytestmark = pytest.mark.slow

T0 = 1_700_000_000_000
MINUTE = 60_000


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CI slice of `civicmesh models train --small`, once for this module."""
    out = tmp_path_factory.mktemp("models")
    for name in ("cal-co", "cal-no2", "cal-pm25", "fault"):
        build(name, out, seed=0, small=True)
    return out


def _pm_pair() -> tuple[
    NDArray[np.int64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]
]:
    """Two days of a PM2.5/PM10 pair every 2 min, swinging together with the weather:
    times, hours since the start, PM2.5, PM10."""
    times = T0 + np.arange(0, 48 * 60, 2, dtype=np.int64) * MINUTE
    hours = (times - T0) / 3_600_000
    rng = np.random.default_rng(3)
    pm25 = 6.0 + 4.0 * np.sin(hours / 3.0) + rng.normal(0, 0.3, len(times))  # weather
    pm10 = 1.6 * pm25 + rng.normal(0, 0.3, len(times))  # both channels move alike
    return times, hours, pm25, pm10


def test_drift_on_one_pm_channel_shows_in_the_ratio_features_not_in_common_swings() -> None:
    """A PM10 offset growing over 8 h moves the ratio and residual features; the same
    stream with both channels swinging together (weather) leaves them near zero."""
    times, hours, pm25, pm10 = _pm_pair()
    drift = np.clip((hours - 36.0) / 8.0, 0.0, 1.0) * 12.0  # 0 .. 12 µg/m³ from hour 36
    names = ("ratio_dev", "ratio_mid", "resid_fast", "ratio_z")
    cols = [FAULT_FEATURES.index(n) for n in names]
    clean = stream_features("pm10", times, pm10, 2 * MINUTE, pm25)[:, cols]
    drifted = stream_features("pm10", times, pm10 + drift, 2 * MINUTE, pm25)[:, cols]
    late = hours >= 42.0
    settled = hours >= 24.0
    for i, name in enumerate(names):
        swing = np.percentile(np.abs(clean[settled, i]), 95)
        assert np.median(drifted[late, i]) > 3 * swing, (name, swing)
    assert np.array_equal(clean[hours < 36.0], drifted[hours < 36.0])  # causal


def test_an_offset_drift_is_calm_for_its_level_a_real_rise_of_one_channel_is_not() -> None:
    """An offset grows the level, not the sample-to-sample noise: the wiggle features
    move. A real rise of PM10 alone (coarse dust: noise grows with the level) moves the
    ratio features just as much but leaves the wiggle features where they were."""
    times, hours, pm25, pm10 = _pm_pair()
    ramp = np.clip((hours - 36.0) / 8.0, 0.0, 1.0)
    names = ("wiggle_dev", "wiggle_mid")
    cols = [FAULT_FEATURES.index(n) for n in names]
    clean = stream_features("pm10", times, pm10, 2 * MINUTE, pm25)[:, cols]
    drifted = stream_features("pm10", times, pm10 + 12.0 * ramp, 2 * MINUTE, pm25)[:, cols]
    dusty = stream_features("pm10", times, pm10 * (1.0 + 1.2 * ramp), 2 * MINUTE, pm25)
    late, settled = hours >= 42.0, hours >= 24.0
    ratio = FAULT_FEATURES.index("ratio_dev")
    assert np.median(dusty[late, ratio]) > 0.3  # the ratio alone cannot tell them apart
    for i, name in enumerate(names):
        swing = np.percentile(np.abs(clean[settled, i]), 95)
        assert np.median(drifted[late, i]) < -2 * swing, (name, swing)
        assert abs(np.median(dusty[late, cols[i]])) < swing, (name, swing)


def test_pm25_above_its_pm10_is_flagged_on_both_channels_and_never_on_a_clean_pair() -> None:
    """An offset on PM2.5 lifts it over its own PM10 (impossible: PM2.5 is part of PM10)
    before the ratio features make much of it; both streams of the pair see it, a clean
    pair never does, and neither does a stream without a partner."""
    times, hours, pm25, pm10 = _pm_pair()
    offset = np.where(hours >= 36.0, 4.0, 0.0)  # PM2.5 reads 4 µg/m³ high from hour 36
    names = ("fine_above", "fine_above_1h", "fine_above_by")
    cols = [FAULT_FEATURES.index(n) for n in names]
    for metric, value, partner in (("pm25", pm25, pm10), ("pm10", pm10, pm25)):
        clean = stream_features(metric, times, value, 2 * MINUTE, partner)[:, cols]
        assert not clean.any(), metric
    drifted = pm25 + offset
    above = drifted > pm10 + 0.1
    assert 0.2 < above[hours >= 36.0].mean() < 1.0  # only where PM2.5 is low enough
    fine = stream_features("pm25", times, drifted, 2 * MINUTE, pm10)[:, cols]
    coarse = stream_features("pm10", times, pm10, 2 * MINUTE, drifted)[:, cols]
    for features in (fine, coarse):
        np.testing.assert_array_equal(features[:, 0], above.astype(np.float32))
        assert features[hours >= 36.0, 1].max() > 0.5 and not features[hours < 36.0, 1].any()
        assert np.all(features[~above, 2] == 0.0) and np.all(features[above, 2] > 0.0)
    alone = stream_features("pm25", times, drifted, 2 * MINUTE)[:, cols]
    assert not alone.any()


def test_drift_events_count_an_alarm_in_the_early_part_true_and_one_after_repair_false() -> None:
    """One injected drift over samples 10-29, scored (labelled) from 20; the sensor is
    repaired at 30. Alarms at 15-16 (before the label, inside the window) and at 25 hit
    the episode; an alarm at 40 (after the repair) is a false one."""
    n, drift = 50, CLASS["drift"]
    windows = np.zeros(n, dtype=np.int64)
    windows[10:30] = drift
    labels = np.zeros(n, dtype=np.int64)
    labels[20:30] = drift
    item = Labelled(
        "d", "pm10", T0 + np.arange(n, dtype=np.int64) * MINUTE,
        np.zeros((n, len(FAULT_FEATURES)), np.float32), labels, np.ones(n), np.zeros(n, bool),
        windows,
    )  # fmt: skip
    predicted = np.zeros(n, dtype=np.int64)
    predicted[[15, 16, 25, 40]] = drift
    view = episodes([item], [predicted], "drift")
    assert (view["episodes"], view["detected"]) == (1, 1)
    assert view["median_delay_h"] == pytest.approx(5 / 60)
    assert (view["alarms"], view["true_alarms"]) == (3, 2)
    assert view["event_f1"] == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))


def test_training_writes_onnx_that_matches_the_trained_model(trained: Path) -> None:
    for name in ("cal-co", "cal-no2", "cal-pm25", "fault"):
        card = json.loads((trained / name / "card.json").read_text())
        shipped = (trained / name / "model.onnx").read_bytes()
        fp32 = card["variants"]["fp32"]
        assert fp32["max_abs_diff_vs_trained"] <= PARITY_TOLERANCE, name
        assert len(shipped) <= MAX_MODEL_BYTES
        assert card["variants"][card["ships"]]["sha256"] == hashlib.sha256(shipped).hexdigest()
        assert (trained / name / "card.md").read_text().startswith(f"# Model card: {name}")
        assert card["operations"]["kind"] in ("tree ensemble", "multilayer perceptron")
    # calibration beats its baselines even on the slice
    co = json.loads((trained / "cal-co" / "card.json").read_text())["metrics"]
    assert co["ours"]["mae"] < co["linear_own_sensor_t_rh"]["mae"]
    pm = json.loads((trained / "cal-pm25" / "card.json").read_text())["metrics"]
    assert pm["site_split"]["ours"]["mae"] < pm["site_split"]["raw"]["mae"]
    # the alarm threshold: the highest whose out-of-fold false alarms stay under the bar
    fault = json.loads((trained / "fault" / "card.json").read_text())["metrics"]
    rates = {float(t): r for t, r in fault["false_alarms_out_of_fold"].items()}
    assert len(rates) == len(THRESHOLDS)
    under = [t for t, r in rates.items() if r <= MAX_FALSE_ALARMS]
    assert fault["threshold_p_ok"] == (max(under) if under else min(THRESHOLDS))


def test_evaluate_reproduces_the_card_from_the_artifact(trained: Path) -> None:
    for name in ("cal-no2", "fault"):
        result = evaluate_model(trained / name)
        assert result["max_diff_vs_card"] <= 1e-3, (name, result)


def test_int8_variant_is_reported_beside_fp32(trained: Path) -> None:
    card = json.loads((trained / "cal-no2" / "card.json").read_text())
    assert set(card["variants"]) == {"fp32", "int8"}
    assert card["ships"] in ("fp32", "int8") and card["why"]
    trees = json.loads((trained / "cal-co" / "card.json").read_text())
    assert set(trees["variants"]) == {"fp32"} and "tree" in trees["why"]


# ---------------------------------------------------------------- the runtime


def _release(
    trained: Path, name: str, version: str, key: Ed25519Signer, groups: list[str]
) -> bytes:
    manifest, artifact = manifest_for(trained / name, version, groups, "0.1.0")
    return encode_model_release(key, manifest, artifact)


def _updater(
    tmp_path: Path, key: Ed25519Signer, group: str = "pilot", sensor_types: tuple[str, ...] = ()
) -> tuple[ModelRuntime, ModelUpdater]:
    runtime = ModelRuntime(MINUTE, calibrate=("pm25",))
    updater = ModelUpdater(
        ModelStore(tmp_path / "models"),
        runtime,
        [key.verify_key()],
        group=group,
        sensor_types=sensor_types,
        agent_version="0.1.0",
    )
    return runtime, updater


def _windows(start: int, count: int, stuck_from: int | None = None) -> list[Reading]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(count):
        t = start + i * MINUTE
        pm25 = 6.0 + 3.0 * np.sin(i / 15) + float(rng.normal(0, 0.6))
        if stuck_from is not None and i >= stuck_from:
            pm25 = 7.3
        out += [
            Reading(t, "pm25", round(pm25, 1)),
            Reading(t, "pm10", round(pm25 * 1.6 + float(rng.normal(0, 0.5)), 1)),
            Reading(t, "temperature", 12.0),
            Reading(t, "relativehumidity", 70.0 + i % 5),
        ]
    return out


def test_without_models_readings_stay_raw_and_say_so(tmp_path: Path) -> None:
    runtime, _ = _updater(tmp_path, Ed25519Signer.generate())
    out = runtime.process(_windows(T0, 3))
    pm = [r for r in out if r.metric == "pm25"]
    assert all(r.quality & Quality.UNCALIBRATED and r.raw is None for r in pm)
    assert all(r.anomaly is None for r in out)
    assert not any(r.quality & Quality.UNCALIBRATED for r in out if r.metric != "pm25")


def test_models_calibrate_score_and_flag_a_stuck_sensor(trained: Path, tmp_path: Path) -> None:
    key = Ed25519Signer.generate()
    runtime, updater = _updater(tmp_path, key, sensor_types=("purpleair-pa-ii",))
    for name in ("fault", "cal-pm25"):
        event = updater.offer(_release(trained, name, "1.0.0", key, ["pilot"]))
        assert event.state == "installed", event
    out = runtime.process(_windows(T0, 120, stuck_from=80))
    pm = [r for r in out if r.metric == "pm25"]
    assert all(r.raw is not None and r.value != r.raw for r in pm)  # calibrated, raw kept
    assert all(r.anomaly is not None and 0.0 <= r.anomaly <= 1.0 for r in out)
    stuck = [r for r in pm[80:] if r.quality & Quality.STUCK]
    early = [r for r in pm[20:80] if r.quality & (Quality.STUCK | Quality.SPIKE | Quality.DRIFT)]
    assert len(stuck) >= 20 and len(early) <= 3  # the CI slice model; the first repeats look clean
    assert runtime.version_text() == "cal-pm25:1.0.0;fault:1.0.0"


def _constant_model(width: int, value: float, outputs: int) -> bytes:
    """A valid ONNX model whose outputs are all ``value`` (NaN or out of range)."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["features", "axes"], ["s"], keepdims=1),
            helper.make_node("Mul", ["s", "zero"], ["z"]),
            helper.make_node("Add", ["z", "value"], ["one"]),
            helper.make_node("Tile", ["one", "reps"], ["probabilities"]),
        ],
        "broken",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, outputs])],
        [
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("value", TensorProto.FLOAT, [], [value]),
            helper.make_tensor("reps", TensorProto.INT64, [2], [1, outputs]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _release_of(
    artifact: bytes, like: Path, version: str, key: Ed25519Signer, groups: list[str]
) -> bytes:
    manifest, _ = manifest_for(like, version, groups, "0.1.0")
    manifest.update(sha256=hashlib.sha256(artifact).hexdigest(), size=len(artifact))
    return encode_model_release(key, manifest, artifact)


def test_a_model_failing_its_smoke_check_is_rolled_back(trained: Path, tmp_path: Path) -> None:
    key = Ed25519Signer.generate()
    runtime, updater = _updater(tmp_path, key)
    assert updater.offer(_release(trained, "fault", "1.0.0", key, ["pilot"])).state == "installed"
    runtime.process(_windows(T0, 30))
    nan_model = _constant_model(len(FAULT_FEATURES), float("nan"), len(FAULT_CLASSES))
    event = updater.offer(_release_of(nan_model, trained / "fault", "1.1.0", key, ["pilot"]))
    assert event.state == "rolled_back" and "not finite" in event.reason
    assert runtime.version_text() == "fault:1.0.0"
    assert updater.store.active()["fault"]["version"] == "1.0.0"
    out = runtime.process(_windows(T0 + 30 * MINUTE, 5))
    assert all(r.anomaly is not None for r in out)  # the previous version still works


def test_a_calibration_out_of_range_fails_its_smoke_check(trained: Path, tmp_path: Path) -> None:
    key = Ed25519Signer.generate()
    runtime, updater = _updater(tmp_path, key, sensor_types=("purpleair-pa-ii",))
    wild = _constant_model(len(PM25_FEATURES), 2500.0, 1)  # pm25 is plausible up to 2000
    event = updater.offer(_release_of(wild, trained / "cal-pm25", "1.0.0", key, ["pilot"]))
    assert event.state == "rolled_back" and "plausible range" in event.reason
    assert runtime.models() == {}
    out = runtime.process(_windows(T0, 2))
    assert all(r.quality & Quality.UNCALIBRATED for r in out if r.metric == "pm25")


def test_a_model_failing_in_service_rolls_back_to_the_previous(
    trained: Path, tmp_path: Path
) -> None:
    key = Ed25519Signer.generate()
    runtime, updater = _updater(tmp_path, key, sensor_types=("purpleair-pa-ii",))
    for version in ("1.0.0", "2.0.0"):
        event = updater.offer(_release(trained, "cal-pm25", version, key, ["pilot"]))
        assert event.state == "installed"
    assert runtime.version_text() == "cal-pm25:2.0.0"
    model = runtime.models()["cal-pm25"]

    def broken(rows: Any) -> Any:
        raise ModelError("simulated accelerator failure")

    model.run = broken  # type: ignore[method-assign]
    out = runtime.process(_windows(T0, 1))
    # the failed window keeps its raw value and says why
    assert all(r.quality & Quality.MODEL_ERROR and r.raw is None for r in out if r.metric == "pm25")
    assert runtime.version_text() == "cal-pm25:1.0.0"
    assert updater.store.active()["cal-pm25"] == {"version": "1.0.0", "previous": None}
    assert updater.events[-1].state == "rolled_back"
    out = runtime.process(_windows(T0 + MINUTE, 2))
    assert all(r.raw is not None for r in out if r.metric == "pm25")


def test_tampered_foreign_or_unfit_releases_are_refused(trained: Path, tmp_path: Path) -> None:
    key, stranger = Ed25519Signer.generate(), Ed25519Signer.generate()
    runtime, updater = _updater(tmp_path, key)
    good = _release(trained, "fault", "1.0.0", key, ["pilot"])
    # flip one byte of the artifact (the tail of the message): hash mismatch
    tampered_artifact = good[:-10] + bytes([good[-10] ^ 1]) + good[-9:]
    assert "release.hash" in updater.offer(tampered_artifact).reason
    # change the manifest (the version) after signing: the signature fails
    tampered_manifest = good.replace(b'"version":"1.0.0"', b'"version":"9.0.0"')
    assert tampered_manifest != good
    assert "signature" in updater.offer(tampered_manifest).reason
    assert (
        "signature"
        in updater.offer(_release(trained, "fault", "1.0.0", stranger, ["pilot"])).reason
    )
    assert (
        "release.group" in updater.offer(_release(trained, "fault", "1.0.0", key, ["city"])).reason
    )
    pm = _release(trained, "cal-pm25", "1.0.0", key, ["pilot"])
    assert "release.sensor_type" in updater.offer(pm).reason
    manifest, artifact = manifest_for(trained / "fault", "1.0.0", ["pilot"], "99.0")
    assert (
        "release.agent_version"
        in updater.offer(encode_model_release(key, manifest, artifact)).reason
    )
    assert all(e.state == "refused" for e in updater.events)
    assert runtime.models() == {} and updater.store.active() == {}
    assert updater.offer(good).state == "installed"
    assert updater.offer(good).state == "ignored"  # the same version again


def test_a_model_file_tampered_on_disk_falls_back_at_start(trained: Path, tmp_path: Path) -> None:
    key = Ed25519Signer.generate()
    _, updater = _updater(tmp_path, key)
    assert updater.offer(_release(trained, "fault", "1.0.0", key, ["pilot"])).state == "installed"
    assert updater.offer(_release(trained, "fault", "1.1.0", key, ["pilot"])).state == "installed"
    path = updater.store.path("fault", "1.1.0")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    runtime2, updater2 = _updater(tmp_path, key)
    updater2.load_active()
    assert runtime2.version_text() == "fault:1.0.0"
    assert updater2.store.active()["fault"]["version"] == "1.0.0"


def test_loading_a_broken_artifact_is_a_model_error_not_a_crash(trained: Path) -> None:
    manifest, _ = manifest_for(trained / "fault", "1.0.0", ["pilot"], "0.1.0")
    with pytest.raises(ModelError, match="does not load"):
        load_model(manifest, b"not an onnx model")


# ------------------------------------------------------- staged rollout, real broker


class PmDriver:
    """An optical PM sensor with a humidity/temperature neighbour, one sample a minute."""

    metrics = ("pm25", "pm10", "temperature", "relativehumidity")
    sample_interval_ms = MINUTE

    def __init__(self) -> None:
        self.cursor = T0

    def read(self, until_ms: int) -> list[SampleBlock]:
        times = np.arange(self.cursor, until_ms, MINUTE, dtype=np.int64)
        if len(times) == 0:
            return []
        self.cursor = int(times[-1]) + MINUTE
        i = (times - T0) / MINUTE
        pm25 = 8.0 + 4.0 * np.sin(i / 30.0)
        return [
            SampleBlock("pm25", times, pm25),
            SampleBlock("pm10", times, pm25 * 1.7),
            SampleBlock("temperature", times, 10.0 + 0 * i),
            SampleBlock("relativehumidity", times, 75.0 + 0 * i),
        ]

    def close(self) -> None:
        pass


def _agent(
    tmp_path: Path, url: str, name: str, group: str, key: Ed25519Signer, *, connect: bool = True
) -> EdgeAgent:
    settings = load_settings(
        EdgeSettings,
        None,
        {
            "key_file": str(tmp_path / f"{name}.key"),
            "state_dir": str(tmp_path / name),
            "mqtt": {"url": url},
            "driver": {"name": "test"},
            "await_receipts": False,
            "models": {
                "enabled": True,
                "group": group,
                "sensor_types": ["purpleair-pa-ii"],
                "release_keys": [key.verify_key().to_text()],
                "calibrate": ["pm25"],
            },
        },
    )
    signer = Ed25519Signer.generate()
    link = MqttLink(url, f"t-models-{name}-{signer.key_id}")
    agent = EdgeAgent(settings, signer, PmDriver(), link if connect else None)  # type: ignore[arg-type]
    if connect:
        link.connect()
    return agent


@pytest.fixture
def rollout_group() -> Iterator[str]:
    """A group name of this test run; its retained releases are cleared afterwards."""
    group = f"pilot-{int(time.time() * 1000) % 10**9}"
    yield group


@pytest.mark.integration
def test_staged_rollout_reaches_one_group_and_leaves_the_other(
    trained: Path, tmp_path: Path, system_mqtt_url: str, rollout_group: str
) -> None:
    key = Ed25519Signer.generate()
    other_group = f"{rollout_group}-city"
    pilot = _agent(tmp_path, system_mqtt_url, "pilot", rollout_group, key)
    city = _agent(tmp_path, system_mqtt_url, "city", other_group, key)
    release_link = MqttLink(system_mqtt_url, f"t-release-{key.key_id}")
    release_link.connect()
    try:
        for name in ("fault", "cal-pm25"):
            manifest, artifact = manifest_for(trained / name, "1.0.0", [rollout_group], "0.1.0")
            message = encode_model_release(key, manifest, artifact)
            publish_release(release_link, message, name, [rollout_group])
        deadline = time.monotonic() + 15
        now = T0 + 5 * MINUTE
        while time.monotonic() < deadline and pilot.model_version != "cal-pm25:1.0.0;fault:1.0.0":
            now += MINUTE
            pilot.collect(now)
            city.collect(now)
            time.sleep(0.1)
        assert pilot.model_version == "cal-pm25:1.0.0;fault:1.0.0"
        city.collect(now)
        assert city.model_version == "" and city.updater is not None
        assert city.updater.store.active() == {} and city.updater.events == []
        # the pilot's next batch says which models made its readings; the city's says none
        pilot.collect(now + 10 * MINUTE)
        city.collect(now + 10 * MINUTE)
        for agent, expected in ((pilot, "cal-pm25:1.0.0;fault:1.0.0"), (city, "")):
            assert agent.seal_all() >= 1
            batch = agent.outbox.unsent(1000)[-1][1]
            payload = open_batch(batch, {agent.device_id: agent.signer.verify_key()}.get).payload
            assert payload.model_version == expected
            last = [r for r in payload.readings if r.metric == "pm25"][-1]
            if expected:
                assert last.raw is not None and last.anomaly is not None
            else:
                assert last.raw is None and last.quality & Quality.UNCALIBRATED
        health = pilot.health()
        assert health["models"]["loaded"]["fault"]["version"] == "1.0.0"
        assert health["models"]["group"] == rollout_group
        assert city.health()["models"]["active"] == {}
    finally:
        for name in ("fault", "cal-pm25"):
            release_link.publish(topics.model_release(rollout_group, name), b"", retain=True)
        release_link.close()
        for agent in (pilot, city):
            if agent.link is not None:
                agent.link.close()
            agent.close()


def test_gas_calibration_on_the_device_reproduces_the_held_out_error(
    trained: Path, tmp_path: Path
) -> None:
    """The UCI recording replayed through driver -> windows -> runtime: the on-device CO
    and NO2 match the model card's held-out MAE (same features, same split)."""
    from firmware_sim.replay_uci import UciReplayDriver, load_uci_file
    from training.calibration import UCI_SPLIT
    from training.datasets import uci_file

    key = Ed25519Signer.generate()
    runtime = ModelRuntime(3_600_000)
    updater = ModelUpdater(
        ModelStore(tmp_path / "models"),
        runtime,
        [key.verify_key()],
        group="pilot",
        sensor_types=("uci-mox-5",),
        agent_version="0.1.0",
    )
    for name in ("cal-co", "cal-no2"):
        assert updater.offer(_release(trained, name, "1.0.0", key, ["pilot"])).state == "installed"
    driver = UciReplayDriver(str(uci_file()))
    windower = Windower(3_600_000, 1)
    recording = load_uci_file(uci_file())
    out: list[Reading] = []
    end = int(recording.times_ms[-1]) + 3_600_000
    for until in range(int(recording.times_ms[0]), end + 7 * 86_400_000, 7 * 86_400_000):
        readings = windower.feed(driver.read(until), until)
        out += runtime.process(readings, windower.take_raw())
    split = int(UCI_SPLIT.timestamp() * 1000)
    for metric, reference in (("co", recording.co), ("no2", recording.no2)):
        truth = dict(zip(recording.times_ms.tolist(), reference.tolist(), strict=True))
        pairs = [
            (r.value, truth[r.ts_ms])
            for r in out
            if r.metric == metric and r.ts_ms >= split and not np.isnan(truth[r.ts_ms])
        ]
        mae = float(np.mean([abs(a - b) for a, b in pairs]))
        card = json.loads((trained / f"cal-{metric}" / "card.json").read_text())
        expected = card["variants"][card["ships"]]["error"]
        assert abs(mae - expected) <= 1e-3 * max(expected, 1.0), (metric, mae, expected)
        assert len(pairs) == card["metrics"]["rows"]["test"]


def test_a_gas_model_refuses_an_agent_with_other_windows(trained: Path, tmp_path: Path) -> None:
    key = Ed25519Signer.generate()
    _, updater = _updater(tmp_path, key, sensor_types=("uci-mox-5",))
    event = updater.offer(_release(trained, "cal-co", "1.0.0", key, ["pilot"]))
    assert event.state == "refused" and "3600 s windows" in event.reason


def test_health_with_models_fits_a_health_message(trained: Path, tmp_path: Path) -> None:
    from civicmesh.health import MAX_HEALTH_BYTES, from_agent

    key = Ed25519Signer.generate()
    agent = _agent(tmp_path, "mqtt://127.0.0.1:1", "health", "pilot", key, connect=False)
    try:
        assert agent.updater is not None
        for name in ("fault", "cal-pm25"):
            agent.updater.offer(_release(trained, name, "1.0.0", key, ["pilot"]))
        for _ in range(8):  # a run of refusals with long reasons
            agent.updater.offer(b"x" * 300)
        agent.collect(T0 + 30 * MINUTE)
        payload = json.dumps(agent.health()).encode()
        assert len(payload) <= MAX_HEALTH_BYTES
        report = from_agent(payload, agent.device_id, "gw", T0)
        assert report.model_version == "cal-pm25:1.0.0;fault:1.0.0"
    finally:
        if agent.link is not None:
            agent.link.close()
        agent.close()


@pytest.mark.integration
def test_cli_keygen_release_and_list(
    trained: Path, tmp_path: Path, system_mqtt_url: str, rollout_group: str, capsys: Any
) -> None:
    from civicmesh.cli import main

    key_file = tmp_path / "release.key"
    assert main(["models", "keygen", "--key", str(key_file)]) == 0
    public = capsys.readouterr().out.strip().rsplit(" ", 1)[-1]
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    out = tmp_path / "fault.release"
    args = ["models", "release", str(trained / "fault"), "--version", "2.1.0"]
    args += ["--key", str(key_file), "--group", rollout_group, "--out", str(out)]
    assert main([*args, "--mqtt-url", system_mqtt_url]) == 0
    try:
        key = Ed25519Signer.load(key_file)
        assert key.verify_key().to_text() == public
        _, updater = _updater(tmp_path, key, group=rollout_group)
        assert updater.offer(out.read_bytes()).state == "installed"
        capsys.readouterr()
        listing = ["models", "list", str(trained), "--mqtt-url", system_mqtt_url]
        assert main(listing) == 0
        printed = capsys.readouterr().out
        assert "fault: F1" in printed  # the local artifact's card
        assert f"models/{rollout_group}/fault: fault 2.1.0 groups={rollout_group}" in printed
    finally:
        link = MqttLink(system_mqtt_url, f"t-clear-{rollout_group}")
        link.connect()
        link.publish(topics.model_release(rollout_group, "fault"), b"", retain=True)
        link.close()
