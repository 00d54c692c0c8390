"""The mapping file (TOML): how an archive's columns, units, times and stations read.

Every key is checked when the file is loaded (unknown keys are refused, naming the key),
so a typo fails at once rather than after an hour of importing. See docs/import.md.
"""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from analytics.importer.errors import ArchiveError
from analytics.importer.units import Reference
from civicmesh.config import validation_problems
from civicmesh.metrics import BY_NAME

_OFFSET = re.compile(r"^(?:UTC)?([+-])(\d{2}):?(\d{2})$")
_STATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MISSING = ("", "NA", "NaN", "nan", "null", "NULL", "None")


class CsvOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delimiter: str = Field(default=",", min_length=1, max_length=1, description="Field separator")
    decimal: Literal[".", ","] = Field(default=".", description="Decimal mark of the numbers")
    missing: list[str] = Field(
        default=list(DEFAULT_MISSING), description="Cell texts that mean no value (e.g. -200)"
    )
    encoding: str = Field(default="utf-8-sig", description="Text encoding of the files")


class TimeOptions(BaseModel):
    """Where the time of a row is: one column, a date and a clock column, or parts."""

    model_config = ConfigDict(extra="forbid")

    column: str | None = Field(default=None, description="One timestamp column")
    format: str | None = Field(
        default=None, description="strftime format of `column` (default: ISO 8601)"
    )
    date: str | None = Field(default=None, description="Date column (with `clock`)")
    date_format: str = Field(default="%Y-%m-%d", description="strftime format of `date`")
    clock: str | None = Field(default=None, description="Time-of-day column (with `date`)")
    clock_format: str = Field(default="%H:%M:%S", description="strftime format of `clock`")
    year: str | None = Field(default=None, description="Year column (with month, day, hour)")
    month: str | None = None
    day: str | None = None
    hour: str | None = None
    minute: str | None = Field(default=None, description="Minute column (optional)")


class ColumnSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description="A civicmesh metric name (civicmesh/metrics.py)")
    unit: str = Field(description="The column's unit as the archive states it")

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BY_NAME:
            raise ValueError(
                f"unknown metric {value!r}; known metrics: {', '.join(sorted(BY_NAME))}"
            )
        return value


class StationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(
        default=None, description="The station id in civicmesh (default: its key)"
    )
    name: str = Field(default="", max_length=120, description="Human name")
    zone: str | None = Field(default=None, description="Zone (default: the mapping's zone)")
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)


class ConversionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reference_temperature_c: float | None = Field(
        default=None, ge=-50, le=60, description="Reference temperature of ppb/ppm values"
    )
    reference_pressure_hpa: float | None = Field(
        default=None, ge=500, le=1100, description="Reference pressure of ppb/ppm values"
    )


class MappingFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["wide", "openaq"] = Field(default="wide", description="Archive layout")
    timezone: str | None = Field(
        default=None,
        description="Zone of times written without an offset: an IANA name "
        "(Europe/Rome) or a fixed offset (+01:00, UTC)",
    )
    zone: str | None = Field(default=None, description="Zone of stations that name none")
    owner: str = Field(default="import", max_length=120, description="Who publishes the archive")
    station_column: str | None = Field(default=None, description="Column naming the station")
    ignore: list[str] = Field(default=[], description="Columns deliberately not imported")
    csv: CsvOptions = Field(default_factory=CsvOptions)
    time: TimeOptions = Field(default_factory=TimeOptions)
    columns: dict[str, ColumnSpec] = Field(default={}, description="Column -> metric and unit")
    stations: dict[str, StationSpec] = Field(default={}, description="Per station key")
    conversion: ConversionOptions = Field(default_factory=ConversionOptions)


class Mapping:
    """A checked mapping, ready for the readers."""

    def __init__(self, spec: MappingFile, origin: str) -> None:
        self.spec = spec
        self.origin = origin
        self.tz = parse_timezone(spec.timezone, origin) if spec.timezone else None
        c = spec.conversion
        if (c.reference_temperature_c is None) != (c.reference_pressure_hpa is None):
            raise ArchiveError(
                f"{origin}: [conversion] needs both reference_temperature_c and "
                "reference_pressure_hpa, or neither"
            )
        self.reference = (
            Reference(c.reference_temperature_c, c.reference_pressure_hpa)
            if c.reference_temperature_c is not None and c.reference_pressure_hpa is not None
            else None
        )
        t = spec.time
        ways = [t.column is not None, t.date is not None or t.clock is not None, t.year is not None]
        if sum(ways) > 1:
            raise ArchiveError(
                f"{origin}: [time] names more than one way to read the time; use `column`, "
                "or `date` and `clock`, or `year`, `month`, `day` and `hour`"
            )
        if (t.date is None) != (t.clock is None):
            raise ArchiveError(f"{origin}: [time] `date` and `clock` go together")
        if t.year is not None and None in (t.month, t.day, t.hour):
            raise ArchiveError(f"{origin}: [time] `year` needs `month`, `day` and `hour` too")
        for key, station in spec.stations.items():
            check_station_id(station.id or slug(key), f"{origin}: [stations.{key}]")

    @classmethod
    def default(cls, fmt: str, timezone_name: str | None) -> Mapping:
        return cls(MappingFile(format=fmt, timezone=timezone_name), "(no mapping file)")  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path, *, timezone_name: str | None = None) -> Mapping:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArchiveError(f"Mapping file {path} not found") from None
        except IsADirectoryError:
            raise ArchiveError(f"Mapping file {path} is a folder; give the .toml file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ArchiveError(f"Mapping file {path} is not valid TOML: {exc}") from None
        if timezone_name is not None:
            data["timezone"] = timezone_name
        try:
            spec = MappingFile.model_validate(data)
        except ValidationError as exc:
            problems = validation_problems(exc)
            raise ArchiveError(f"Mapping file {path}: " + "; ".join(problems)) from None
        return cls(spec, str(path))


def parse_timezone(text: str, origin: str) -> tzinfo:
    if text.upper() in ("UTC", "Z"):
        return UTC
    match = _OFFSET.match(text)
    if match:
        sign = -1 if match.group(1) == "-" else 1
        delta = timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
        return timezone(sign * delta)
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ArchiveError(
            f"{origin}: unknown time zone {text!r}; use an IANA name (Europe/Rome) or a "
            "fixed offset (+01:00, UTC)"
        ) from None


def slug(key: str) -> str:
    """A station id from an archive's name for it ("Ring Road" -> "ring-road")."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", key):
        return key
    return re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")[:64] or key


def check_station_id(value: str, where: str) -> str:
    if not _STATION_ID.match(value):
        raise ArchiveError(
            f"{where}: station id {value!r} must be 1-64 letters, digits, '.', '_' or '-' "
            '(map it to one in [stations."..."] id = "...")'
        )
    return value
