"""On-device models: ONNX Runtime sessions behind one interface, applied to each window.

Every reading leaves with its raw value, its calibrated value (``value``), an anomaly
score, quality flags and, through the batch, the versions of the models that made them.
Models are optional per device. A missing, broken or failing model never stops the
agent: its readings keep their raw values and carry ``UNCALIBRATED`` or ``MODEL_ERROR``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import importlib.util
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from civicmesh.metrics import BY_NAME, Quality
from civicmesh.protocol import Reading
from edge.errors import ModelError
from edge.features import (
    FAULT_CLASSES,
    FAULT_FEATURES,
    GAS_FEATURES,
    MOX_CHANNELS,
    PARTNERS,
    PM25_FEATURES,
    GasFeatures,
    StreamFeatures,
    decide,
    pm25_features,
)

log = logging.getLogger(__name__)

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "stream-v4": FAULT_FEATURES,
    "pm25-v1": PM25_FEATURES,
    "gas-v1": GAS_FEATURES,
}
FLAG_OF_CLASS: dict[str, Quality] = {
    "stuck": Quality.STUCK,
    "spike": Quality.SPIKE,
    "drift": Quality.DRIFT,
    "dropout": Quality.GAP,
    "out_of_range": Quality.OUT_OF_RANGE,
}
RECENT_ROWS = 64  # feature rows kept per model for the smoke check of a new version


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime needs to know of a model: from its signed release manifest."""

    name: str
    version: str
    kind: str  # "calibration" or "fault"
    feature_set: str
    target_metric: str = "*"
    classes: tuple[str, ...] = ()
    threshold: float = 0.5
    features: tuple[str, ...] = ()  # the columns of the feature set the model takes
    window_ms: int | None = None  # the window length it was trained on, if it matters

    @property
    def columns(self) -> list[int]:
        full = FEATURE_SETS[self.feature_set]
        return [full.index(name) for name in self.features]

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ModelSpec:
        runtime = manifest.get("runtime", {})
        try:
            spec = cls(
                name=str(manifest["name"]),
                version=str(manifest["version"]),
                kind=str(runtime["kind"]),
                feature_set=str(runtime["feature_set"]),
                target_metric=str(runtime.get("target_metric", "*")),
                classes=tuple(runtime.get("classes") or ()),
                threshold=float(runtime.get("threshold") or 0.5),
                features=tuple(runtime.get("features") or ()),
                window_ms=int(runtime["window_s"]) * 1000 if runtime.get("window_s") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model manifest lacks a usable runtime block: {exc}") from None
        if spec.kind not in ("calibration", "fault"):
            raise ModelError(f"model {spec.name}: unknown kind {spec.kind!r}")
        if spec.kind == "fault" and spec.classes != FAULT_CLASSES:
            raise ModelError(f"model {spec.name}: classes {spec.classes} are not this agent's")
        if spec.kind == "calibration" and spec.target_metric not in BY_NAME:
            raise ModelError(f"model {spec.name}: unknown target metric {spec.target_metric!r}")
        full = FEATURE_SETS.get(spec.feature_set)
        if full is None:
            raise ModelError(
                f"model {spec.name}: this agent has no feature set {spec.feature_set!r}"
            )
        unknown = [f for f in spec.features if f not in full]
        if unknown or not spec.features:
            raise ModelError(
                f"model {spec.name}: features {unknown or '[]'} not in {spec.feature_set}"
            )
        return spec


class Model(Protocol):
    """A loaded model: rows of features in, one row of outputs per input row out."""

    spec: ModelSpec

    def run(self, rows: NDArray[np.float32]) -> NDArray[np.float32]: ...


class OnnxModel:
    """An ONNX Runtime session on one thread (the device runs other work beside it)."""

    def __init__(self, spec: ModelSpec, artifact: bytes) -> None:
        self.spec = spec
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError(f"onnxruntime is not installed: {exc}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # tiny models: the default arena pre-allocates far more than they ever use
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        try:
            self._session = ort.InferenceSession(
                artifact, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"model {spec.name} {spec.version} does not load: {exc}") from None
        finally:
            _return_freed_memory()
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"model {spec.name}: expected one input, found {len(inputs)}")
        self._input = inputs[0].name
        width = inputs[0].shape[-1]
        expected = len(spec.features)
        if isinstance(width, int) and width != expected:
            raise ModelError(
                f"model {spec.name}: takes {width} features, its manifest names {expected}"
            )

    def run(self, rows: NDArray[np.float32]) -> NDArray[np.float32]:
        try:
            outputs = self._session.run(None, {self._input: rows})
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"model {self.spec.name} failed: {exc}") from None
        result = outputs[-1] if len(outputs) > 1 else outputs[0]
        return np.asarray(result, dtype=np.float32).reshape(len(rows), -1)


