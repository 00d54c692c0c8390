"""Archive readers: wide per-station CSV and OpenAQ-style long CSV.

A reader turns files into readings per station, ``(ts_ms, metric code, value)`` in the
catalogue's units, and counts what it skipped by reason (with the first place each
reason was met). A column or unit it cannot place is an error naming it, never a guess.
"""

from __future__ import annotations

import csv
import difflib
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

from analytics.importer.errors import ArchiveError
from analytics.importer.mapping import Mapping, StationSpec, check_station_id, slug
from analytics.importer.units import Converter, converter
from civicmesh.metrics import BY_NAME

_MIN_MS = 946_684_800_000  # 2000-01-01, the protocol's limits
_MAX_MS = 4_102_444_800_000
_HEADER_UNIT = re.compile(r"^\s*([A-Za-z0-9_]+)\s*[\(\[]\s*([^\)\]]+?)\s*[\)\]]\s*$")
_TIME_NAMES = ("timestamp", "datetime", "date_time", "time", "date", "utc")
_PART_NAMES = ("year", "month", "day", "hour")
_OPENAQ_LOCATION = ("location", "location_name", "location_id", "locationid")
_OPENAQ_TIME = ("datetime", "datetimeutc", "utc", "date.utc", "datetimelocal", "local")

Row = tuple[int, int, float]  # (ts_ms, metric code, value)


@dataclass(slots=True)
class StationData:
    """What an archive holds for one station."""

    key: str  # as the archive names it
    station_id: str  # civicmesh's name for it
    name: str
    zone: str
    lat: float | None
    lon: float | None
    rows: list[Row] = field(default_factory=list)


@dataclass(slots=True)
class Skips:
    """Readings (or rows) left out, by reason, with the first place each was met."""

    counts: Counter[str] = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str, n: int = 1) -> None:
        self.counts[reason] += n
        self.first.setdefault(reason, where)


@dataclass(slots=True)
class Archive:
    stations: dict[str, StationData]
    skips: Skips
    rows_read: int
    files: int
    ignored_columns: set[str]


# --------------------------------------------------------------------------- time


class _Clock:
    """Turns an archive's time text into epoch ms (cached: times repeat in long files)."""

    def __init__(self, tz: tzinfo | None, origin: str) -> None:
        self.tz = tz
        self.origin = origin
        self._cache: dict[object, int | str] = {}

    def localize(self, when: datetime) -> int | str:
        """Epoch ms of ``when`` (naive: in the mapping's zone), or the reason it is not."""
        if when.tzinfo is None:
            if self.tz is None:
                raise ArchiveError(
                    f"{self.origin}: the archive's times carry no UTC offset and no time zone "
                    'is given: add timezone = "Europe/Rome" (or "+01:00") to the mapping '
                    "file, or pass --timezone"
                )
            local = when.replace(tzinfo=self.tz)
            if isinstance(self.tz, ZoneInfo):
                back = local.astimezone(UTC).astimezone(self.tz).replace(tzinfo=None)
                if back != when:
                    return "local time that does not exist (daylight-saving gap)"
            when = local
        ms = int(when.timestamp() * 1000)
        if not _MIN_MS <= ms <= _MAX_MS:
            return "time outside 2000..2100"
        return ms

    def parse(self, key: object, make: Callable[[], datetime]) -> int | str:
        found = self._cache.get(key)
        if found is None:
            try:
                found = self.localize(make())
            except (ValueError, OverflowError):
                found = "unreadable time"
            if len(self._cache) < 1_000_000:
                self._cache[key] = found
        return found


