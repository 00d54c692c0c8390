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

Over the bound, the oldest *unsealed* readings are dropped, counted and logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from civicmesh.custody import ResendPlan
from civicmesh.identity import Signer
from civicmesh.metrics import BY_CODE, BY_NAME
from civicmesh.protocol import (
    GENESIS_HASH,
    Reading,
    SignedBatch,
    make_payload,
    message_digest,
    seal_batch,
)
from civicmesh.sqlite_state import open_state
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
)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending_readings: int
    sealed_batches: int  # sealed and not yet confirmed by a receipt
    unpublished_batches: int  # of those, not yet acknowledged by the broker
    oldest_pending_ms: int | None
    last_seq: int
    dropped_total: int


class Outbox:
    def __init__(
        self, path: Path, *, max_readings: int = 500_000, await_receipts: bool = True
    ) -> None:
        self.path = path
        self.max_readings = max_readings
        self.await_receipts = await_receipts
        self._lock = threading.Lock()
        self._db = open_state(path, MIGRATIONS)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, readings: Sequence[Reading]) -> int:
        """Store readings durably; return how many old unsealed readings were dropped."""
        if not readings:
            return 0
        rows = [
            (r.ts_ms, BY_NAME[r.metric].code, r.value, r.quality, r.raw, r.anomaly)
            for r in readings
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO pending (ts, metric, value, quality, raw, anomaly) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            (count,) = self._db.execute("SELECT count(*) FROM pending").fetchone()
            dropped = max(0, int(count) - self.max_readings)
            if dropped:
                self._db.execute(
                    "DELETE FROM pending WHERE id IN (SELECT id FROM pending ORDER BY id LIMIT ?)",
                    (dropped,),
                )
                self._db.execute(
                    "UPDATE head SET dropped_total = dropped_total + ? WHERE id = 1", (dropped,)
                )
            self._db.execute("COMMIT")
        if dropped:
            log.warning("outbox full: dropped %d oldest unsealed readings", dropped)
        return dropped

    def seal(
        self, signer: Signer, max_readings: int, model_version: str = ""
    ) -> SignedBatch | None:
        """Seal the oldest pending readings as the next batch of the chain (one transaction)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT id, ts, metric, value, quality, raw, anomaly FROM pending "
                    "ORDER BY id LIMIT ?",
                    (max_readings,),
                ).fetchall()
                if not rows:
                    self._db.execute("ROLLBACK")
                    return None
                seq, head_hash = self._db.execute("SELECT seq, hash FROM head").fetchone()
                prev = GENESIS_HASH if seq == 0 else bytes(head_hash)
                readings = [
                    Reading(ts, BY_CODE[code].name, value, quality, raw, anomaly)
                    for _id, ts, code, value, quality, raw, anomaly in rows
                ]
                payload = make_payload(
                    signer.key_id, seq + 1, prev, now_ms(), readings, model_version
                )
                batch = seal_batch(signer, payload)
                self._db.execute(
                    "INSERT INTO sealed (seq, hash, message, sealed_ms, digest) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        batch.seq,
                        batch.hash,
                        batch.message,
                        payload.sealed_at_ms,
                        message_digest(batch.message),
                    ),
                )
                self._db.execute("DELETE FROM pending WHERE id <= ?", (rows[-1][0],))
                self._db.execute(
                    "UPDATE head SET seq = ?, hash = ? WHERE id = 1", (batch.seq, batch.hash)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return batch

    def unsent(self, limit: int = 200, plan: ResendPlan | None = None) -> list[tuple[int, bytes]]:
        """Sealed batches to publish, in seq order: those never published, and those the
        resend ``plan`` (see :mod:`civicmesh.custody`) says to publish again."""
        plan = plan or ResendPlan(0, 0, 0)
        with self._lock:
            rows = self._db.execute(
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
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            if self.await_receipts:
                stamp = now_ms()
                self._db.executemany(
                    "UPDATE sealed SET published_ms = ? WHERE seq = ?", [(stamp, s) for s in seqs]
                )
            else:
                self._db.executemany("DELETE FROM sealed WHERE seq = ?", [(s,) for s in seqs])
            self._db.execute("COMMIT")

    def confirm(self, digests: Sequence[bytes]) -> tuple[int, int | None]:
        """A receipt names these message digests: those batches leave the outbox.

        Returns how many left and the latest time one of them was published."""
        if not digests:
            return 0, None
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            removed, newest = 0, None
            for digest in digests:
                for (published,) in self._db.execute(
                    "DELETE FROM sealed WHERE digest = ? RETURNING published_ms", (digest,)
                ).fetchall():
                    removed += 1
                    if published is not None and (newest is None or published > newest):
                        newest = int(published)
            self._db.execute("COMMIT")
        return removed, newest

    def stats(self) -> OutboxStats:
        with self._lock:
            pending, oldest = self._db.execute("SELECT count(*), min(ts) FROM pending").fetchone()
            sealed, unpublished = self._db.execute(
                "SELECT count(*), count(*) - count(published_ms) FROM sealed"
            ).fetchone()
            seq, dropped = self._db.execute("SELECT seq, dropped_total FROM head").fetchone()
        return OutboxStats(pending, sealed, unpublished, oldest, seq, dropped)