def onnxruntime_available() -> bool:
    """False where onnxruntime is not installed (it has no wheel for 32-bit ARM)."""
    return importlib.util.find_spec("onnxruntime") is not None


# Loaders by artifact format; tests and other runtimes register through the same table.
LOADERS: dict[str, Callable[[ModelSpec, bytes], Model]] = {"onnx": OnnxModel}


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (find_library runs ldconfig)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def _return_freed_memory() -> None:
    """Give the heap pages freed while a session was built back to the system: building
    one parses the whole model, and glibc keeps what was freed. With the four models an
    agent held 99.6 MB resident before this, 95.9 MB after. Elsewhere than glibc, nothing
    to do."""
    with contextlib.suppress(AttributeError):
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)


def load_model(manifest: dict[str, Any], artifact: bytes) -> Model:
    spec = ModelSpec.from_manifest(manifest)
    loader = LOADERS.get(str(manifest.get("format", "onnx")))
    if loader is None:
        raise ModelError(f"model {spec.name}: no loader for format {manifest.get('format')!r}")
    return loader(spec, artifact)


def check_outputs(spec: ModelSpec, outputs: NDArray[np.float32], rows: int) -> str | None:
    """Why these outputs are unusable, or None: the smoke check of every call."""
    width = len(spec.classes) if spec.kind == "fault" else 1
    if outputs.shape != (rows, width):
        return f"output shape {outputs.shape}, expected {(rows, width)}"
    if not np.all(np.isfinite(outputs)):
        return "output not finite"
    if spec.kind == "fault":
        if np.any(outputs < -1e-4) or np.any(outputs > 1 + 1e-4):
            return "probabilities outside [0, 1]"
        if np.any(np.abs(outputs.sum(axis=1) - 1.0) > 1e-3):
            return "probabilities do not sum to 1"
    else:
        info = BY_NAME[spec.target_metric]
        # a calibrated value may sit a little below 0 (noise at clean air), never far out
        if np.any(outputs < info.minimum - 10.0) or np.any(outputs > info.maximum):
            return f"calibrated {spec.target_metric} outside its plausible range"
    return None


@dataclass
class ModelStats:
    windows: int = 0
    errors: int = 0
    last_error: str = ""
    run_us: deque[float] = field(default_factory=lambda: deque(maxlen=1000))


