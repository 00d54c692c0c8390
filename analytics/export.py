"""Bulk CSV export of readings or rollups, streamed: for one device, one zone or the whole
city over ``[start, end)``, at raw or rollup (1m, 1h, 1d) resolution.

The rows are produced slice by slice (a day of raw readings, a day to a year of
rollup buckets per device and metric), so memory stays flat whatever the range: the API
(``GET /api/v1/export.csv``) streams them as they come, and ``civicmesh export`` writes
them to a file or stdout. Order: by time slice, then device id, then time (and metric).

Every row says where its value comes from: ``provenance`` is ``device-signed`` (a field
device's verified, signed batches) or ``imported`` (a station sealed from an archive by
``civicmesh import``, device kind ``import``); raw rows carry the quality bits and their
names; rollup rows carry count, mean, min and max (rollups keep no
quality flags).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TextIO

from analytics.store.base import DeviceStatus, Resolution, Store, StoreError
from civicmesh.errors import CivicmeshError
from civicmesh.metrics import BY_NAME, METRICS, Quality

UNITS = {m.name: m.unit for m in METRICS}
IMPORT_KIND = "import"  # the device kind ``civicmesh import`` registers its stations with


def provenance(device: DeviceStatus) -> str:
    """``imported`` for a station ``civicmesh import`` sealed from an archive (signed by
    an importer identity), ``device-signed`` for a field device's own readings."""
    return "imported" if device.kind == IMPORT_KIND else "device-signed"


DAY_MS = 86_400_000
# Time covered by one store query per device: bounded rows per query whatever the range.
SLICE_MS = {
    Resolution.RAW: DAY_MS,
    Resolution.MINUTE: DAY_MS,
    Resolution.HOUR: 31 * DAY_MS,
    Resolution.DAY: 366 * DAY_MS,
}
RAW_COLUMNS = (
    "time_utc", "ts_ms", "device_id", "zone", "lat", "lon", "metric", "unit", "value",
    "quality", "flags", "raw", "anomaly", "provenance",
)  # fmt: skip
ROLLUP_COLUMNS = (
    "bucket_start_utc", "bucket_ms", "resolution", "device_id", "zone", "lat", "lon",
    "metric", "unit", "count", "mean", "min", "max", "provenance",
)  # fmt: skip


class _Writer(Protocol):
    """The part of ``csv.writer``'s (private) type used here."""

    def writerows(self, rows: Iterable[Iterable[object]], /) -> None: ...


class ExportError(CivicmeshError):
    """A request the export cannot answer (unknown device, zone or metric, bad range)."""

    reason = "export.invalid"


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """What to export; ``device`` or ``zone`` (or neither: the city), not both."""

    start_ms: int
    end_ms: int
    resolution: Resolution = Resolution.RAW
    device: str | None = None
    zone: str | None = None
    metrics: tuple[str, ...] = ()  # empty: every metric

    def __post_init__(self) -> None:
        if self.start_ms >= self.end_ms:
            raise ExportError("The export range is empty: start must be before end")
        if self.device is not None and self.zone is not None:
            raise ExportError("Export one device or one zone (or the city), not both")
        for name in self.metrics:
            if name not in BY_NAME:
                known = ", ".join(m.name for m in METRICS)
                raise ExportError(f"Unknown metric {name!r}; known metrics: {known}")

    @property
    def scope(self) -> str:
        if self.device is not None:
            return f"device-{self.device}"
        return f"zone-{self.zone}" if self.zone is not None else "city"

    def filename(self) -> str:
        day = datetime.fromtimestamp(self.start_ms / 1000, UTC).strftime("%Y%m%d")
        last = datetime.fromtimestamp((self.end_ms - 1) / 1000, UTC).strftime("%Y%m%d")
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.scope)
        return f"civicmesh_{safe}_{self.resolution.label}_{day}-{last}.csv"


