"""Virtual sensor hardware of a simulated city.

The edge agent reaches this package only through the driver interface
(``civicmesh.drivers.load_driver("sim", options)``); nothing here imports ``edge``,
``gateway`` or ``analytics``.
"""

from __future__ import annotations

from firmware_sim.errors import InvalidSpecError, SimulationError

__all__ = ["InvalidSpecError", "SimulationError"]