class ModelRuntime:
    """Applies the device's models to the readings of each window.

    ``calibrate`` names the metrics this device expects a calibration model for: while
    none works, their readings carry ``UNCALIBRATED``. The fault model scores every
    stream; its flags and anomaly score join the windowing's own flags.
    """

    def __init__(self, interval_ms: int, calibrate: Iterable[str] = ()) -> None:
        self.interval_ms = interval_ms
        self.calibrate = frozenset(calibrate)
        self._lock = threading.Lock()
        self._models: dict[str, Model] = {}
        self._streams: dict[str, StreamFeatures] = {}
        self._gas = GasFeatures()
        self.recent: dict[str, deque[NDArray[np.float32]]] = {}
        self.stats: dict[str, ModelStats] = {}
        self.on_failure: Callable[[str, str], None] | None = None

    # ---- the set of models -----------------------------------------------------

    def refusal(self, spec: ModelSpec) -> str | None:
        """Why this agent cannot run a model of this spec, or None."""
        if spec.window_ms is not None and spec.window_ms != self.interval_ms:
            return (
                f"trained on {spec.window_ms // 1000} s windows; this agent windows "
                f"{self.interval_ms // 1000} s (set window_s)"
            )
        return None

    def install(self, model: Model) -> Model | None:
        """Swap in ``model`` (atomically for the windows); returns the one it replaces."""
        problem = self.refusal(model.spec)
        if problem is not None:
            raise ModelError(f"model {model.spec.name}: {problem}")
        with self._lock:
            previous = self._models.get(model.spec.name)
            self._models[model.spec.name] = model
            self.stats[model.spec.name] = ModelStats()
        return previous

    def remove(self, name: str) -> None:
        with self._lock:
            self._models.pop(name, None)

    def models(self) -> dict[str, Model]:
        with self._lock:
            return dict(self._models)

    def version_text(self) -> str:
        """``name:version`` of the loaded models, for batches (at most 64 characters)."""
        text = ";".join(f"{n}:{m.spec.version}" for n, m in sorted(self.models().items()))
        return text[:64]

    # ---- per window ------------------------------------------------------------

    def process(
        self, readings: list[Reading], raw: dict[int, dict[str, float]] | None = None
    ) -> list[Reading]:
        """The readings with calibration, anomaly scores and flags applied, plus the
        readings gas models make from raw channels (``raw``: window start -> means)."""
        raw = raw or {}
        if not readings and not raw:
            return readings
        models = self.models()
        by_window: dict[int, list[int]] = {}
        for i, reading in enumerate(readings):
            by_window.setdefault(reading.ts_ms, []).append(i)
        out = list(readings)
        for indices in by_window.values():
            self._window(out, indices, models)
        made: list[Reading] = []
        for ts in sorted(raw):
            values = {out[i].metric: out[i].raw or out[i].value for i in by_window.get(ts, [])}
            made += self._from_raw(ts, raw[ts], values, models)
        if made:
            out = sorted(out + made, key=lambda r: (r.ts_ms, BY_NAME[r.metric].code))
        return out

    def _from_raw(
        self,
        ts: int,
        channels: dict[str, float],
        values: dict[str, float],
        models: dict[str, Model],
    ) -> list[Reading]:
        """Gas readings from the metal-oxide channels of one window."""
        try:
            mox = tuple(channels[c] for c in MOX_CHANNELS)
            inputs = (values["temperature"], values["relativehumidity"], channels["abs_humidity"])
        except KeyError:
            return []  # not a gas device, or a channel missing in this window
        features = self._gas.update(ts, mox, *inputs)
        made = []
        for model in models.values():
            if model.spec.feature_set != "gas-v1":
                continue
            result = self._run(model, features[None, :])
            if result is not None:
                made.append(Reading(ts, model.spec.target_metric, float(result[0, 0])))
        return made

    def _window(self, out: list[Reading], indices: list[int], models: dict[str, Model]) -> None:
        values = {out[i].metric: out[i].value for i in indices}
        fault = next((m for m in models.values() if m.spec.kind == "fault"), None)
        # fault features are computed whether or not a model is loaded: a model that
        # arrives later then starts with warm state
        rows = []
        for i in indices:
            reading = out[i]
            stream = self._streams.get(reading.metric)
            if stream is None:
                stream = self._streams[reading.metric] = StreamFeatures(
                    reading.metric, self.interval_ms
                )
            partner = values.get(PARTNERS.get(reading.metric, ""))
            rows.append(stream.update(reading.ts_ms, reading.value, partner))
        if fault is not None:
            matrix = np.stack(rows)
            probabilities = self._run(fault, matrix)
            if probabilities is None:
                for i in indices:
                    out[i] = replace(out[i], quality=out[i].quality | Quality.MODEL_ERROR)
            else:
                classes = decide(probabilities, matrix, fault.spec.threshold)
                for row, i in enumerate(indices):
                    flag = FLAG_OF_CLASS.get(FAULT_CLASSES[int(classes[row])], Quality.OK)
                    anomaly = round(1.0 - float(probabilities[row, 0]), 4)
                    out[i] = replace(out[i], quality=out[i].quality | flag, anomaly=anomaly)
        calibrators = {
            m.spec.target_metric: m for m in models.values() if m.spec.kind == "calibration"
        }
        for i in indices:
            reading = out[i]
            model = calibrators.get(reading.metric)
            if model is None:
                if reading.metric in self.calibrate:
                    out[i] = replace(reading, quality=reading.quality | Quality.UNCALIBRATED)
                continue
            features = self._calibration_row(model.spec, reading, values)
            result = None if features is None else self._run(model, features[None, :])
            if result is None:
                flags = Quality.UNCALIBRATED | (
                    Quality.MODEL_ERROR if features is not None else Quality.OK
                )
                out[i] = replace(reading, quality=reading.quality | flags)
            else:
                out[i] = replace(reading, value=float(result[0, 0]), raw=reading.value)

    def _calibration_row(
        self, spec: ModelSpec, reading: Reading, values: dict[str, float]
    ) -> NDArray[np.float32] | None:
        if spec.feature_set == "pm25-v1":
            rh, temperature = values.get("relativehumidity"), values.get("temperature")
            if rh is None or temperature is None or not math.isfinite(reading.value):
                return None  # the window lacks an input: the reading stays raw
            return pm25_features(reading.value, rh, temperature)
        return None

    def _run(self, model: Model, full: NDArray[np.float32]) -> NDArray[np.float32] | None:
        """Run ``model`` on rows of its whole feature set; None when it failed."""
        stats = self.stats.setdefault(model.spec.name, ModelStats())
        stats.windows += 1
        recent = self.recent.setdefault(model.spec.name, deque(maxlen=RECENT_ROWS))
        recent.extend(full)
        rows = np.ascontiguousarray(full[:, model.spec.columns])
        start = time.perf_counter()
        try:
            outputs = model.run(rows)
            problem = check_outputs(model.spec, outputs, len(rows))
        except ModelError as exc:
            outputs, problem = None, str(exc)
        stats.run_us.append((time.perf_counter() - start) * 1e6)
        if problem is None:
            return outputs
        stats.errors += 1
        stats.last_error = problem
        log.warning("model %s %s: %s", model.spec.name, model.spec.version, problem)
        if self.on_failure is not None:
            self.on_failure(model.spec.name, problem)
        return None

    def smoke_rows(self, spec: ModelSpec) -> NDArray[np.float32]:
        """The recent rows (of the whole feature set) a new version is checked on."""
        recent = self.recent.get(spec.name)
        if recent:
            return np.stack(list(recent))[:, spec.columns]
        return self._quiet_rows(spec)[:, spec.columns]

    def _quiet_rows(self, spec: ModelSpec) -> NDArray[np.float32]:
        """Nothing seen yet (a fresh device): the features of quiet, valid windows."""
        if spec.feature_set == "pm25-v1":
            return np.stack([pm25_features(x, 60.0, 15.0) for x in (2.0, 8.0, 25.0, 60.0)])
        if spec.feature_set == "gas-v1":
            gas = GasFeatures()
            mox = (1050.0, 900.0, 850.0, 1500.0, 1000.0)
            return np.stack(
                [
                    gas.update(
                        h * 3_600_000,
                        tuple(m * (1 + 0.05 * (h % 5)) for m in mox),
                        15.0,
                        50.0,
                        0.85,
                    )
                    for h in range(24)
                ]
            )
        stream = StreamFeatures("pm25" if spec.kind == "fault" else spec.target_metric, 60_000)
        return np.stack([stream.update(i * 60_000, 5.0 + (i % 3), 8.0) for i in range(RECENT_ROWS)])

    def health(self) -> dict[str, Any]:
        out = {}
        for name, model in self.models().items():
            stats = self.stats.get(name, ModelStats())
            runs = sorted(stats.run_us)
            out[name] = {
                "version": model.spec.version,
                "windows": stats.windows,
                "errors": stats.errors,
                "last_error": stats.last_error,
                "run_us_median": round(runs[len(runs) // 2], 1) if runs else None,
            }
        return out