def select_devices(store: Store, request: ExportRequest) -> list[DeviceStatus]:
    """The devices the request covers, by id; an unknown device or zone is an error."""
    devices = sorted(store.devices(), key=lambda d: d.device_id)
    if request.device is not None:
        chosen = [d for d in devices if d.device_id == request.device]
        if not chosen:
            known = ", ".join(d.device_id for d in devices[:10]) or "(none)"
            more = f" and {len(devices) - 10} more" if len(devices) > 10 else ""
            raise ExportError(
                f"Unknown device {request.device!r}; known devices: {known}{more} "
                "(all of them: GET /api/v1/devices)"
            )
        return chosen
    if request.zone is not None:
        chosen = [d for d in devices if d.zone == request.zone]
        if not chosen:
            zones = ", ".join(sorted({d.zone for d in devices})) or "(none)"
            raise ExportError(f"Unknown zone {request.zone!r}; known zones: {zones}")
        return chosen
    return devices


def csv_chunks(store: Store, request: ExportRequest) -> Iterator[str]:
    """The CSV text, header first, one chunk per slice and device (never the whole
    result at once). Check the request with :func:`select_devices` before streaming:
    errors found here can no longer change an HTTP status."""
    devices = select_devices(store, request)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    raw = request.resolution is Resolution.RAW
    writer.writerow(RAW_COLUMNS if raw else ROLLUP_COLUMNS)
    yield _drain(buffer)
    step = SLICE_MS[request.resolution]
    for lo in range(request.start_ms, request.end_ms, step):
        hi = min(request.end_ms, lo + step)
        for device in devices:
            if raw:
                chunk = _raw_lines(store, device, lo, hi, request.metrics)
            else:
                _rollup_rows(writer, store, device, lo, hi, request)
                chunk = _drain(buffer)
            if chunk:
                yield chunk


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


_FLAG_NAMES: dict[int, str] = {}


def flag_names(quality: int) -> str:
    """``stuck|spike`` for the quality bits set (cached: few distinct values occur)."""
    names = _FLAG_NAMES.get(quality)
    if names is None:
        names = "|".join(f.name.lower() for f in Quality if f and quality & f and f.name)
        _FLAG_NAMES[quality] = names
    return names


_STAMPS: dict[int, str] = {}


