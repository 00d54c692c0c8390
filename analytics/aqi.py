"""Air-quality indices, versioned: every result names the table that produced it.

- **US EPA AQI** (Technical Assistance Document for the Reporting of Daily Air Quality):
  ``us-epa-2024`` with the PM2.5 breakpoints of the 2024 PM NAAQS revision (89 FR 16202,
  in force from 6 May 2024, TAD EPA-454/B-24-002: 0-9.0 Good, top category 301-500
  merged), and ``us-epa-2012`` for recomputing history. Concentrations are truncated
  before the lookup (PM2.5 and CO to 0.1, PM10 and NO2 to integers, O3 to 0.001 ppm);
  the index is ``(Ihi - Ilo) / (BPhi - BPlo) * (C - BPlo) + Ilo``, rounded to the
  nearest integer. Averaging periods: PM 24 h, O3 8 h (1 h where the 8-h table stops or
  the 1-h index is higher), CO 8 h, NO2 1 h.
- **EU EAQI** ``eea-eaqi-2017``: the European Environment Agency's six bands, Good to
  Extremely poor, in µg/m³. (The EEA revised the bands in 2024 towards the WHO 2021
  guidelines; add that table as a new version, never by editing this one.)
- **CAQI** ``caqi-2012``: Common Air Quality Index (CiteairII, revised 2012), hourly
  background grid, 0-100 over five bands, above 100 continuing the last band's slope.
- **WHO 2021** air quality guideline levels (``who-2021``) and exceedance counting.

Our gas readings are µg/m³ (NO2, O3) and mg/m³ (CO); the EPA tables are in ppb/ppm, so
they are converted at 25 °C and 1 atm (molar volume 24.45 l), as the EPA does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal

from civicmesh.errors import CivicmeshError

MOLAR_VOLUME_L = 24.45  # litres per mole at 25 °C and 1 atm
MOLECULAR_WEIGHT = {"no2": 46.0055, "o3": 47.9982, "co": 28.0101}
EPA_2024_IN_FORCE = date(2024, 5, 6)


class AqiError(CivicmeshError):
    reason = "aqi.invalid"


@dataclass(frozen=True, slots=True)
class Band:
    lo: Decimal  # concentration range, inclusive, in the table's unit and precision
    hi: Decimal | None  # None: open-ended top band
    index_lo: int
    index_hi: int
    category: str
    color: str


@dataclass(frozen=True, slots=True)
class PollutantTable:
    pollutant: str  # "pm25", "pm10", "no2", "o3_8h", "o3_1h", "co"
    unit: str
    averaging: str
    decimals: int  # truncation precision of the concentration
    bands: tuple[Band, ...]


@dataclass(frozen=True, slots=True)
class IndexTable:
    version: str
    name: str
    source: str
    pollutants: dict[str, PollutantTable]


@dataclass(frozen=True, slots=True)
class SubIndex:
    pollutant: str
    value: int
    category: str
    color: str
    concentration: Decimal  # after unit conversion and truncation
    unit: str
    table_version: str
    beyond_scale: bool = False  # above the top breakpoint: value capped (EPA) / extrapolated


@dataclass(frozen=True, slots=True)
class IndexResult:
    value: int
    category: str
    color: str
    dominant: str
    table_version: str
    sub_indices: tuple[SubIndex, ...]


# ------------------------------------------------------------------------- tables

EPA_CATEGORIES = (
    ("Good", "#00E400"),
    ("Moderate", "#FFFF00"),
    ("Unhealthy for Sensitive Groups", "#FF7E00"),
    ("Unhealthy", "#FF0000"),
    ("Very Unhealthy", "#8F3F97"),
    ("Hazardous", "#7E0023"),
)
EPA_INDEX = ((0, 50), (51, 100), (101, 150), (151, 200), (201, 300), (301, 400), (401, 500))
EAQI_CATEGORIES = (
    ("Good", "#50F0E6"),
    ("Fair", "#50CCAA"),
    ("Moderate", "#F0E641"),
    ("Poor", "#FF5050"),
    ("Very poor", "#960032"),
    ("Extremely poor", "#7D2181"),
)
CAQI_CATEGORIES = (
    ("Very low", "#79BC6A"),
    ("Low", "#BBCF4C"),
    ("Medium", "#EEC20B"),
    ("High", "#F29305"),
    ("Very high", "#E8416F"),
)


def _epa(
    pollutant: str, unit: str, averaging: str, decimals: int,
    ranges: Sequence[tuple[str, str]], first_band: int = 0, merge_top: bool = False,
) -> PollutantTable:  # fmt: skip
    """An EPA table from its concentration ranges; ``first_band`` skips the lower index
    bands a table does not cover (O3 1-h starts at 101); ``merge_top`` makes the last
    range span 301-500 (the 2024 TAD's single Hazardous band)."""
    bands = []
    for i, (lo, hi) in enumerate(ranges):
        band = first_band + i
        index_lo, index_hi = EPA_INDEX[band]
        if merge_top and i == len(ranges) - 1:
            index_hi = 500
        category, color = EPA_CATEGORIES[min(band, 5)]
        bands.append(Band(Decimal(lo), Decimal(hi), index_lo, index_hi, category, color))
    return PollutantTable(pollutant, unit, averaging, decimals, tuple(bands))


_EPA_COMMON_2012 = {
    "pm10": _epa("pm10", "µg/m³", "24h", 0, [("0", "54"), ("55", "154"), ("155", "254"),
        ("255", "354"), ("355", "424"), ("425", "504"), ("505", "604")]),
    "o3_8h": _epa("o3_8h", "ppm", "8h", 3, [("0.000", "0.054"), ("0.055", "0.070"),
        ("0.071", "0.085"), ("0.086", "0.105"), ("0.106", "0.200")]),
    "o3_1h": _epa("o3_1h", "ppm", "1h", 3, [("0.125", "0.164"), ("0.165", "0.204"),
        ("0.205", "0.404"), ("0.405", "0.504"), ("0.505", "0.604")], first_band=2),
    "co": _epa("co", "ppm", "8h", 1, [("0.0", "4.4"), ("4.5", "9.4"), ("9.5", "12.4"),
        ("12.5", "15.4"), ("15.5", "30.4"), ("30.5", "40.4"), ("40.5", "50.4")]),
    "no2": _epa("no2", "ppb", "1h", 0, [("0", "53"), ("54", "100"), ("101", "360"),
        ("361", "649"), ("650", "1249"), ("1250", "1649"), ("1650", "2049")]),
}  # fmt: skip

US_EPA_2012 = IndexTable(
    "us-epa-2012",
    "US EPA AQI (2012 PM2.5 breakpoints)",
    "EPA-454/B-18-007 (TAD, Sept 2018); 78 FR 3086 (2013)",
    {
        "pm25": _epa("pm25", "µg/m³", "24h", 1, [("0.0", "12.0"), ("12.1", "35.4"),
            ("35.5", "55.4"), ("55.5", "150.4"), ("150.5", "250.4"), ("250.5", "350.4"),
            ("350.5", "500.4")]),
        **_EPA_COMMON_2012,
    },
)  # fmt: skip

US_EPA_2024 = IndexTable(
    "us-epa-2024",
    "US EPA AQI (2024 PM2.5 breakpoints)",
    "89 FR 16202 (7 Mar 2024, in force 6 May 2024); EPA-454/B-24-002 (TAD, May 2024)",
    {
        "pm25": _epa("pm25", "µg/m³", "24h", 1, [("0.0", "9.0"), ("9.1", "35.4"),
            ("35.5", "55.4"), ("55.5", "125.4"), ("125.5", "225.4"), ("225.5", "325.4")],
            merge_top=True),
        "pm10": _epa("pm10", "µg/m³", "24h", 0, [("0", "54"), ("55", "154"), ("155", "254"),
            ("255", "354"), ("355", "424"), ("425", "604")], merge_top=True),
        "o3_8h": _EPA_COMMON_2012["o3_8h"],
        "o3_1h": _epa("o3_1h", "ppm", "1h", 3, [("0.125", "0.164"), ("0.165", "0.204"),
            ("0.205", "0.404"), ("0.405", "0.604")], first_band=2, merge_top=True),
        "co": _epa("co", "ppm", "8h", 1, [("0.0", "4.4"), ("4.5", "9.4"), ("9.5", "12.4"),
            ("12.5", "15.4"), ("15.5", "30.4"), ("30.5", "50.4")], merge_top=True),
        "no2": _epa("no2", "ppb", "1h", 0, [("0", "53"), ("54", "100"), ("101", "360"),
            ("361", "649"), ("650", "1249"), ("1250", "2049")], merge_top=True),
    },
)  # fmt: skip


def _grid(
    pollutant: str, averaging: str, edges: Sequence[float], categories: Sequence[tuple[str, str]],
    index_edges: Sequence[int],
) -> PollutantTable:  # fmt: skip
    """A continuous grid (EAQI, CAQI): band i is [edges[i], edges[i+1]); the last is open."""
    bands = []
    for i, (name, color) in enumerate(categories):
        hi = Decimal(str(edges[i + 1])) if i + 1 < len(edges) else None
        lo = Decimal(str(edges[i]))
        bands.append(Band(lo, hi, index_edges[i], index_edges[i + 1], name, color))
    return PollutantTable(pollutant, "µg/m³", averaging, 6, tuple(bands))


_EAQI_LEVELS = (1, 2, 3, 4, 5, 6, 6)
EEA_EAQI_2017 = IndexTable(
    "eea-eaqi-2017",
    "European Air Quality Index (EEA, 2017-2023 bands)",
    "European Environment Agency, European Air Quality Index, bands valid 2017-2023",
    {
        "pm25": _grid("pm25", "24h", [0, 10, 20, 25, 50, 75], EAQI_CATEGORIES, _EAQI_LEVELS),
        "pm10": _grid("pm10", "24h", [0, 20, 40, 50, 100, 150], EAQI_CATEGORIES, _EAQI_LEVELS),
        "no2": _grid("no2", "1h", [0, 40, 90, 120, 230, 340], EAQI_CATEGORIES, _EAQI_LEVELS),
        "o3": _grid("o3", "1h", [0, 50, 100, 130, 240, 380], EAQI_CATEGORIES, _EAQI_LEVELS),
    },
)

_CAQI_INDEX = (0, 25, 50, 75, 100, 125)
CAQI_2012 = IndexTable(
    "caqi-2012",
    "Common Air Quality Index (hourly, background)",
    "CiteairII, 'CAQI Common Air Quality Index - update with PM2.5 and sensitivity "
    "analysis' (van den Elshout et al., 2012/2014)",
    {
        "no2": _grid("no2", "1h", [0, 50, 100, 200, 400], CAQI_CATEGORIES, _CAQI_INDEX),
        "pm10": _grid("pm10", "1h", [0, 25, 50, 90, 180], CAQI_CATEGORIES, _CAQI_INDEX),
        "pm25": _grid("pm25", "1h", [0, 15, 30, 55, 110], CAQI_CATEGORIES, _CAQI_INDEX),
        "o3": _grid("o3", "1h", [0, 60, 120, 180, 240], CAQI_CATEGORIES, _CAQI_INDEX),
        "co": _grid("co", "8h", [0, 5000, 7500, 10000, 20000], CAQI_CATEGORIES, _CAQI_INDEX),
    },
)

TABLES: dict[str, IndexTable] = {
    t.version: t for t in (US_EPA_2024, US_EPA_2012, EEA_EAQI_2017, CAQI_2012)
}


def epa_table_for(day: date | datetime) -> IndexTable:
    """The EPA table in force on ``day``: 2012 breakpoints before 6 May 2024."""
    if isinstance(day, datetime):
        day = day.astimezone(UTC).date() if day.tzinfo else day.date()
    return US_EPA_2024 if day >= EPA_2024_IN_FORCE else US_EPA_2012


# --------------------------------------------------------------------- conversion


def to_ppb(metric: str, ug_m3: float) -> float:
    """µg/m³ of a gas to ppb at 25 °C and 1 atm."""
    return ug_m3 * MOLAR_VOLUME_L / MOLECULAR_WEIGHT[metric]


def co_mg_m3_to_ppm(mg_m3: float) -> float:
    return mg_m3 * MOLAR_VOLUME_L / MOLECULAR_WEIGHT["co"]


def _checked(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AqiError(f"{what} must be a number, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise AqiError(f"{what} must be a finite, non-negative concentration, not {value!r}")
    return float(value)


def _truncate(value: float, decimals: int) -> Decimal:
    # Decimal from the float's repr: 35.49 stays 35.49, not 35.4899999...
    return Decimal(repr(value)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_DOWN)


# ---------------------------------------------------------------------- indices


def _find_band(bands: Sequence[Band], c: Decimal, epa: bool) -> Band | None:
    """EPA bands are closed ranges of truncated values; grid bands are [lo, hi)."""
    for band in bands:
        if epa and band.hi is not None and band.lo <= c <= band.hi:
            return band
        if not epa and c >= band.lo and (band.hi is None or c < band.hi):
            return band
    return None


def sub_index(
    pollutant: str, concentration: float, table: IndexTable | str = US_EPA_2024
) -> SubIndex:
    """The index of one pollutant concentration, in the table's own unit.

    EPA: truncate, find the band, interpolate, round half up; above the top breakpoint
    the value is 500 and ``beyond_scale`` is set. Grids (EAQI, CAQI): the band holding
    the value; CAQI interpolates within it, EAQI reports the band's level (1-6).
    """
    index_table = TABLES[table] if isinstance(table, str) else table
    spec = index_table.pollutants.get(pollutant)
    if spec is None:
        known = ", ".join(sorted(index_table.pollutants))
        raise AqiError(f"{index_table.version} has no {pollutant!r}; it covers {known}")
    value = _checked(concentration, f"{pollutant} concentration")
    epa = index_table.version.startswith("us-epa")
    c = _truncate(value, spec.decimals) if epa else Decimal(repr(value))
    bands = spec.bands
    if c < bands[0].lo:
        raise AqiError(
            f"{pollutant} {c} {spec.unit} is below the {index_table.version} table, which "
            f"starts at {bands[0].lo} (for O3 below 0.125 ppm use the 8-hour table)"
        )
    band = _find_band(bands, c, epa)
    if band is None:  # only EPA tables end: grids have an open top band
        top = bands[-1]
        return SubIndex(pollutant, 500, top.category, top.color, c, spec.unit,
                        index_table.version, beyond_scale=True)  # fmt: skip
    if index_table.version.startswith("eea-eaqi"):
        level = band.index_lo
        return SubIndex(pollutant, level, band.category, band.color, c,
                        spec.unit, index_table.version)  # fmt: skip
    if band.hi is None:  # CAQI above the grid: continue the last band's slope
        previous = bands[-2]
        assert previous.hi is not None
        slope = Decimal(band.index_hi - band.index_lo) / (previous.hi - previous.lo)
        raw = band.index_lo + slope * (c - band.lo)
        return SubIndex(pollutant, int(raw.quantize(Decimal(1), ROUND_HALF_UP)), band.category,
                        band.color, c, spec.unit, index_table.version,
                        beyond_scale=True)  # fmt: skip
    raw = Decimal(band.index_hi - band.index_lo) / (band.hi - band.lo) * (c - band.lo)
    value_index = int((raw + band.index_lo).quantize(Decimal(1), ROUND_HALF_UP))
    return SubIndex(pollutant, value_index, band.category, band.color, c,
                    spec.unit, index_table.version)  # fmt: skip


def epa_ozone(
    ppm_8h: float | None, ppm_1h: float | None, table: IndexTable = US_EPA_2024
) -> SubIndex:
    """The EPA ozone index: the 8-h index, or the 1-h one where the 8-h table stops
    (above 0.200 ppm) or where it is higher; at least one average must be given."""
    candidates = []
    if ppm_8h is not None:
        if _truncate(_checked(ppm_8h, "o3 8-h"), 3) <= Decimal("0.200"):
            candidates.append(sub_index("o3_8h", ppm_8h, table))
        elif ppm_1h is None:
            raise AqiError("O3 8-hour above 0.200 ppm: the 1-hour concentration is needed")
    if ppm_1h is not None and _truncate(_checked(ppm_1h, "o3 1-h"), 3) >= Decimal("0.125"):
        candidates.append(sub_index("o3_1h", ppm_1h, table))
    if not candidates:
        raise AqiError("O3 needs the 8-hour average (or a 1-hour one of at least 0.125 ppm)")
    return max(candidates, key=lambda s: s.value)


def overall(sub_indices: Iterable[SubIndex]) -> IndexResult:
    """The index of a place: its highest sub-index (the dominant pollutant) and table."""
    subs = tuple(sub_indices)
    if not subs:
        raise AqiError("no sub-indices to combine")
    versions = {s.table_version for s in subs}
    if len(versions) != 1:
        raise AqiError(f"sub-indices come from different tables: {sorted(versions)}")
    top = max(subs, key=lambda s: s.value)
    return IndexResult(top.value, top.category, top.color, top.pollutant, top.table_version, subs)


def us_aqi(
    *,
    pm25_24h: float | None = None,
    pm10_24h: float | None = None,
    o3_8h_ug: float | None = None,
    o3_1h_ug: float | None = None,
    no2_1h_ug: float | None = None,
    co_8h_mg: float | None = None,
    table: IndexTable = US_EPA_2024,
) -> IndexResult:
    """The US AQI from our units (µg/m³, CO mg/m³), converting gases to ppm/ppb."""
    subs = []
    if pm25_24h is not None:
        subs.append(sub_index("pm25", pm25_24h, table))
    if pm10_24h is not None:
        subs.append(sub_index("pm10", pm10_24h, table))
    if o3_8h_ug is not None or o3_1h_ug is not None:
        subs.append(
            epa_ozone(
                None if o3_8h_ug is None else to_ppb("o3", o3_8h_ug) / 1000,
                None if o3_1h_ug is None else to_ppb("o3", o3_1h_ug) / 1000,
                table,
            )
        )
    if no2_1h_ug is not None:
        subs.append(sub_index("no2", to_ppb("no2", no2_1h_ug), table))
    if co_8h_mg is not None:
        subs.append(sub_index("co", co_mg_m3_to_ppm(co_8h_mg), table))
    return overall(subs)


# --------------------------------------------------------------------------- WHO


@dataclass(frozen=True, slots=True)
class Guideline:
    metric: str
    averaging: str  # "24h", "8h", "annual", "peak-season"
    value: float
    unit: str


WHO_2021_VERSION = "who-2021"
WHO_2021: tuple[Guideline, ...] = (
    Guideline("pm25", "annual", 5.0, "µg/m³"),
    Guideline("pm25", "24h", 15.0, "µg/m³"),
    Guideline("pm10", "annual", 15.0, "µg/m³"),
    Guideline("pm10", "24h", 45.0, "µg/m³"),
    Guideline("no2", "annual", 10.0, "µg/m³"),
    Guideline("no2", "24h", 25.0, "µg/m³"),
    Guideline("o3", "peak-season", 60.0, "µg/m³"),
    Guideline("o3", "8h", 100.0, "µg/m³"),
    Guideline("co", "24h", 4.0, "mg/m³"),
)


def who_guideline(metric: str, averaging: str) -> Guideline:
    for guideline in WHO_2021:
        if (guideline.metric, guideline.averaging) == (metric, averaging):
            return guideline
    known = ", ".join(f"{g.metric}/{g.averaging}" for g in WHO_2021)
    raise AqiError(f"WHO 2021 has no {metric}/{averaging} guideline; known: {known}")


@dataclass(frozen=True, slots=True)
class ExceedanceCount:
    metric: str
    averaging: str
    guideline: float
    unit: str
    periods: int  # days (24h), or 8-h periods, with a value
    exceedances: int  # values strictly above the guideline
    version: str = WHO_2021_VERSION


def who_exceedances(
    metric: str, values: Iterable[float | None], averaging: str = "24h"
) -> ExceedanceCount:
    """How many of ``values`` (daily means for 24h, daily maximum 8-h means for O3)
    lie above the WHO 2021 guideline; None (no data) is not counted either way."""
    guideline = who_guideline(metric, averaging)
    periods = exceed = 0
    for value in values:
        if value is None:
            continue
        checked = _checked(value, f"{metric} {averaging} value")
        periods += 1
        exceed += checked > guideline.value
    return ExceedanceCount(metric, averaging, guideline.value, guideline.unit, periods, exceed)
