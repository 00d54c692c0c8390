"""Backend-independent pieces of the write path: outcome resolution, payload decoding."""

from __future__ import annotations

import base64
import binascii
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from analytics.store.base import (
    ZONE_ROLLUPS,
    ChainHead,
    Completeness,
    DeviceHealth,
    LedgerEntry,
    LedgerSpan,
    ReportRecord,
    Resolution,
    SeriesPoint,
    Store,
    StoredBatch,
    StoreError,
    WriteOutcome,
    ZoneAggregate,
    ZoneShape,
)
from civicmesh.metrics import BY_CODE, BY_NAME
from civicmesh.quarantine import BENIGN_REASONS, UNATTRIBUTED_PREFIXES, QuarantineRecord

# Benign records (a redelivery looks like a replay) are evidence, not faults: the counts
# that reports and device health read leave them out. Constant text, so safe in SQL.
_BENIGN = ", ".join(f"'{reason}'" for reason in sorted(BENIGN_REASONS))
# ... and the reports' count leaves out records anyone could have put a device's name on.
# (substr, not LIKE: psycopg reads every % in the text as a placeholder)
_ATTRIBUTED = " AND ".join(f"substr(q.reason, 1, {len(p)}) <> '{p}'" for p in UNATTRIBUTED_PREFIXES)

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
    """The queries both SQL backends share, in one SQL text: the rollups, the reports'
    reads, the ledger and quarantine listings.

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
    def _transaction(self, what: str) -> AbstractContextManager[Any]:
        """One write transaction; yields what ``execute(sql, params)`` is called on."""

    @abstractmethod
    def _rows(self, what: str, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run a read query; store errors come out as StoreError."""

    # -- shared reads: the same SQL on both SQL backends ---------------------

    def ledger(self, device_id: str, *, after_seq: int = 0, limit: int = 1000) -> list[LedgerEntry]:
        ms = self._epoch_ms
        sql = f"""
            SELECT device_id, seq, payload_hash, prev_hash, {ms("sealed_at")}, gateway_id,
                   {ms("received_at")}, {ms("ingested_at")}, n_readings, device_message,
                   gateway_message
            FROM batches WHERE device_id = {self._param("device")} AND seq > {self._param("after")}
            ORDER BY seq LIMIT {self._param("limit")}
        """
        params = {"device": device_id, "after": after_seq, "limit": max(limit, 0)}
        rows = self._rows("reading the ledger", sql, params)
        return [
            LedgerEntry(
                dev, seq, bytes(ph), bytes(prev), sealed, gw, recv, ingested, n, bytes(dm),
                bytes(gm),
            )
            for dev, seq, ph, prev, sealed, gw, recv, ingested, n, dm, gm in rows
        ]  # fmt: skip

    def quarantined(self, limit: int = 100) -> list[QuarantineRecord]:
        sql = f"""
            SELECT reason, detail, source, topic, {self._epoch_ms("received_at")}, payload_size,
                   payload_sha256, payload, device_id, seq
            FROM quarantine ORDER BY received_at DESC, id DESC LIMIT {self._param("limit")}
        """
        rows = self._rows("reading quarantine", sql, {"limit": max(limit, 0)})
        return [
            QuarantineRecord(
                reason=reason,
                detail=detail,
                source=source,
                topic=topic,
                received_at_ms=received,
                payload_size=size,
                payload_sha256=sha,
                payload_b64=payload_b64(bytes(payload)),
                device_id=device,
                seq=seq,
            )
            for reason, detail, source, topic, received, size, sha, payload, device, seq in rows
        ]

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

    # -- what reports rest on --------------------------------------------------

    def ledger_span(self, start_ms: int, end_ms: int, *, zone: str | None = None) -> LedgerSpan:
        p = self._param
        sql = f"""
            WITH span AS (
                SELECT b.device_id, min(b.seq) AS first_seq, max(b.seq) AS last_seq,
                       count(*) AS n, min(b.received_at) AS lo, max(b.received_at) AS hi
                FROM batches b JOIN devices d ON d.device_id = b.device_id
                WHERE b.newest_reading >= {p("start")} AND b.oldest_reading < {p("end")}
                  AND (CAST({p("zone")} AS TEXT) IS NULL OR d.zone = CAST({p("zone")} AS TEXT))
                GROUP BY b.device_id
            )
            SELECT s.device_id, s.first_seq, s.last_seq, s.n, {self._epoch_ms("s.lo")},
                   {self._epoch_ms("s.hi")}, b.payload_hash
            FROM span s JOIN batches b ON b.device_id = s.device_id AND b.seq = s.last_seq
            ORDER BY s.device_id
        """
        params = {"start": self._time(start_ms), "end": self._time(end_ms), "zone": zone}
        heads = [
            ChainHead(device, int(first), int(last), int(n), int(lo), int(hi), bytes(head))
            for device, first, last, n, lo, hi, head in self._rows(
                "reading the ledger span", sql, params
            )
        ]
        return LedgerSpan(start_ms, end_ms, zone, tuple(heads))

    def flagged_readings(
        self, start_ms: int, end_ms: int, mask: int, *, zone: str | None = None
    ) -> dict[str, int]:
        p = self._param
        codes = ", ".join(str(code) for code in ALL_METRIC_CODES)
        sql = f"""
            SELECT r.device_id, count(*)
            FROM readings r
            WHERE r.device_id IN (
                    SELECT device_id FROM devices
                    WHERE CAST({p("zone")} AS TEXT) IS NULL OR zone = CAST({p("zone")} AS TEXT))
              AND r.metric IN ({codes})
              AND r.ts >= {p("start")} AND r.ts < {p("end")}
              AND (r.quality & {p("mask")}) <> 0
            GROUP BY r.device_id ORDER BY r.device_id
        """
        params = {
            "start": self._time(start_ms),
            "end": self._time(end_ms),
            "zone": zone,
            "mask": mask,
        }
        return {d: int(n) for d, n in self._rows("counting flagged readings", sql, params)}

    def quarantine_counts(
        self, start_ms: int, end_ms: int, *, zone: str | None = None
    ) -> dict[str, int]:
        p = self._param
        sql = f"""
            SELECT q.device_id, count(*)
            FROM quarantine q JOIN devices d ON d.device_id = q.device_id
            WHERE q.received_at >= {p("start")} AND q.received_at < {p("end")}
              AND q.reason NOT IN ({_BENIGN}) AND {_ATTRIBUTED}
              AND (CAST({p("zone")} AS TEXT) IS NULL OR d.zone = CAST({p("zone")} AS TEXT))
            GROUP BY q.device_id ORDER BY q.device_id
        """
        params = {"start": self._time(start_ms), "end": self._time(end_ms), "zone": zone}
        return {d: int(n) for d, n in self._rows("counting quarantine records", sql, params)}

    # -- reports -----------------------------------------------------------------

    def save_report(self, report: ReportRecord) -> int:
        p = self._param
        columns = (
            "scope",
            "kind",
            "period_start",
            "period_end",
            "created_at",
            "text",
            "narrative_source",
            "fallback_reason",
            "model",
            "prompt_version",
            "fact_sheet",
            "ledger_digest",
            "ledger_batches",
        )
        params = {
            "scope": report.scope,
            "kind": report.kind,
            "period_start": self._time(report.period_start_ms),
            "period_end": self._time(report.period_end_ms),
            "created_at": self._time(report.created_ms),
            "text": report.text,
            "narrative_source": report.narrative_source,
            "fallback_reason": report.fallback_reason,
            "model": report.model,
            "prompt_version": report.prompt_version,
            "fact_sheet": report.fact_sheet_json,
            "ledger_digest": report.ledger_digest,
            "ledger_batches": report.ledger_batches,
        }
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns[3:])
        sql = f"""
            INSERT INTO reports ({", ".join(columns)})
            VALUES ({
            ", ".join(self._json_param(c) if c == "fact_sheet" else p(c) for c in columns)
        })
            ON CONFLICT (scope, kind, period_start) DO UPDATE SET {updates}
            RETURNING id
        """
        with self._transaction(f"saving the {report.kind} report of {report.scope}") as c:
            row = c.execute(sql, params).fetchone()
        return int(row[0])

    def reports(
        self, *, scope: str | None = None, kind: str | None = None, limit: int = 20
    ) -> list[ReportRecord]:
        p = self._param
        sql = f"""
            SELECT scope, kind, {self._epoch_ms("period_start")}, {self._epoch_ms("period_end")},
                   {self._epoch_ms("created_at")}, text, narrative_source, fallback_reason,
                   model, prompt_version, CAST(fact_sheet AS TEXT), ledger_digest,
                   ledger_batches, id
            FROM reports
            WHERE (CAST({p("scope")} AS TEXT) IS NULL OR scope = CAST({p("scope")} AS TEXT))
              AND (CAST({p("kind")} AS TEXT) IS NULL OR kind = CAST({p("kind")} AS TEXT))
            ORDER BY period_start DESC, scope LIMIT {p("limit")}
        """
        params = {"scope": scope, "kind": kind, "limit": int(limit)}
        return [
            ReportRecord(
                scope=row[0],
                kind=row[1],
                period_start_ms=int(row[2]),
                period_end_ms=int(row[3]),
                created_ms=int(row[4]),
                text=row[5],
                narrative_source=row[6],
                fallback_reason=row[7],
                model=row[8],
                prompt_version=row[9],
                fact_sheet_json=row[10],
                ledger_digest=row[11],
                ledger_batches=int(row[12]),
                id=int(row[13]),
            )
            for row in self._rows("reading reports", sql, params)
        ]

    def _json_param(self, name: str) -> str:
        """A JSON text parameter as the column type wants it (jsonb on PostgreSQL)."""
        return self._param(name)

    # -- dashboard -------------------------------------------------------------

    def zone_shapes(self) -> list[ZoneShape]:
        sql = f"""
            SELECT zone, label, geometry, {self._epoch_ms("updated_at")}
            FROM zone_shapes ORDER BY zone
        """
        return [
            ZoneShape(zone, label, geometry, int(updated))
            for zone, label, geometry, updated in self._rows("reading zone shapes", sql, {})
        ]

    def save_zone_shape(self, shape: ZoneShape) -> None:
        p = self._param
        sql = f"""
            INSERT INTO zone_shapes (zone, label, geometry, updated_at)
            VALUES ({p("zone")}, {p("label")}, {p("geometry")}, {p("updated")})
            ON CONFLICT (zone) DO UPDATE SET label = excluded.label,
                geometry = excluded.geometry, updated_at = excluded.updated_at
        """
        params = {
            "zone": shape.zone,
            "label": shape.label,
            "geometry": shape.geometry_json,
            "updated": self._time(shape.updated_ms),
        }
        with self._transaction(f"saving the shape of zone {shape.zone}") as c:
            c.execute(sql, params)

    def device_health(self) -> list[DeviceHealth]:
        sql = f"""
            SELECT device_id, {self._epoch_ms("reported_at")}, {self._epoch_ms("received_at")},
                   gateway_id, outbox_batches, outbox_readings, model_version, agent_version
            FROM device_health ORDER BY device_id
        """
        return [
            DeviceHealth(d, int(rep), int(rec), gw, int(ob), int(orr), mv, av)
            for d, rep, rec, gw, ob, orr, mv, av in self._rows("reading device health", sql, {})
        ]

    def save_device_health(self, reports: Sequence[DeviceHealth]) -> None:
        if not reports:
            return
        p = self._param
        sql = f"""
            INSERT INTO device_health (device_id, reported_at, received_at, gateway_id,
                                       outbox_batches, outbox_readings, model_version,
                                       agent_version)
            VALUES ({p("device")}, {p("reported")}, {p("received")}, {p("gateway")},
                    {p("batches")}, {p("readings")}, {p("model")}, {p("agent")})
            ON CONFLICT (device_id) DO UPDATE SET
                reported_at = excluded.reported_at, received_at = excluded.received_at,
                gateway_id = excluded.gateway_id, outbox_batches = excluded.outbox_batches,
                outbox_readings = excluded.outbox_readings,
                model_version = excluded.model_version, agent_version = excluded.agent_version
            WHERE device_health.reported_at <= excluded.reported_at
        """
        with self._transaction(f"saving {len(reports)} device health reports") as c:
            for r in reports:
                c.execute(
                    sql,
                    {
                        "device": r.device_id,
                        "reported": self._time(r.reported_ms),
                        "received": self._time(r.received_ms),
                        "gateway": r.gateway_id,
                        "batches": r.outbox_batches,
                        "readings": r.outbox_readings,
                        "model": r.model_version,
                        "agent": r.agent_version,
                    },
                )

    def model_versions(self) -> dict[str, str]:
        sql = """
            SELECT b.device_id, b.model_version
            FROM batches b
            JOIN (SELECT device_id, max(seq) AS seq FROM batches GROUP BY device_id) n
              ON n.device_id = b.device_id AND n.seq = b.seq
        """
        return {d: v for d, v in self._rows("reading model versions", sql, {})}

    def quarantine_reasons(self, start_ms: int, end_ms: int) -> dict[str, dict[str, int]]:
        p = self._param
        sql = f"""
            SELECT device_id, reason, count(*) FROM quarantine
            WHERE device_id IS NOT NULL AND reason NOT IN ({_BENIGN})
              AND received_at >= {p("start")} AND received_at < {p("end")}
            GROUP BY device_id, reason
        """
        params = {"start": self._time(start_ms), "end": self._time(end_ms)}
        out: dict[str, dict[str, int]] = {}
        for device, reason, n in self._rows("counting quarantine reasons", sql, params):
            out.setdefault(device, {})[reason] = int(n)
        return out


