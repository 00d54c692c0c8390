"""AQI engine: every breakpoint of every table, truncation, worked examples, versions."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analytics.aqi import (
    CAQI_2012,
    EEA_EAQI_2017,
    TABLES,
    US_EPA_2012,
    US_EPA_2024,
    AqiError,
    IndexTable,
    epa_ozone,
    epa_table_for,
    overall,
    sub_index,
    to_ppb,
    us_aqi,
    who_exceedances,
)

EPA_TABLES = (US_EPA_2012, US_EPA_2024)
EPA_CASES = [
    (table, pollutant, band)
    for table in EPA_TABLES
    for pollutant, spec in table.pollutants.items()
    for band in spec.bands
]


@pytest.mark.parametrize(
    ("table", "pollutant", "band"),
    EPA_CASES,
    ids=[f"{t.version}-{p}-{b.lo}" for t, p, b in EPA_CASES],
)
def test_every_epa_breakpoint_gives_its_band_edge(
    table: IndexTable, pollutant: str, band: object
) -> None:
    lo, hi = band.lo, band.hi  # type: ignore[attr-defined]
    at_lo = sub_index(pollutant, float(lo), table)
    at_hi = sub_index(pollutant, float(hi), table)
    assert (at_lo.value, at_hi.value) == (band.index_lo, band.index_hi)  # type: ignore[attr-defined]
    assert at_lo.category == at_hi.category == band.category  # type: ignore[attr-defined]
    assert at_lo.table_version == table.version


@pytest.mark.parametrize("table", EPA_TABLES, ids=lambda t: t.version)
def test_epa_bands_tile_the_truncated_scale(table: IndexTable) -> None:
    for spec in table.pollutants.values():
        step = Decimal(1).scaleb(-spec.decimals)
        for below, above in zip(spec.bands, spec.bands[1:], strict=False):
            assert above.lo == below.hi + step, (spec.pollutant, below, above)
            assert above.index_lo == below.index_hi + 1


def test_2024_table_differs_from_2012_where_the_rule_changed() -> None:
    # PM2.5 12.0: the top of Good in 2012, Moderate since 2024: (100-51)/(35.4-9.1)*2.9+51.
    assert sub_index("pm25", 12.0, US_EPA_2012).value == 50
    assert sub_index("pm25", 12.0, US_EPA_2024).value == 56
    assert sub_index("pm25", 9.0, US_EPA_2024).value == 50
    # 2024 merges the two Hazardous bands into 301-500.
    assert sub_index("pm25", 325.4, US_EPA_2024).value == 500
    assert sub_index("pm25", 350.4, US_EPA_2012).value == 400
    assert sub_index("pm10", 504, US_EPA_2012).value == 400
    assert sub_index("pm10", 504, US_EPA_2024).value == 301 + round(199 / 179 * 79)


@pytest.mark.parametrize(
    ("pollutant", "concentration", "table", "truncated", "index"),
    [
        ("pm25", 35.49, US_EPA_2024, "35.4", 100),  # truncated, not rounded up to 35.5
        ("pm25", 35.49, US_EPA_2012, "35.4", 100),
        ("pm25", 9.05, US_EPA_2024, "9.0", 50),
        ("pm25", 9.1, US_EPA_2024, "9.1", 51),
        ("pm10", 54.9, US_EPA_2024, "54", 50),
        ("no2", 100.99, US_EPA_2024, "100", 100),
        ("co", 4.49, US_EPA_2024, "4.4", 50),
        ("o3_8h", 0.0709, US_EPA_2024, "0.070", 100),
        # Worked examples by the TAD's equation: O3 8-h 0.07853 ppm -> 0.078 -> 125.5 -> 126;
        # PM2.5 35.9 (2012) -> 49/19.9 * 0.4 + 101 = 101.98 -> 102.
        ("o3_8h", 0.07853, US_EPA_2024, "0.078", 126),
        ("pm25", 35.9, US_EPA_2012, "35.9", 102),
    ],
)
def test_truncation_and_worked_examples(
    pollutant: str, concentration: float, table: IndexTable, truncated: str, index: int
) -> None:
    result = sub_index(pollutant, concentration, table)
    assert result.concentration == Decimal(truncated)
    assert result.value == index


def test_beyond_the_top_of_the_epa_scale_is_500_and_flagged() -> None:
    result = sub_index("pm25", 900.0, US_EPA_2024)
    assert (result.value, result.beyond_scale, result.category) == (500, True, "Hazardous")
    assert not sub_index("pm25", 325.4, US_EPA_2024).beyond_scale


def test_ozone_uses_the_one_hour_table_where_the_eight_hour_one_stops_or_is_lower() -> None:
    assert epa_ozone(0.078, None).value == 126
    assert epa_ozone(0.060, 0.170).pollutant == "o3_1h"  # 1-h gives 151+: higher
    assert epa_ozone(0.060, 0.100).value == sub_index("o3_8h", 0.060).value  # 1-h n/a
    assert epa_ozone(None, 0.300).value == sub_index("o3_1h", 0.300).value
    with pytest.raises(AqiError, match="1-hour concentration is needed"):
        epa_ozone(0.250, None)
    with pytest.raises(AqiError, match="below the us-epa-2024 table"):
        sub_index("o3_1h", 0.100)


def test_us_aqi_converts_our_units_and_names_the_dominant_pollutant() -> None:
    assert to_ppb("no2", 46.0055) == pytest.approx(24.45)
    result = us_aqi(pm25_24h=40.0, no2_1h_ug=120.0, co_8h_mg=1.0)
    assert (result.value, result.dominant, result.table_version) == (112, "pm25", "us-epa-2024")
    no2 = next(s for s in result.sub_indices if s.pollutant == "no2")
    assert (no2.concentration, no2.unit) == (Decimal(63), "ppb")  # 120 * 24.45 / 46.0055
    assert result.color == "#FF7E00"


def test_epa_table_by_date_for_recomputing_history() -> None:
    assert epa_table_for(date(2024, 5, 5)) is US_EPA_2012
    assert epa_table_for(date(2024, 5, 6)) is US_EPA_2024
    assert epa_table_for(datetime(2024, 5, 6, 3, tzinfo=UTC)) is US_EPA_2024
    assert set(TABLES) == {"us-epa-2024", "us-epa-2012", "eea-eaqi-2017", "caqi-2012"}


EAQI_EDGES = {
    "pm25": [0, 10, 20, 25, 50, 75],
    "pm10": [0, 20, 40, 50, 100, 150],
    "no2": [0, 40, 90, 120, 230, 340],
    "o3": [0, 50, 100, 130, 240, 380],
}


@pytest.mark.parametrize("pollutant", sorted(EAQI_EDGES))
def test_eaqi_band_edges(pollutant: str) -> None:
    names = ["Good", "Fair", "Moderate", "Poor", "Very poor", "Extremely poor"]
    for level, edge in enumerate(EAQI_EDGES[pollutant], start=1):
        at = sub_index(pollutant, float(edge), EEA_EAQI_2017)
        assert (at.value, at.category, at.table_version) == (level, names[level - 1],
                                                             "eea-eaqi-2017")  # fmt: skip
        if edge:
            assert sub_index(pollutant, edge - 0.001, EEA_EAQI_2017).value == level - 1


@pytest.mark.parametrize(
    ("pollutant", "edges"),
    [
        ("no2", [0, 50, 100, 200, 400]),
        ("pm10", [0, 25, 50, 90, 180]),
        ("pm25", [0, 15, 30, 55, 110]),
        ("o3", [0, 60, 120, 180, 240]),
        ("co", [0, 5000, 7500, 10000, 20000]),
    ],
)
def test_caqi_grid_edges_and_interpolation(pollutant: str, edges: list[int]) -> None:
    for i, edge in enumerate(edges):
        assert sub_index(pollutant, float(edge), CAQI_2012).value == 25 * i
    midway = (edges[1] + edges[2]) / 2
    assert sub_index(pollutant, midway, CAQI_2012).value in (37, 38)  # 37.5, half up: 38
    beyond = sub_index(pollutant, edges[-1] * 2.0, CAQI_2012)
    assert beyond.value > 100 and beyond.beyond_scale and beyond.category == "Very high"


def test_overall_takes_the_highest_sub_index_of_one_table() -> None:
    subs = [sub_index("pm25", 20.0), sub_index("pm10", 200), sub_index("no2", 10)]
    result = overall(subs)
    assert (result.dominant, result.value) == ("pm10", sub_index("pm10", 200).value)
    with pytest.raises(AqiError, match="different tables"):
        overall([sub_index("pm25", 20.0), sub_index("pm25", 20.0, US_EPA_2012)])
    with pytest.raises(AqiError, match="no sub-indices"):
        overall([])


def test_who_2021_exceedance_days() -> None:
    count = who_exceedances("pm25", [3.0, 15.0, 15.1, None, 40.0])
    assert (count.periods, count.exceedances, count.guideline) == (4, 2, 15.0)
    assert count.version == "who-2021"
    assert who_exceedances("no2", [30.0, 10.0]).exceedances == 1  # 24-h guideline 25
    assert who_exceedances("o3", [101.0, 99.0], averaging="8h").exceedances == 1
    assert who_exceedances("co", [4.5]).unit == "mg/m³"
    with pytest.raises(AqiError, match="no pm25/1h guideline"):
        who_exceedances("pm25", [1.0], averaging="1h")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.1, True, "12"])
def test_bad_concentrations_are_refused_clearly(bad: object) -> None:
    with pytest.raises(AqiError, match="pm25 concentration"):
        sub_index("pm25", bad)  # type: ignore[arg-type]


def test_unknown_pollutant_names_the_known_ones() -> None:
    with pytest.raises(AqiError, match="eea-eaqi-2017 has no 'co'; it covers no2, o3, pm10"):
        sub_index("co", 1.0, EEA_EAQI_2017)


@given(
    pollutant=st.sampled_from(["pm25", "pm10", "no2", "co", "o3_8h"]),
    table=st.sampled_from(EPA_TABLES),
    a=st.floats(0, 1000, allow_nan=False),
    b=st.floats(0, 1000, allow_nan=False),
)
def test_a_higher_concentration_never_gives_a_lower_index(
    pollutant: str, table: IndexTable, a: float, b: float
) -> None:
    if pollutant == "o3_8h":
        a, b = a / 5000, b / 5000  # within the 8-h table (0 .. 0.200 ppm)
    low, high = sorted((a, b))
    assert sub_index(pollutant, low, table).value <= sub_index(pollutant, high, table).value
