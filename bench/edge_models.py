"""Edge models on this machine: inference per window, feature cost, agent peak RSS, sizes.

Baselines measured in the same run: the agent's own windowing of one window (the work
a device does per window without models), and the same agent's peak RSS with models off.
Figures are x86 (this machine); each model card gives the operation count per row, to
scale them to a Raspberry Pi.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HOUR_MS = 3_600_000
T0 = 1_700_000_000_000


def _median_us(fn: Any, repeat: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000.0


def _windows(n: int) -> list[Any]:
    from civicmesh.protocol import Reading

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t = T0 + i * 60_000
        pm = 6.0 + 3.0 * np.sin(i / 15) + float(rng.normal(0, 0.5))
        out.append(
            [
                Reading(t, "pm25", pm),
                Reading(t, "pm10", pm * 1.6),
                Reading(t, "temperature", 12.0),
                Reading(t, "relativehumidity", 70.0),
            ]
        )
    return out


def inference(models_dir: Path) -> dict[str, Any]:
    """Per model: median latency of one window's inference (one thread), next to the
    windowing of that window; plus the whole runtime per window (features + models)."""
    from civicmesh.drivers import SampleBlock
    from edge.features import FAULT_FEATURES, StreamFeatures
    from edge.models import ModelRuntime, load_model
    from edge.windowing import Windower

    times = np.arange(T0, T0 + 60_000, 1_000, dtype=np.int64)
    blocks = [
        SampleBlock(m, times, np.full(len(times), 5.0))  # type: ignore[arg-type]
        for m in ("pm25", "pm10", "temperature", "relativehumidity")
    ]

    def window_once() -> None:
        Windower(60_000, 60).feed(blocks, T0 + 60_000)

    windowing_us = _median_us(window_once, 2000)
    results: dict[str, Any] = {"windowing_us": windowing_us, "models": {}}
    for card_path in sorted(models_dir.glob("*/card.json")):
        card = json.loads(card_path.read_text())
        manifest = {"name": card["name"], "version": "0", "runtime": card["runtime"]}
        model = load_model(manifest, (card_path.parent / "model.onnx").read_bytes())
        rows_per_window = 4 if card["name"] == "fault" else 1
        width = len(card["runtime"]["features"])
        rows = np.random.default_rng(1).normal(size=(rows_per_window, width)).astype(np.float32)
        us = _median_us(lambda m=model, r=rows: m.run(r), 3000)
        results["models"][card["name"]] = {
            "rows_per_window": rows_per_window,
            "inference_us_median": us,
            "vs_windowing": us / windowing_us,
            "bytes": card["variants"][card["ships"]]["bytes"],
            "variant": card["ships"],
            "operations": card["operations"],
        }
    stream = StreamFeatures("pm25", 60_000)
    state = {"i": 0}

    def features_once() -> None:
        state["i"] += 1
        stream.update(T0 + state["i"] * 60_000, 5.0 + state["i"] % 3, 8.0)

    results["stream_features_us_per_metric"] = _median_us(features_once, 5000)
    results["stream_features"] = len(FAULT_FEATURES)
    # the whole runtime on a PM device's window: 4 streams of features, fault model, pm25
    runtime = ModelRuntime(60_000, ("pm25",))
    for name in ("fault", "cal-pm25"):
        card = json.loads((models_dir / name / "card.json").read_text())
        manifest = {"name": name, "version": "0", "runtime": card["runtime"]}
        runtime.install(load_model(manifest, (models_dir / name / "model.onnx").read_bytes()))
    windows = _windows(3000)
    state["w"] = 0

    def runtime_once() -> None:
        runtime.process(windows[state["w"] % len(windows)])
        state["w"] += 1

    results["runtime_per_window_us"] = _median_us(runtime_once, 2000)
    return results


DEVICES: dict[str, tuple[str, ...]] = {
    "without_models": (),
    "pm_device": ("fault", "cal-pm25"),
    "gas_device": ("fault", "cal-co", "cal-no2"),
    "with_models": ("fault", "cal-pm25", "cal-co", "cal-no2"),  # both boards on one agent
}


def _child(models_dir: str, names: tuple[str, ...]) -> None:
    """Runs in a fresh process: an agent through 7 days of hourly windows, then VmHWM."""
    from civicmesh.config import load_settings
    from civicmesh.identity import Ed25519Signer
    from civicmesh.protocol import encode_model_release
    from edge.app import build
    from edge.settings import EdgeSettings
    from firmware_sim.replay_uci import UciReplayDriver
    from training.cli import manifest_for
    from training.datasets import uci_file

    class Device:
        """The UCI gas sensors plus a PM sensor and its neighbours, one minute a sample."""

        def __init__(self) -> None:
            self.gas = UciReplayDriver(str(uci_file()), start_ms=T0)
            self.cursor = T0

        metrics = ("pm25", "pm10", "mox_s1")
        sample_interval_ms = 60_000

        def read(self, until_ms: int) -> list[Any]:
            from civicmesh.drivers import SampleBlock

            blocks = self.gas.read(until_ms)
            times = np.arange(self.cursor, until_ms, 60_000, dtype=np.int64)
            if len(times):
                self.cursor = int(times[-1]) + 60_000
                pm = 6.0 + 3.0 * np.sin((times - T0) / 3.6e6)
                blocks += [SampleBlock("pm25", times, pm), SampleBlock("pm10", times, pm * 1.6)]  # type: ignore[arg-type]
            return blocks

        def close(self) -> None:
            pass

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key = Ed25519Signer.generate()
        installs = []
        for name in names:
            manifest, artifact = manifest_for(Path(models_dir) / name, "1.0.0", ["g"], "0.1.0")
            path = tmp / f"{name}.release"
            path.write_bytes(encode_model_release(key, manifest, artifact))
            installs.append(str(path))
        settings = load_settings(
            EdgeSettings,
            None,
            {
                "key_file": str(tmp / "k"),
                "state_dir": str(tmp / "state"),
                "driver": {"name": "bench"},
                "window_s": 3600,
                "await_receipts": False,
                "models": {
                    "enabled": bool(names),
                    "group": "g",
                    "sensor_types": ["purpleair-pa-ii", "uci-mox-5"],
                    "release_keys": [key.verify_key().to_text()],
                    "calibrate": ["pm25"],
                    "install": installs,
                },
            },
        )
        # built as `civicmesh edge run` builds it, without a broker
        agent = build(settings, signer=Ed25519Signer.generate(), driver=Device(), link=None).agent
        loaded = agent.model_version
        start = time.perf_counter()
        agent.backfill(T0, T0 + 7 * 24 * HOUR_MS, step_ms=6 * HOUR_MS)
        elapsed = time.perf_counter() - start
        stats = agent.outbox.stats()
        agent.close()
    status = Path("/proc/self/status").read_text()
    hwm_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    print(
        json.dumps(
            {
                "peak_rss_mb": hwm_kb / 1024,
                "models": loaded,
                "seconds": elapsed,
                "sealed": stats.sealed_batches,
            }
        )
    )


def peak_rss(models_dir: Path) -> dict[str, Any]:
    out = {}
    for device, names in DEVICES.items():
        result = subprocess.run(
            [sys.executable, "-m", "bench.edge_models", str(models_dir), ",".join(names)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[device] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def run(models_dir: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """Train (unless ``models_dir`` has artifacts), then measure."""
    with tempfile.TemporaryDirectory(prefix="civicmesh-bench-models-") as tmp_name:
        if models_dir is None:
            from training.pipeline import MODELS, build

            models_dir = Path(tmp_name)
            for name in MODELS:
                build(name, models_dir, seed=0, small=quick)
        result = inference(models_dir)
        result["rss"] = peak_rss(models_dir)
        return result


if __name__ == "__main__":
    _child(sys.argv[1], tuple(n for n in sys.argv[2].split(",") if n))
