"""Backend-independent pieces of the write path: outcome resolution, payload decoding."""

from __future__ import annotations

import base64
import binascii
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

from analytics.store.base import (
    ZONE_ROLLUPS,
    Completeness,
    Resolution,
    SeriesPoint,
    Store,
    StoredBatch,
    StoreError,
    WriteOutcome,
    ZoneAggregate,
)
from civicmesh.metrics import BY_CODE, BY_NAME
from civicmesh.quarantine import QuarantineRecord

BatchKey = tuple[str, int]

# Every metric code, so "all metrics of a device" stays an index range scan on
# (device_id, metric, ts) instead of a scan of everything the device ever sent.
ALL_METRIC_CODES: tuple[int, ...] = tuple(sorted(BY_CODE))


def metric_code(name: str) -> int:
    """Wire code of a metric name; the error lists the known names."""
    try:
        return BY_NAME[name].code
    except KeyError:
        known = ", ".join(sorted(BY_NAME))
        raise StoreError(f"Unknown metric {name!r}; known metrics: {known}") from None


def metric_name(code: int) -> str:
    return BY_CODE[code].name


def unique_batches(batches: Sequence[StoredBatch]) -> list[StoredBatch]:
    """First batch of each ``(device_id, seq)``, sorted by key.

    Sorting gives every writer the same lock order on the ledger, so two workers writing
    overlapping lists (a redelivery) wait for each other instead of deadlocking.
    """
    first: dict[BatchKey, StoredBatch] = {}
    for batch in batches:
        first.setdefault((batch.device_id, batch.seq), batch)
    return [first[key] for key in sorted(first)]


def resolve_outcomes(
    batches: Sequence[StoredBatch],
    inserted: set[BatchKey],
    stored_hashes: dict[BatchKey, bytes],
) -> list[WriteOutcome]:
    """One outcome per batch, in the caller's order.

    ``inserted``: keys written by this call; ``stored_hashes``: payload hash already in
    the ledger for keys that were not. A key repeated within the list is compared with
    its first occurrence.
    """
    outcomes: list[WriteOutcome] = []
    seen: dict[BatchKey, bytes] = {}
    for batch in batches:
        key = (batch.device_id, batch.seq)
        if key in seen:
            reference = seen[key]
        elif key in inserted:
            seen[key] = batch.payload_hash
            outcomes.append(WriteOutcome.INSERTED)
            continue
        else:
            try:
                reference = stored_hashes[key]
            except KeyError:
                raise StoreError(
                    f"Ledger row for device {key[0]} seq {key[1]} neither inserted nor found"
                ) from None
            seen[key] = reference
        same = reference == batch.payload_hash
        outcomes.append(WriteOutcome.DUPLICATE if same else WriteOutcome.CONFLICT)
    return outcomes


def newest_reading_ms(batch: StoredBatch) -> int | None:
    return batch.newest_ms