def _iso(ms: int) -> str:
    """``2026-01-05T06:10:00.000Z``, cached: a city's devices share their window times,
    and a million rows would otherwise spend seconds in strftime."""
    text = _STAMPS.get(ms)
    if text is None:
        if len(_STAMPS) > 200_000:
            _STAMPS.clear()
        moment = datetime.fromtimestamp(ms // 1000, UTC)
        text = _STAMPS[ms] = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return text


def _quoted(*fields: object) -> str:
    """Fields as one CSV line fragment, quoted where needed (a zone may hold a comma)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(fields)
    return buffer.getvalue()


def _raw_lines(
    store: Store, device: DeviceStatus, lo: int, hi: int, metrics: tuple[str, ...]
) -> str:
    """One device's readings in ``[lo, hi)`` as CSV lines. Built with f-strings, not the
    csv module: only the device's own fields can need quoting, and they are quoted once
    (``_quoted``); the rest are numbers, metric names, units and flag names. Floats are
    written as repr(): the shortest text that reads back to the same value."""
    wanted = set(metrics)
    metric = metrics[0] if len(metrics) == 1 else None
    where = _quoted(device.device_id, device.zone, device.lat, device.lon)
    source = provenance(device)
    lines = [
        f"{_iso(r.ts_ms)},{r.ts_ms},{where},{r.metric},{UNITS[r.metric]},{r.value!r},"
        f"{r.quality},{flag_names(r.quality)},{'' if r.raw is None else repr(r.raw)},"
        f"{'' if r.anomaly is None else repr(r.anomaly)},{source}\n"
        for r in store.readings(device.device_id, lo, hi, metric)
        if not wanted or r.metric in wanted
    ]
    return "".join(lines)


def _rollup_rows(
    writer: _Writer, store: Store, device: DeviceStatus, lo: int, hi: int, request: ExportRequest
) -> None:
    resolution = request.resolution
    source = provenance(device)
    for metric in request.metrics or tuple(m.name for m in METRICS):
        points = store.rollup_series(metric, lo, hi, resolution, device_id=device.device_id)
        unit = BY_NAME[metric].unit
        writer.writerows(
            (
                _iso(p.bucket_ms),
                p.bucket_ms,
                resolution.label,
                device.device_id,
                device.zone,
                device.lat,
                device.lon,
                metric,
                unit,
                p.count,
                p.mean,
                p.min,
                p.max,
                source,
            )
            for p in points
        )


# -- the CLI ------------------------------------------------------------------------------


def parse_time(text: str, name: str) -> int:
    """Epoch ms of an ISO 8601 date or date-time (UTC when it has no offset)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ExportError(
            f"--{name} {text!r} is not an ISO 8601 date or time (e.g. 2026-01-01 or "
            "2026-01-01T06:00:00+01:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``civicmesh export``."""
    export = sub.add_parser(
        "export",
        help="export readings or rollups as CSV (a device, a zone or the city)",
        description="Stream readings (raw) or rollup buckets (1m, 1h, 1d) of a device, a "
        "zone or the whole city over [start, end) as CSV, straight from the store.",
    )
    export.add_argument("--config", type=Path, help="TOML settings file (optional)")
    export.add_argument("--database-url", help="store URL (overrides database_url)")
    scope = export.add_mutually_exclusive_group()
    scope.add_argument("--device", help="one device id")
    scope.add_argument("--zone", help="one zone (default: the whole city)")
    export.add_argument("--start", required=True, help="range start, ISO 8601 (UTC if no offset)")
    export.add_argument("--end", required=True, help="range end, exclusive, ISO 8601")
    export.add_argument(
        "--resolution", choices=[r.label for r in Resolution], default="raw",
        help="raw readings (default) or a rollup",
    )  # fmt: skip
    export.add_argument(
        "--metric", action="append", default=[], help="only this metric (repeatable)"
    )
    export.add_argument(
        "--out", default="-", help="output file (default: stdout); written via a .part file"
    )
    export.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from analytics.settings import AnalyticsSettings
    from analytics.store import open_store
    from civicmesh.config import load_settings

    request = ExportRequest(
        start_ms=parse_time(args.start, "start"),
        end_ms=parse_time(args.end, "end"),
        resolution=Resolution.parse(args.resolution),
        device=args.device,
        zone=args.zone,
        metrics=tuple(args.metric),
    )
    overrides = {"database_url": args.database_url} if args.database_url else {}
    settings = load_settings(AnalyticsSettings, args.config, overrides)
    url = settings.database_url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        # open_store would create an empty file there; an export only reads.
        raise ExportError(
            f"No store at {url[len('sqlite:///') :]}: give the central store's URL with "
            "--database-url or database_url in --config"
        )
    store = open_store(url, timescaledb=settings.storage.timescaledb)
    try:
        try:
            select_devices(store, request)  # unknown device or zone: an error, not a file
        except StoreError as exc:
            raise ExportError(
                f"Cannot read the store ({exc}); is it a civicmesh store that "
                "`civicmesh db migrate` has set up?"
            ) from None
        if args.out == "-":
            rows = _write(store, request, sys.stdout)
        else:
            rows = _write_file(store, request, Path(args.out))
    finally:
        store.close()
    print(f"exported {rows} rows ({request.scope}, {request.resolution.label})", file=sys.stderr)
    return 0


def _write_file(store: Store, request: ExportRequest, target: Path) -> int:
    """Through ``target.part``, renamed at the end: a broken export leaves no file that
    looks complete."""
    part = target.with_name(target.name + ".part")
    try:
        with part.open("w", encoding="utf-8", newline="") as handle:
            rows = _write(store, request, handle)
        part.replace(target)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise ExportError(f"Cannot write {target}: {exc.strerror or exc}") from None
    return rows


def _write(store: Store, request: ExportRequest, out: TextIO) -> int:
    lines = 0
    for chunk in csv_chunks(store, request):
        out.write(chunk)
        lines += chunk.count("\n")
    return max(0, lines - 1)
