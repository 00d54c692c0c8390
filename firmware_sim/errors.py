"""The error base of ``firmware_sim``."""

from __future__ import annotations

from civicmesh.drivers import DriverError


class SimulationError(DriverError):
    """Base of all errors raised by the simulator."""

    reason = "sim.error"


class InvalidSpecError(SimulationError, ValueError):
    """A driver option, zone profile or fault specification is invalid.

    Also a ``ValueError``, so ``load_driver`` reports it as a rejected option.
    """

    reason = "sim.invalid_spec"