# Retention and late data: a rollup bucket is rebuilt only from a source that still holds
# all of that bucket's data. A source "trimmed before T" (its retention dropped what lay
# before T) is complete only for buckets starting at or after T rounded up to the bucket.
RAW_SOURCE = "readings"
# Imported history (devices of kind "import") is trimmed only when a retention policy
# says include_imported; what was trimmed of it is recorded apart, under the relation's
# name with this suffix, so late imported data is judged by its own horizon.
IMPORTED_SUFFIX = "@import"
IMPORTER_IDS = "SELECT device_id FROM devices WHERE kind = 'import'"


def horizons_for(horizons: dict[str, int], imported: bool) -> dict[str, int]:
    """The horizons that apply to one device's data: its kind's own."""
    if not imported:
        return {k: v for k, v in horizons.items() if not k.endswith(IMPORTED_SUFFIX)}
    n = len(IMPORTED_SUFFIX)
    return {k[:-n]: v for k, v in horizons.items() if k.endswith(IMPORTED_SUFFIX)}


def zone_horizons(horizons: dict[str, int], only_imported: bool) -> dict[str, int]:
    """The horizons a zone's rollups are bound by: an all-imported zone its own; a mixed
    zone the later of both (a bucket is rebuilt only where every device's source is
    whole)."""
    if only_imported:
        return horizons_for(horizons, True)
    out = horizons_for(horizons, False)
    for k, v in horizons_for(horizons, True).items():
        out[k] = max(out.get(k, v), v)
    return out


def rebuild_plan(
    lo_ms: int,
    hi_ms: int,
    step_ms: int,
    sources: Sequence[tuple[str, int | None]],
) -> tuple[list[tuple[str, int, int]], int]:
    """How to rebuild the buckets of width ``step_ms`` covering ``[lo_ms, hi_ms]``.

    ``sources`` are the levels the buckets may be rebuilt from, preferred first (the level
    just below, then finer ones down to the readings), each with the time before which its
    retention has dropped data (None: nothing dropped). Returns ``(pieces, skipped_ms)``:
    ``(source, lo, hi)`` pieces with bucket-aligned bounds, newest first, and how much of
    the range (ms) no source holds completely. Those buckets are kept as they are: a
    correct bucket is never replaced by one rebuilt from partial data."""
    first = (lo_ms // step_ms) * step_ms
    upper = (hi_ms // step_ms) * step_ms + step_ms
    pieces: list[tuple[str, int, int]] = []
    for source, horizon in sources:
        if upper <= first:
            break
        start = first if horizon is None else max(first, -(-horizon // step_ms) * step_ms)
        if start < upper:
            pieces.append((source, start, upper))
            upper = start
    return pieces, max(upper - first, 0)