def quarantine_payload(record: QuarantineRecord) -> bytes:
    """The kept bytes of a quarantine record (base64 in the record, raw in the store)."""
    try:
        return base64.b64decode(record.payload_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise StoreError(
            f"Quarantine record from {record.source!r} carries malformed base64 payload: {exc}"
        ) from None


def payload_b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode("ascii")


def oldest_reading_ms(batch: StoredBatch) -> int | None:
    return batch.oldest_ms


def touched_ranges(batches: Sequence[StoredBatch]) -> list[tuple[str, int, int]]:
    """Per device, the time range ``(device_id, lo_ms, hi_ms)`` the readings cover: what
    the rollup refresher must recompute after these batches are written."""
    ranges: dict[str, tuple[int, int]] = {}
    for batch in batches:
        lo, hi = batch.oldest_ms, batch.newest_ms
        if lo is None or hi is None:
            continue
        old = ranges.get(batch.device_id)
        ranges[batch.device_id] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    return [(device, lo, hi) for device, (lo, hi) in sorted(ranges.items())]


def merge_ranges(
    ranges: Iterable[tuple[str, int, int]], slack_ms: int = 3_600_000
) -> list[tuple[str, int, int]]:
    """Merge each device's ranges that overlap or lie within ``slack_ms`` of each other,
    so a live stream plus one late batch are two small ranges, not one huge one."""
    merged: list[tuple[str, int, int]] = []
    for device, lo, hi in sorted(ranges):
        if merged and merged[-1][0] == device and lo <= merged[-1][2] + slack_ms:
            merged[-1] = (device, merged[-1][1], max(merged[-1][2], hi))
        else:
            merged.append((device, lo, hi))
    return merged


class SqlRollupQueries(Store):
    """The rollup queries in one SQL text for both SQL backends.

    A backend supplies how a parameter is written, how a time goes in and how a time
    column comes out as epoch ms, and how a query runs; the SQL itself is shared.
    """

    @abstractmethod
    def _param(self, name: str) -> str:
        """A named parameter in the driver's style."""

    @abstractmethod
    def _time(self, ms: int) -> Any:
        """The parameter value for a time given in epoch ms."""

    @abstractmethod
    def _epoch_ms(self, column: str) -> str:
        """SQL for a time column as integer epoch ms."""

    @abstractmethod
    def _rows(self, what: str, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run a read query; store errors come out as StoreError."""

    def rollup_series(
        self,
        metric: str,
        start_ms: int,
        end_ms: int,
        resolution: Resolution,
        *,
        zone: str | None = None,
        device_id: str | None = None,
    ) -> list[SeriesPoint]:
        if resolution is Resolution.RAW:
            return self.series(metric, start_ms, end_ms, 60, zone=zone, device_id=device_id)
        p = self._param
        params = {
            "metric": metric_code(metric),
            "start": self._time(start_ms),
            "end": self._time(end_ms),
            "device": device_id,
            "zone": zone,
        }
        where = [f"r.metric = {p('metric')}", f"r.bucket >= {p('start')}", f"r.bucket < {p('end')}"]
        if device_id is None and resolution in ZONE_ROLLUPS:
            # A zone or the city: the zone rollup has a few rows per bucket.
            table = resolution.zone_table
            if zone is not None:
                where.append(f"r.zone = {p('zone')}")
        else:
            table = resolution.table
            if device_id is not None:
                where.append(f"r.device_id = {p('device')}")
            if zone is not None:
                where.append(
                    f"r.device_id IN (SELECT device_id FROM devices WHERE zone = {p('zone')})"
                )
        sql = f"""
            SELECT {self._epoch_ms("r.bucket")}, CAST(sum(r.n) AS BIGINT), sum(r.sum) / sum(r.n),
                   min(r.min), max(r.max)
            FROM {table} r
            WHERE {" AND ".join(where)}
            GROUP BY r.bucket ORDER BY r.bucket
        """
        return [SeriesPoint(*row) for row in self._rows("reading a rollup series", sql, params)]

    def zone_aggregates(
        self, start_ms: int, end_ms: int, resolution: Resolution = Resolution.HOUR
    ) -> list[ZoneAggregate]:
        start, end = self._param("start"), self._param("end")
        if resolution in ZONE_ROLLUPS:
            per_zone = f"""
                SELECT r.zone, r.metric, sum(r.n), sum(r.sum), min(r.min), max(r.max)
                FROM {resolution.zone_table} r
                WHERE r.bucket >= {start} AND r.bucket < {end}
                GROUP BY r.zone, r.metric"""
        else:
            raw = resolution is Resolution.RAW
            source = "readings" if raw else resolution.table
            time = "ts" if raw else "bucket"
            parts = (
                "count(*), sum(r.value), min(r.value), max(r.value)"
                if raw
                else "sum(r.n), sum(r.sum), min(r.min), max(r.max)"
            )
            per_zone = f"""
                SELECT d.zone, r.metric, {parts}
                FROM {source} r JOIN devices d ON d.device_id = r.device_id
                WHERE r.{time} >= {start} AND r.{time} < {end}
                GROUP BY d.zone, r.metric"""
        sql = f"""
            WITH per_zone (zone, metric, n, total, lo, hi) AS ({per_zone}
            )
            SELECT zone, metric, n, total / n, lo, hi FROM per_zone
            UNION ALL
            SELECT NULL, metric, sum(n), sum(total) / sum(n), min(lo), max(hi)
            FROM per_zone GROUP BY metric
            ORDER BY 1 NULLS FIRST, 2
        """
        params = {"start": self._time(start_ms), "end": self._time(end_ms)}
        return [
            ZoneAggregate(zone, metric_name(code), int(n), float(mean), lo, hi)
            for zone, code, n, mean, lo, hi in self._rows("aggregating zones", sql, params)
        ]

    def completeness(
        self, start_ms: int, end_ms: int, interval_s: int, *, zone: str | None = None
    ) -> list[Completeness]:
        if interval_s <= 0:
            raise StoreError(f"Completeness interval must be positive, not {interval_s}")
        slots = max(0, (end_ms - start_ms) // (interval_s * 1000))
        p = self._param
        sql = f"""
            SELECT d.device_id, d.zone, count(r.metric), CAST(coalesce(sum(r.n), 0) AS BIGINT)
            FROM devices d
            LEFT JOIN (
                SELECT device_id, metric, sum(n) AS n FROM rollup_1h
                WHERE bucket >= {p("start")} AND bucket < {p("end")}
                GROUP BY device_id, metric
            ) r ON r.device_id = d.device_id
            WHERE CAST({p("zone")} AS TEXT) IS NULL OR d.zone = CAST({p("zone")} AS TEXT)
            GROUP BY d.device_id, d.zone ORDER BY d.device_id
        """
        params = {"start": self._time(start_ms), "end": self._time(end_ms), "zone": zone}
        return [
            Completeness(device, zone_, metrics, metrics * slots, int(received))
            for device, zone_, metrics, received in self._rows(
                "measuring completeness", sql, params
            )
        ]
