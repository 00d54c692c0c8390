"""Fault injection on sample arrays: stuck, spike, drift, dropout, noise.

Array in, array out, and independent of the simulated city, so the same injector can
corrupt real recordings (e.g. to train and test fault detection). Randomness (spike
positions, dropped samples, extra noise) is keyed on (seed, fault position, metric,
sample time), so corrupting a series in pieces gives the same result as in one go.

Each fault acts on samples with ``start_ms <= t < end_ms`` only. ``magnitude`` means:

- ``stuck``: unused; the sensor repeats ``hold_value``, or the first value in the window;
- ``spike``: added to the value at isolated samples (a ``rate`` fraction of the window);
- ``drift``: offset reached at ``end_ms``, growing linearly from 0 at ``start_ms``;
- ``dropout``: fraction of the window's samples removed (1.0 = all of them);
- ``noise``: standard deviation of extra Gaussian noise, in the metric's unit.

Faulted values are not clipped: an implausible value is what a broken sensor sends.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from firmware_sim import rng
from firmware_sim.errors import InvalidSpecError

log = logging.getLogger(__name__)

FAULT_KINDS: tuple[str, ...] = ("stuck", "spike", "drift", "dropout", "noise")
ALL = "*"  # a fault on every metric of the device (e.g. a power cut for dropout)


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault on one metric (or ``"*"``) during ``[start_ms, end_ms)``."""

    kind: str
    metric: str
    start_ms: int
    end_ms: int
    magnitude: float = 1.0
    rate: float = 0.01  # spike: probability that a sample in the window is a spike
    hold_value: float | None = None  # stuck: the value repeated; None = first in window

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise InvalidSpecError(f"Invalid fault {self.kind!r} on {self.metric!r}: {problem}")

    def _problem(self) -> str | None:
        if self.kind not in FAULT_KINDS:
            return f"kind must be one of {', '.join(FAULT_KINDS)}"
        if not isinstance(self.metric, str) or not self.metric:
            return "metric must be a metric name or '*'"
        for name in ("start_ms", "end_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                return f"{name} must be an integer (epoch ms)"
        if self.end_ms <= self.start_ms:
            return "end_ms must be after start_ms"
        if not _is_number(self.magnitude) or not math.isfinite(self.magnitude):
            return "magnitude must be a finite number"
        if self.kind == "dropout" and not 0.0 <= self.magnitude <= 1.0:
            return "dropout magnitude is the fraction of samples removed, within [0, 1]"
        if self.kind == "noise" and self.magnitude < 0:
            return "noise magnitude is a standard deviation, not negative"
        if not _is_number(self.rate) or not 0.0 < self.rate <= 1.0:
            return "rate must be within (0, 1]"
        if self.hold_value is not None and (
            not _is_number(self.hold_value) or not math.isfinite(self.hold_value)
        ):
            return "hold_value must be a finite number"
        return None

    def applies_to(self, metric: str) -> bool:
        """True when this fault corrupts ``metric``."""
        return self.metric in (ALL, metric)

    def window(self, times: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Mask of the samples inside the fault window."""
        mask: NDArray[np.bool_] = (times >= self.start_ms) & (times < self.end_ms)
        return mask

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Fault:
        """A fault from a plain dict (TOML/JSON), naming any unknown or missing key."""
        if not isinstance(spec, Mapping):
            raise InvalidSpecError(f"Invalid fault: expected a table of options, got {spec!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise InvalidSpecError(
                f"Invalid fault: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}"
            )
        missing = [name for name in ("kind", "metric", "start_ms", "end_ms") if name not in spec]
        if missing:
            raise InvalidSpecError(f"Invalid fault: missing key {missing[0]!r}")
        return cls(**dict(spec))

    def to_dict(self) -> dict[str, Any]:
        """The plain-dict form accepted by :meth:`from_dict`."""
        spec: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        if spec["hold_value"] is None:
            del spec["hold_value"]
        return spec


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_faults(specs: Iterable[Mapping[str, Any]] | None) -> tuple[Fault, ...]:
    """Faults from driver options (a list of plain dicts); ``None`` means none."""
    if specs is None:
        return ()
    if isinstance(specs, Mapping | str | bytes):
        raise InvalidSpecError("Invalid faults: expected a list of fault tables")
    return tuple(Fault.from_dict(spec) for spec in specs)


def _metric_id(metric: str) -> int:
    # A stable id for any metric name (real data sets may use names outside the catalogue).
    return zlib.crc32(metric.encode("utf-8"))


def apply_faults(
    metric: str,
    times: ArrayLike,
    values: ArrayLike,
    faults: Sequence[Fault],
    seed: int,
    *,
    remove_dropouts: bool = True,
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Apply the faults on ``metric`` to a series, in list order; returns new arrays.

    ``remove_dropouts=False`` keeps the samples a dropout would remove (used to learn the
    value a later ``stuck`` fault holds).
    """
    t = np.array(times, dtype=np.int64)
    v = np.array(values, dtype=np.float64)
    if t.ndim != 1 or t.shape != v.shape:
        raise ValueError("times and values must be one-dimensional arrays of equal length")
    metric_id = _metric_id(metric)
    for index, fault in enumerate(faults):
        if not fault.applies_to(metric) or t.size == 0:
            continue
        mask = fault.window(t)
        if not mask.any():
            continue
        key = rng.stream_key(seed, index, metric_id)
        if fault.kind == "stuck":
            held = fault.hold_value if fault.hold_value is not None else float(v[mask][0])
            v[mask] = held
        elif fault.kind == "spike":
            hits = mask & (rng.uniform(key, t) < fault.rate)
            v[hits] += fault.magnitude
        elif fault.kind == "drift":
            progress = (t[mask] - fault.start_ms) / (fault.end_ms - fault.start_ms)
            v[mask] += fault.magnitude * progress
        elif fault.kind == "noise":
            v[mask] += fault.magnitude * rng.normal(key, t[mask])
        elif fault.kind == "dropout" and remove_dropouts:
            keep = ~(mask & (rng.uniform(key, t) < fault.magnitude))
            log.debug("dropout fault removes %d %s samples", int(t.size - keep.sum()), metric)
            t, v = t[keep], v[keep]
    return t, v