class _Parsed:
    """strptime with a memory: a date repeats on every row of its day, a clock every day."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._seen: dict[str, datetime] = {}

    def get(self, text: str) -> datetime:
        found = self._seen.get(text)
        if found is None:
            found = datetime.strptime(text, self.fmt)
            if len(self._seen) < 100_000:
                self._seen[text] = found
        return found


def _parts(y: str, mo: str, d: str, h: str, mi: str) -> datetime:
    hour = int(h)
    base = datetime(int(y), int(mo), int(d), 0, int(mi or 0))
    if hour == 24:  # archives that count hours 1..24: hour 24 is the next midnight
        return base + timedelta(days=1)
    return base.replace(hour=hour)


def _iso(text: str) -> datetime:
    return datetime.fromisoformat(text.strip())


def _time_reader(
    mapping: Mapping, header: list[str], clock: _Clock, where: str
) -> tuple[Callable[[list[str]], int | str], set[str]]:
    """A function row -> epoch ms (or a skip reason), and the columns it uses."""
    t = mapping.spec.time
    index = {name: i for i, name in enumerate(header)}

    def col(name: str) -> int:
        if name not in index:
            raise ArchiveError(f"{where}: time column {name!r} is not in the header")
        return index[name]

    if t.column is not None:
        i = col(t.column)
        if t.format is None:
            return (lambda r: clock.parse(r[i], lambda: _iso(r[i]))), {t.column}
        fmt: str = t.format
        return (lambda r: clock.parse(r[i], lambda: datetime.strptime(r[i], fmt))), {t.column}
    if t.date is not None and t.clock is not None:
        di, ci = col(t.date), col(t.clock)
        dates, clocks = _Parsed(t.date_format), _Parsed(t.clock_format)

        def by_date_and_clock(r: list[str]) -> int | str:
            return clock.parse(
                (r[di], r[ci]),
                lambda: datetime.combine(dates.get(r[di]).date(), clocks.get(r[ci]).time()),
            )

        return by_date_and_clock, {t.date, t.clock}
    if t.year is not None and t.month and t.day and t.hour:
        parts = [col(t.year), col(t.month), col(t.day), col(t.hour)]
        mi = col(t.minute) if t.minute else None
        used = {t.year, t.month, t.day, t.hour} | ({t.minute} if t.minute else set())

        def by_parts(r: list[str]) -> int | str:
            values = tuple(r[i] for i in parts) + ((r[mi],) if mi is not None else ("0",))
            return clock.parse(values, lambda: _parts(*values))

        return by_parts, used
    # No [time] section: a column with a usual name, or year/month/day/hour columns.
    lowered = {name.strip().lower(): name for name in header}
    if all(p in lowered for p in _PART_NAMES):
        t.year, t.month, t.day, t.hour = (lowered[p] for p in _PART_NAMES)
        t.minute = lowered.get("minute")
        return _time_reader(mapping, header, clock, where)
    for name in _TIME_NAMES:
        if name in lowered:
            t.column = lowered[name]
            return _time_reader(mapping, header, clock, where)
    raise ArchiveError(
        f"{where}: no time column found (looked for {', '.join(_TIME_NAMES)}, or year, month, "
        "day and hour columns); name it in the mapping file's [time] section"
    )


# -------------------------------------------------------------------------- numbers


def _number_parser(mapping: Mapping) -> Callable[[str], float]:
    if mapping.spec.csv.decimal == ",":
        return lambda text: float(text.replace(",", "."))
    return float


def _station(mapping: Mapping, key: str, where: str, out: dict[str, StationData]) -> StationData:
    found = out.get(key)
    if found is not None:
        return found
    spec = mapping.spec.stations.get(key, StationSpec())
    station_id = check_station_id(spec.id or slug(key), where)
    taken = next((d.key for d in out.values() if d.station_id == station_id), None)
    if taken is not None:
        raise ArchiveError(
            f"{where}: stations {taken!r} and {key!r} would both be {station_id!r}; give one "
            f'an id in the mapping file ([stations."{key}"] id = "...")'
        )
    zone = spec.zone or mapping.spec.zone or station_id
    data = StationData(key, station_id, spec.name or key, zone, spec.lat, spec.lon)
    out[key] = data
    return data


def _header(rows: Iterator[list[str]], path: Path, mapping: Mapping) -> list[str]:
    header = next(rows, None)
    if header is None:
        raise ArchiveError(f"{path} is empty")
    if len(header) == 1:
        for sep, name in ((";", "';'"), ("\t", "a tab"), ("|", "'|'"), (",", "','")):
            if sep != mapping.spec.csv.delimiter and sep in header[0]:
                raise ArchiveError(
                    f"{path}: the header is one column; the fields look separated by {name}: "
                    f"put [csv] delimiter = {sep!r} in a mapping file (--mapping)"
                )
    return header


def _open_rows(path: Path, mapping: Mapping) -> Iterator[list[str]]:
    opts = mapping.spec.csv
    try:
        with path.open(encoding=opts.encoding, newline="") as handle:
            yield from csv.reader(handle, delimiter=opts.delimiter)
    except FileNotFoundError:
        raise ArchiveError(f"Archive file {path} not found") from None
    except IsADirectoryError:
        raise ArchiveError(
            f"{path} is a folder; give the archive's CSV files (e.g. {path}/*.csv)"
        ) from None
    except PermissionError:
        raise ArchiveError(f"Archive file {path} is not readable (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ArchiveError(
            f"{path} is not {opts.encoding} text ({exc.reason}); set [csv] encoding in the "
            'mapping file (e.g. "latin-1")'
        ) from None
    except csv.Error as exc:
        raise ArchiveError(f"{path}: not readable as CSV: {exc}") from None


# ----------------------------------------------------------------------------- wide


@dataclass(frozen=True, slots=True)
class _Column:
    index: int
    name: str
    code: int
    convert: Converter | None
    minimum: float
    maximum: float


def _absent_columns_hint(mapping: Mapping, header: list[str]) -> str:
    """A note on the mapping's [columns] that this header lacks (a typo shows up as an
    unmapped column beside one of them), with the closest header names; '' if none."""
    names = set(header) | {h.strip() for h in header}
    absent = [key for key in mapping.spec.columns if key not in names]
    if not absent:
        return ""
    notes = []
    for key in absent:
        close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
        notes.append(f"{key!r}" + (f" (the header has {close[0]!r})" if close else ""))
    return f"; the mapping's [columns] name(s) not in this header: {', '.join(notes)}"


def _wide_columns(
    mapping: Mapping, header: list[str], used: set[str], where: str
) -> tuple[list[_Column], set[str]]:
    """The metric columns of a wide file, and the ones deliberately ignored."""
    columns: list[_Column] = []
    ignored: set[str] = set()
    unknown: list[str] = []
    no_unit: list[str] = []
    ignore = set(mapping.spec.ignore)
    hint = _absent_columns_hint(mapping, header)
    for i, raw_name in enumerate(header):
        name = raw_name.strip()
        if raw_name in used:
            continue
        spec = mapping.spec.columns.get(raw_name) or mapping.spec.columns.get(name)
        if spec is not None:
            metric, unit = spec.metric, spec.unit
        elif raw_name in ignore or name in ignore:
            ignored.add(name)
            continue
        elif (match := _HEADER_UNIT.match(name)) and match.group(1).lower() in BY_NAME:
            metric, unit = match.group(1).lower(), match.group(2)
        elif name.lower() in BY_NAME:
            no_unit.append(name)
            continue
        elif not name:
            ignored.add(f"(unnamed column {i + 1})")
            continue
        else:
            unknown.append(name)
            continue
        m = BY_NAME[metric]
        try:
            convert = converter(metric, unit, mapping.reference, f"{where}: column {name!r}")
        except ArchiveError as exc:
            raise ArchiveError(f"{exc}{hint}") from None
        columns.append(_Column(i, name, m.code, convert, m.minimum, m.maximum))
    problems = []
    if no_unit:
        problems.append(
            f"column(s) {', '.join(map(repr, no_unit))} name a metric but no unit: write the "
            "unit in the header (e.g. 'no2 (ug/m3)') or map them in a mapping file's "
            "[columns] with metric and unit"
        )
    if unknown:
        problems.append(
            f"unknown column(s) {', '.join(map(repr, unknown))}: map each in the mapping "
            'file\'s [columns] ("NAME" = { metric = "no2", unit = "ug/m3" }) or list it in '
            f"ignore = [...]; known metrics: {', '.join(sorted(BY_NAME))}"
        )
    if problems:
        raise ArchiveError(f"{where}: " + "; ".join(problems) + hint)
    if not columns:
        raise ArchiveError(f"{where}: no metric column to import")
    return columns, ignored


class _Reader:
    """What reading the files of one archive accumulates."""

    def __init__(self, mapping: Mapping) -> None:
        self.mapping = mapping
        self.stations: dict[str, StationData] = {}
        self.skips = Skips()
        self.rows_read = 0
        self.ignored: set[str] = set()
        self.number = _number_parser(mapping)
        self.missing = set(mapping.spec.csv.missing)

    def is_missing(self, text: str) -> bool:
        return text in self.missing or text.strip() in self.missing

    def archive(self, files: int) -> Archive:
        self._check_mapping_used()
        return Archive(self.stations, self.skips, self.rows_read, files, self.ignored)

    def _check_mapping_used(self) -> None:
        """A [stations] entry that matched nothing while a station was read without an
        entry is a typo: refused, since the misspelt station would be imported again under
        a new identity. (Entries for stations not in this run's files are fine: a mapping
        may describe a whole archive and a run import part of it.)"""
        named = self.mapping.spec.stations
        stray = sorted(set(named) - set(self.stations))
        bare = sorted(set(self.stations) - set(named))
        if stray and bare:
            raise ArchiveError(
                f"{self.mapping.origin}: [stations] entries {', '.join(map(repr, stray))} "
                f"match no station in the files, and stations {', '.join(map(repr, bare))} "
                "have no entry: a misspelt station name? (a file's station is its name "
                "without .csv, or the value of its station column)"
            )

    # ------------------------------------------------------------------- wide

    def wide_file(self, path: Path) -> None:
        mapping = self.mapping
        rows = _open_rows(path, mapping)
        header = _header(rows, path, mapping)
        clock = _Clock(mapping.tz, mapping.origin)
        time_of, used = _time_reader(mapping, header, clock, str(path))
        station_col = mapping.spec.station_column
        if station_col is None and "station" in (h.strip().lower() for h in header):
            station_col = next(h for h in header if h.strip().lower() == "station")
        si: int | None = None
        if station_col is not None:
            if station_col not in header:
                raise ArchiveError(f"{path}: station column {station_col!r} is not in the header")
            si = header.index(station_col)
            used = used | {station_col}
        columns, ignored = _wide_columns(mapping, header, used, str(path))
        self.ignored |= ignored
        fixed = None if si is not None else _station(mapping, path.stem, str(path), self.stations)
        width = len(header)
        for line, row in enumerate(rows, start=2):
            if not any(cell.strip() for cell in row):
                continue  # an empty line (or one of only separators)
            self.rows_read += 1
            if len(row) < width:
                self.skips.add("row has fewer cells than the header", f"{path}:{line}")
                continue
            ts = time_of(row)
            if isinstance(ts, str):
                self.skips.add(ts, f"{path}:{line}", len(columns))
                continue
            if fixed is not None:
                target = fixed
            else:
                assert si is not None
                target = _station(mapping, row[si].strip(), f"{path}:{line}", self.stations)
            self.wide_cells(row, ts, columns, target.rows, f"{path}:{line}")

    def wide_cells(
        self, row: list[str], ts: int, columns: list[_Column], out: list[Row], at: str
    ) -> None:
        missing = self.missing
        for c in columns:
            text = row[c.index]
            if text in missing or text.strip() in missing:
                self.skips.add("missing value", f"{at} {c.name}")
                continue
            try:
                value = self.number(text)
            except ValueError:
                self.skips.add("not a number", f"{at} {c.name} {text[:40]!r}")
                continue
            if c.convert is not None:
                value = c.convert(value)
            if not c.minimum <= value <= c.maximum:
                reason = "not finite" if not math.isfinite(value) else "outside plausible range"
                self.skips.add(reason, f"{at} {c.name} {text[:40]!r}")
                continue
            out.append((ts, c.code, value))

    # ----------------------------------------------------------------- openaq

    def long_file(self, path: Path) -> None:
        rows = _open_rows(path, self.mapping)
        header = _header(rows, path, self.mapping)
        cols = _LongColumns.of(header, str(path))
        clock = _Clock(self.mapping.tz, self.mapping.origin)
        converters: dict[tuple[str, str], Converter | str | None] = {}
        for line, row in enumerate(rows, start=2):
            if not any(cell.strip() for cell in row):
                continue
            self.rows_read += 1
            at = f"{path}:{line}"
            if len(row) < len(header):
                self.skips.add("row has fewer cells than the header", at)
                continue
            found = self.long_row(row, cols, clock, converters)
            if isinstance(found, str):
                self.skips.add(found, at)
                continue
            station = _station(self.mapping, row[cols.location].strip(), at, self.stations)
            if station.lat is None and cols.lat is not None and cols.lon is not None:
                station.lat, station.lon = _coordinates(row[cols.lat], row[cols.lon])
            station.rows.append(found)

    def long_row(
        self,
        row: list[str],
        cols: _LongColumns,
        clock: _Clock,
        converters: dict[tuple[str, str], Converter | str | None],
    ) -> Row | str:
        """The reading of one row, or why it is skipped."""
        parameter, unit = row[cols.parameter].strip().lower(), row[cols.unit].strip()
        spec = BY_NAME.get(parameter)
        if spec is None:
            return f"parameter {parameter!r} is not a civicmesh metric"
        conv = converters.get((parameter, unit), "")
        if conv == "":
            try:
                conv = converter(parameter, unit, self.mapping.reference, f"parameter {parameter}")
            except ArchiveError as exc:
                conv = str(exc)
            converters[(parameter, unit)] = conv
        if isinstance(conv, str):
            return conv
        text = row[cols.value]
        if self.is_missing(text):
            return "missing value"
        stamp = row[cols.time]
        ts = clock.parse(stamp, lambda: _iso(stamp))
        if isinstance(ts, str):
            return ts
        try:
            value = self.number(text)
        except ValueError:
            return "not a number"
        if conv is not None:
            value = conv(value)
        if not spec.minimum <= value <= spec.maximum:
            return "outside plausible range"
        return (ts, spec.code, value)


@dataclass(frozen=True, slots=True)
class _LongColumns:
    location: int
    parameter: int
    value: int
    unit: int
    time: int
    lat: int | None
    lon: int | None

    @classmethod
    def of(cls, header: list[str], where: str) -> _LongColumns:
        lowered = [h.strip().lower() for h in header]
        return cls(
            _find(header, _OPENAQ_LOCATION, "location", where),
            _find(header, ("parameter",), "parameter", where),
            _find(header, ("value",), "value", where),
            _find(header, ("unit",), "unit", where),
            _find(header, _OPENAQ_TIME, "datetime", where),
            lowered.index("latitude") if "latitude" in lowered else None,
            lowered.index("longitude") if "longitude" in lowered else None,
        )


def _find(header: list[str], names: tuple[str, ...], what: str, where: str) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise ArchiveError(
        f"{where}: no {what} column (looked for {', '.join(names)}); an OpenAQ-style long CSV "
        "has location, parameter, value, unit and datetime"
    )


def _coordinates(lat: str, lon: str) -> tuple[float | None, float | None]:
    """A station's position from its row (optional: unreadable leaves it unplaced)."""
    try:
        y, x = float(lat), float(lon)
    except ValueError:
        return None, None
    return (y, x) if -90 <= y <= 90 and -180 <= x <= 180 else (None, None)


def read_wide(paths: list[Path], mapping: Mapping) -> Archive:
    reader = _Reader(mapping)
    for path in paths:
        reader.wide_file(path)
    return reader.archive(len(paths))


def read_openaq(paths: list[Path], mapping: Mapping) -> Archive:
    reader = _Reader(mapping)
    for path in paths:
        reader.long_file(path)
    return reader.archive(len(paths))


def read_archive(paths: list[Path], mapping: Mapping) -> Archive:
    if not paths:
        raise ArchiveError("No archive files given")
    if mapping.spec.format == "openaq":
        return read_openaq(paths, mapping)
    return read_wide(paths, mapping)
