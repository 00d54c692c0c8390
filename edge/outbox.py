"""The durable outbox: readings are written here before anything is sent.

SQLite in WAL mode with ``synchronous=FULL``: a committed reading or sealed batch
survives a power cut. Sealing takes the oldest unsealed readings, signs them as the next
batch of the device's hash chain and stores the exact bytes in one transaction; the
same bytes are re-sent until they are confirmed, so a seq never changes content.

A sealed batch leaves the outbox when the gateway's receipt names it (the gateway has
buffered it durably); the broker's PUBACK alone only marks it published, and a batch
published but not confirmed is published again when :mod:`civicmesh.custody` says so.
A broker that loses its queue on restart therefore loses nothing. (With ``await_receipts`` off, the
PUBACK releases it, for a setup without a civicmesh gateway.)

The bound covers the whole outbox: readings (unsealed ones and those in sealed
batches), bytes (sealed messages plus an estimate per unsealed row) and a reserve of
free disk space. Past it the overflow policy (``drop_oldest``) drops the oldest data
first, sealed batches before unsealed readings (they are older), counts it in
``dropped_total`` and logs it at warning. A disk that fills up anyway (SQLite's
"database or disk is full") makes room the same way; what cannot be written is dropped
and counted, and the agent keeps running.

A **high-water mark** per source (driver) and metric is kept in the same transaction as
the readings: a driver that reads its history again after a restart (replay drivers,
data loggers) cannot queue a reading twice under a new seq.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from civicmesh.custody import ResendPlan
from civicmesh.identity import Signer
from civicmesh.metrics import BY_CODE, BY_NAME
from civicmesh.protocol import (
    GENESIS_HASH,
    MAX_SPAN_MS,
    Reading,
    SignedBatch,
    make_payload,
    message_digest,
    seal_batch,
)
from civicmesh.queue import DurableQueue, QueueError, QueueFullError
from civicmesh.timeutil import now_ms

log = logging.getLogger(__name__)

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "initial",
        """
        CREATE TABLE pending (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts INTEGER NOT NULL, metric INTEGER NOT NULL, value REAL, quality INTEGER NOT NULL,
            raw REAL, anomaly REAL
        );
        CREATE TABLE sealed (
            seq INTEGER PRIMARY KEY, hash BLOB NOT NULL, message BLOB NOT NULL,
            sealed_ms INTEGER NOT NULL
        );
        CREATE TABLE head (
            id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash BLOB NOT NULL,
            dropped_total INTEGER NOT NULL DEFAULT 0
        );
        INSERT INTO head (id, seq, hash) VALUES (1, 0, zeroblob(32));
        """,
    ),
    (
        2,
        "receipts",
        """
        ALTER TABLE sealed ADD COLUMN digest BLOB;
        ALTER TABLE sealed ADD COLUMN published_ms INTEGER;
        UPDATE sealed SET digest = message_digest(message);
        CREATE INDEX sealed_digest ON sealed (digest)
        """,
    ),
    (
        3,
        "bounds and high-water marks",
        """
        ALTER TABLE sealed ADD COLUMN readings INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE head ADD COLUMN dropped_batches INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE head ADD COLUMN replayed_total INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE high_water (
            source TEXT NOT NULL, metric INTEGER NOT NULL, ts INTEGER NOT NULL,
            PRIMARY KEY (source, metric)
        )
        """,
    ),
)

# What one unsealed reading row takes in SQLite, about (for the byte bound).
PENDING_ROW_BYTES = 64
# Free space kept once the disk was found full: room for the WAL (1 MiB, see
# civicmesh.sqlite_state) and a little more.
LEARNED_MIN_FREE_BYTES = 1536 * 1024
# The reserve file beside the outbox (see DurableQueue.keep_reserve).
RESERVE_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending_readings: int
    sealed_batches: int  # sealed and not yet confirmed by a receipt
    unpublished_batches: int  # of those, not yet acknowledged by the broker
    oldest_pending_ms: int | None
    last_seq: int
    dropped_total: int  # readings dropped by the overflow policy (in batches or not)
    dropped_batches: int = 0  # sealed batches among them
    replayed_total: int = 0  # readings a driver delivered again, below the high-water mark
    sealed_readings: int = 0
    bytes: int = 0  # what the bound counts: sealed messages + unsealed rows (estimate)


@dataclass(frozen=True, slots=True)
class OutboxBounds:
    """The bound on the whole outbox (see the module docstring)."""

    max_readings: int = 500_000
    max_bytes: int = 256 * 1024 * 1024
    min_free_bytes: int = 0  # keep this much of the disk free


class Outbox:
    def __init__(
        self,
        path: Path,
        *,
        max_readings: int = 500_000,
        await_receipts: bool = True,
        max_bytes: int = 256 * 1024 * 1024,
        min_free_bytes: int = 0,
    ) -> None:
        self.path = path
        self.bounds = OutboxBounds(max_readings, max_bytes, min_free_bytes)
        self.await_receipts = await_receipts
        self._queue = DurableQueue(path, MIGRATIONS)
        # Dropped while the disk was too full to record it; written with the next write.
        self._dropped_unrecorded = 0
        # After the disk was once found full: keep this much free (the WAL needs room).
        self._learned_min_free = 0
        self._queue.keep_reserve(RESERVE_BYTES)

    @property
    def max_readings(self) -> int:
        return self.bounds.max_readings

    def close(self) -> None:
        self._queue.close()

    # ----------------------------------------------------------------- writing

    def add(self, readings: Sequence[Reading], source: str = "") -> int:
        """Store readings durably; return how many old readings the bound dropped.

        Readings of ``source`` at or below its high-water mark (per metric) were queued
        before and are skipped (counted in ``replayed_total``). A full disk is handled:
        room is made by the overflow policy and, failing that, these readings are
        dropped and counted; nothing is raised."""
        if not readings:
            return 0
        rows = [
            (r.ts_ms, BY_NAME[r.metric].code, r.value, r.quality, r.raw, r.anomaly)
            for r in readings
        ]
        for attempt in range(2):
            try:
                with self._queue.write() as db:
                    fresh = self._above_high_water(db, source, rows)
                    db.executemany(
                        "INSERT INTO pending (ts, metric, value, quality, raw, anomaly) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        fresh,
                    )
                    dropped = self._enforce_bounds(db)
                if self._learned_min_free:
                    self._queue.keep_reserve(RESERVE_BYTES)
                return dropped
            except QueueFullError as exc:
                if attempt == 0 and self._make_room(exc):
                    continue
                self._note_unrecorded(len(rows), str(exc))
                return len(rows)
        raise AssertionError("unreachable")

    def _above_high_water(
        self, db: sqlite3.Connection, source: str, rows: list[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        """The rows newer than ``source``'s high-water mark; the mark moves up to them."""
        marks = dict(
            db.execute("SELECT metric, ts FROM high_water WHERE source = ?", (source,)).fetchall()
        )
        fresh = [row for row in rows if row[0] > marks.get(row[1], -1)]
        if len(fresh) < len(rows):
            skipped = len(rows) - len(fresh)
            db.execute(
                "UPDATE head SET replayed_total = replayed_total + ? WHERE id = 1", (skipped,)
            )
            log.warning(
                "skipped %d readings of %s at or below its high-water mark: queued before "
                "(a driver that re-read its history), or the clock went back",
                skipped,
                source or "the driver",
            )
        newest: dict[int, int] = {}
        for ts, code, *_ in fresh:
            if ts > newest.get(code, -1):
                newest[code] = ts
        db.executemany(
            "INSERT INTO high_water VALUES (?, ?, ?) ON CONFLICT (source, metric) "
            "DO UPDATE SET ts = max(ts, excluded.ts)",
            [(source, code, ts) for code, ts in newest.items()],
        )
        return fresh

    def _enforce_bounds(self, db: sqlite3.Connection, bounds: OutboxBounds | None = None) -> int:
        """Apply the overflow policy inside the current transaction; return readings dropped."""
        bounds = bounds or self.bounds
        (pending,) = db.execute("SELECT count(*) FROM pending").fetchone()
        sealed_readings, sealed_bytes = db.execute(
            "SELECT coalesce(sum(readings), 0), coalesce(sum(length(message)), 0) FROM sealed"
        ).fetchone()
        excess_readings = pending + sealed_readings - bounds.max_readings
        excess_bytes = sealed_bytes + pending * PENDING_ROW_BYTES - bounds.max_bytes
        min_free = max(bounds.min_free_bytes, self._learned_min_free)
        if min_free:
            # Dropping rows does not shrink the file, it frees pages inside it that the
            # next rows reuse: free pages count as free disk.
            short = min_free - self._queue.disk_free_bytes() - self._queue.free_page_bytes(db)
            excess_bytes = max(excess_bytes, short)
        dropped = batches = 0
        # Oldest first: sealed batches hold older readings than any unsealed one, and go
        # whole (a bound can be undershot by up to one batch).
        if excess_readings > 0 or excess_bytes > 0:
            last_seq = None
            for seq, count, size in db.execute(
                "SELECT seq, readings, length(message) FROM sealed ORDER BY seq"
            ).fetchall():
                if excess_readings <= 0 and excess_bytes <= 0:
                    break
                last_seq = seq
                excess_readings -= count
                excess_bytes -= size
                dropped += count
                batches += 1
            if last_seq is not None:
                db.execute("DELETE FROM sealed WHERE seq <= ?", (last_seq,))
        rows = max(0, excess_readings, -(-excess_bytes // PENDING_ROW_BYTES))
        if rows:
            rows = min(rows, pending)
            db.execute(
                "DELETE FROM pending WHERE id IN (SELECT id FROM pending ORDER BY id LIMIT ?)",
                (rows,),
            )
            dropped += rows
        if dropped or self._dropped_unrecorded:
            db.execute(
                "UPDATE head SET dropped_total = dropped_total + ?, "
                "dropped_batches = dropped_batches + ? WHERE id = 1",
                (dropped + self._dropped_unrecorded, batches),
            )
            self._dropped_unrecorded = 0
        if dropped:
            log.warning(
                "outbox over its bound: dropped the %d oldest readings (%d of them in %d "
                "sealed batches)",
                dropped,
                dropped - rows,
                batches,
            )
        return dropped

    def _make_room(self, exc: QueueError) -> bool:
        """The disk is full: give back the WAL's space and drop the oldest tenth of the
        outbox. True when something was freed."""
        log.warning("outbox: %s; making room by the overflow policy", exc)
        self._learned_min_free = LEARNED_MIN_FREE_BYTES
        self._queue.release_reserve()
        self._queue.checkpoint()
        try:
            with self._queue.write() as db:
                (pending,) = db.execute("SELECT count(*) FROM pending").fetchone()
                (sealed,) = db.execute("SELECT count(*) FROM sealed").fetchone()
                if not pending and not sealed:
                    return False
                total = self.stats_in(db)
                tenth_less = OutboxBounds(
                    max_readings=(total.pending_readings + total.sealed_readings) * 9 // 10,
                    max_bytes=total.bytes * 9 // 10,
                )
                self._enforce_bounds(db, tenth_less)
        except QueueError as second:
            log.warning("outbox: could not make room either: %s", second)
            self._queue.checkpoint()
            return False
        self._queue.checkpoint()
        return True

    def _note_unrecorded(self, count: int, why: str) -> None:
        self._dropped_unrecorded += count
        log.warning("outbox: dropped %d new readings: %s", count, why)

    def seal(
        self, signer: Signer, max_readings: int, model_version: str = ""
    ) -> SignedBatch | None:
        """Seal the oldest pending readings as the next batch of the chain (one transaction).

        A batch never spans more than a week (a source that was silent for longer is
        split at the gap) nor the message size limit (fewer readings then). Returns None
        when nothing is pending or the disk is too full to seal now."""
        try:
            with self._queue.write() as db:
                rows = db.execute(
                    "SELECT id, ts, metric, value, quality, raw, anomaly FROM pending "
                    "ORDER BY id LIMIT ?",
                    (max_readings,),
                ).fetchall()
                if not rows:
                    return None
                rows = _within_span(rows)
                seq, head_hash = db.execute("SELECT seq, hash FROM head").fetchone()
                prev = GENESIS_HASH if seq == 0 else bytes(head_hash)
                batch = self._signed(signer, seq + 1, prev, rows, model_version)
                db.execute(
                    "INSERT INTO sealed (seq, hash, message, sealed_ms, digest, readings) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        batch.seq,
                        batch.hash,
                        batch.message,
                        batch.payload.sealed_at_ms,
                        message_digest(batch.message),
                        len(batch.payload.readings),
                    ),
                )
                # What was sealed is a prefix of the rows in id order.
                last_id = rows[len(batch.payload.readings) - 1][0]
                db.execute("DELETE FROM pending WHERE id <= ?", (last_id,))
                db.execute(
                    "UPDATE head SET seq = ?, hash = ? WHERE id = 1", (batch.seq, batch.hash)
                )
                # No bound check here: sealing moves readings from pending into a batch,
                # which takes fewer bytes than the rows; add() applies the bound.
        except QueueFullError as exc:
            self._make_room(exc)
            return None
        return batch

    @staticmethod
    def _signed(
        signer: Signer,
        seq: int,
        prev: bytes,
        rows: list[tuple[Any, ...]],
        model_version: str,
    ) -> SignedBatch:
        """Sign the longest prefix of ``rows`` that fits one message (halving on size)."""
        count = len(rows)
        while True:
            readings = [
                Reading(ts, BY_CODE[code].name, value, quality, raw, anomaly)
                for _id, ts, code, value, quality, raw, anomaly in rows[:count]
            ]
            payload = make_payload(signer.key_id, seq, prev, now_ms(), readings, model_version)
            try:
                return seal_batch(signer, payload)
            except ValueError:
                if count == 1:
                    raise
                count //= 2

    def unsent(self, limit: int = 200, plan: ResendPlan | None = None) -> list[tuple[int, bytes]]:
        """Sealed batches to publish, in seq order: those never published, and those the
        resend ``plan`` (see :mod:`civicmesh.custody`) says to publish again."""
        plan = plan or ResendPlan(0, 0, 0)
        with self._queue.read() as db:
            rows = db.execute(
                "SELECT seq, message FROM sealed WHERE published_ms IS NULL OR published_ms < ? "
                "UNION SELECT * FROM (SELECT seq, message FROM sealed WHERE published_ms < ? "
                "ORDER BY seq LIMIT ?) ORDER BY seq LIMIT ?",
                (plan.before_ms, plan.probe_before_ms, plan.probe, limit),
            ).fetchall()
        return [(seq, bytes(message)) for seq, message in rows]

    def mark_sent(self, seqs: Sequence[int]) -> None:
        """The broker acknowledged these batches. Awaiting receipts, they stay until
        :meth:`confirm`; otherwise they leave the outbox now."""
        if not seqs:
            return
        with self._queue.write() as db:
            if self.await_receipts:
                stamp = now_ms()
                db.executemany(
                    "UPDATE sealed SET published_ms = ? WHERE seq = ?", [(stamp, s) for s in seqs]
                )
            else:
                db.executemany("DELETE FROM sealed WHERE seq = ?", [(s,) for s in seqs])

    def confirm(self, digests: Sequence[bytes]) -> tuple[int, int | None]:
        """A receipt names these message digests: those batches leave the outbox.

        Returns how many left and the latest time one of them was published."""
        if not digests:
            return 0, None
        removed, newest = 0, None
        with self._queue.write() as db:
            for digest in digests:
                for (published,) in db.execute(
                    "DELETE FROM sealed WHERE digest = ? RETURNING published_ms", (digest,)
                ).fetchall():
                    removed += 1
                    if published is not None and (newest is None or published > newest):
                        newest = int(published)
        return removed, newest

    # ----------------------------------------------------------------- reading

    def stats(self) -> OutboxStats:
        with self._queue.read() as db:
            return self.stats_in(db)

    def stats_in(self, db: sqlite3.Connection) -> OutboxStats:
        pending, oldest = db.execute("SELECT count(*), min(ts) FROM pending").fetchone()
        sealed, unpublished, readings, size = db.execute(
            "SELECT count(*), count(*) - count(published_ms), coalesce(sum(readings), 0), "
            "coalesce(sum(length(message)), 0) FROM sealed"
        ).fetchone()
        seq, dropped, batches, replayed = db.execute(
            "SELECT seq, dropped_total, dropped_batches, replayed_total FROM head"
        ).fetchone()
        return OutboxStats(
            pending,
            sealed,
            unpublished,
            oldest,
            seq,
            dropped + self._dropped_unrecorded,
            batches,
            replayed,
            readings,
            size + pending * PENDING_ROW_BYTES,
        )

    def file_bytes(self) -> int:
        """Bytes the outbox's database takes on disk (pages in use plus the WAL)."""
        return self._queue.file_bytes()


def _within_span(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The longest prefix of ``rows`` whose reading times lie within one batch's span."""
    low = high = rows[0][1]
    for index, row in enumerate(rows):
        low, high = min(low, row[1]), max(high, row[1])
        if high - low > MAX_SPAN_MS:
            return rows[:index]
    return rows
