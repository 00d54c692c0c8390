"""The sensor driver interface: how the edge agent reads hardware, real or simulated.

A driver is pulled by the agent's clock: ``read(until_ms)`` returns every sample taken
before ``until_ms`` that it has not returned yet. A serial or I2C driver returns what it
buffered from the bus; the simulated driver (``firmware_sim``) computes samples on its
grid up to ``until_ms``, so an accelerated clock replays a week in seconds.

Drivers are found by name through the ``civicmesh.drivers`` entry points (or a
``module:Class`` path), so the edge agent never imports a driver package directly and
a real and a simulated driver are interchangeable.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from civicmesh.errors import CivicmeshError
from civicmesh.metrics import BY_NAME, RAW_CHANNELS


class DriverError(CivicmeshError):
    """A driver could not be loaded or failed to read."""

    reason = "driver.error"


@dataclass(frozen=True, slots=True)
class SampleBlock:
    """Consecutive raw samples of one metric (times ascending, epoch ms).

    ``times_ms`` and ``values`` may be lists or NumPy arrays of equal length.
    """

    metric: str
    times_ms: Sequence[int]
    values: Sequence[float]

    def __post_init__(self) -> None:
        if self.metric not in BY_NAME and self.metric not in RAW_CHANNELS:
            raise ValueError(f"Invalid sample block: unknown metric {self.metric!r}")
        if len(self.times_ms) != len(self.values):
            raise ValueError("Invalid sample block: times and values differ in length")


@runtime_checkable
class SensorDriver(Protocol):
    """What the edge agent needs from a sensor driver."""

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics this driver produces."""
        ...

    @property
    def sample_interval_ms(self) -> int:
        """Nominal time between two samples of one metric."""
        ...

    def read(self, until_ms: int) -> list[SampleBlock]:
        """All samples before ``until_ms`` not returned yet."""
        ...

    def close(self) -> None: ...


ENTRY_POINT_GROUP = "civicmesh.drivers"


def registered_drivers() -> dict[str, str]:
    """Driver names and their ``module:Class``, from the ``civicmesh.drivers`` entry
    points (pyproject.toml; a third-party driver package adds its own). The shared
    package names no driver itself."""
    return {
        ep.name: f"{ep.module}:{ep.attr}"
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    }


def load_driver(name: str, options: Mapping[str, Any]) -> SensorDriver:
    """Instantiate the driver registered as ``name`` with keyword ``options``."""
    known_drivers = registered_drivers()
    target = known_drivers.get(name, name)
    module_name, _, class_name = target.partition(":")
    if not class_name:
        known = ", ".join(sorted(known_drivers))
        raise DriverError(f"Unknown driver {name!r}: use one of {known} or 'module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise DriverError(f"Cannot load driver {name!r} ({target}): {exc}") from exc
    try:
        driver = cls(**options)
    except (TypeError, ValueError) as exc:
        raise DriverError(f"Driver {name!r} rejected its options: {exc}") from exc
    if not isinstance(driver, SensorDriver):
        raise DriverError(f"{target} does not implement the SensorDriver interface")
    return driver
