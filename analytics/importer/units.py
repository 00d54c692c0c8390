"""Unit conversion for imported archives: only what physics fixes.

Mass concentrations convert by a power of ten (mg/m³ <-> µg/m³). A mixing ratio (ppb,
ppm) converts to a mass concentration through the molar mass of the gas and the molar
volume of air at a *stated* reference temperature and pressure (ideal gas); without the
reference the conversion is refused, never assumed. Temperatures convert from K and °F.
Everything else (ppb of particles, counts, unknown spellings) is refused with a message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from analytics.importer.errors import ArchiveError
from civicmesh.metrics import BY_NAME

R_GAS = 8.314462618  # J / (mol K)

# g/mol, for the gases a mixing ratio may be given for.
MOLAR_MASS = {"no2": 46.0055, "o3": 47.9982, "co": 28.0101, "so2": 64.066, "no": 30.0061}

# Spellings of the units archives use -> one canonical name.
_SPELLINGS = {
    "µg/m³": "ug/m3",
    "μg/m³": "ug/m3",
    "µg/m3": "ug/m3",
    "μg/m3": "ug/m3",
    "ug/m3": "ug/m3",
    "ug/m³": "ug/m3",
    "ugm-3": "ug/m3",
    "mg/m³": "mg/m3",
    "mg/m3": "mg/m3",
    "ppb": "ppb",
    "ppm": "ppm",
    "°c": "degc",
    "c": "degc",
    "degc": "degc",
    "celsius": "degc",
    "k": "k",
    "kelvin": "k",
    "°f": "degf",
    "f": "degf",
    "degf": "degf",
    "%": "%",
    "percent": "%",
    "vehicles": "vehicles",
    "km/h": "km/h",
}

_MASS = {"ug/m3": 1.0, "mg/m3": 1000.0}  # in µg/m³
_MIXING = {"ppb": 1.0, "ppm": 1000.0}  # in ppb


@dataclass(frozen=True, slots=True)
class Reference:
    """The reference conditions a mixing ratio was reported at."""

    temperature_c: float
    pressure_hpa: float

    @property
    def molar_volume_l(self) -> float:
        """Litres per mole of an ideal gas at these conditions (24.47 at 25 °C, 1013.25)."""
        return R_GAS * (self.temperature_c + 273.15) / (self.pressure_hpa * 100.0) * 1000.0


def canonical_unit(text: str) -> str | None:
    return _SPELLINGS.get(text.strip().lower().replace(" ", ""))


Converter = Callable[[float], float]


def converter(metric: str, unit: str, reference: Reference | None, where: str) -> Converter | None:
    """How to turn ``unit`` into ``metric``'s catalogue unit (None: it is that unit)."""
    spec = BY_NAME[metric]
    given = canonical_unit(unit)
    target = canonical_unit(spec.unit)
    if given is None:
        raise ArchiveError(
            f"{where}: unknown unit {unit!r} for {metric} (its unit is {spec.unit}); "
            "write it as one of: ug/m3, mg/m3, ppb, ppm, C, K, F, %"
        )
    if given == target:
        return None
    if given in _MASS and target in _MASS:
        factor = _MASS[given] / _MASS[target]
        return lambda v: v * factor
    if given in _MIXING and target in _MASS:
        if metric not in MOLAR_MASS:
            raise ArchiveError(
                f"{where}: {metric} given in {unit}; a mixing ratio converts to {spec.unit} "
                f"only for a gas of known molar mass ({', '.join(sorted(MOLAR_MASS))})"
            )
        if reference is None:
            raise ArchiveError(
                f"{where}: {metric} is in {unit}; converting it to {spec.unit} needs the "
                "reference conditions it was reported at: add to the mapping file "
                "[conversion] reference_temperature_c = 25.0 and reference_pressure_hpa = "
                "1013.25 (EU air-quality directive: 20.0 and 1013.25)"
            )
        # ppb * (g/mol) / (L/mol) = µg/m³
        factor = _MIXING[given] * MOLAR_MASS[metric] / reference.molar_volume_l / _MASS[target]
        return lambda v: v * factor
    if target == "degc" and given == "k":
        return lambda v: v - 273.15
    if target == "degc" and given == "degf":
        return lambda v: (v - 32.0) * 5.0 / 9.0
    raise ArchiveError(
        f"{where}: cannot convert {metric} from {unit} to {spec.unit}: not a conversion "
        "physics fixes; convert the column before importing"
    )
