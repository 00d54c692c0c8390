"""The durable outbox: readings are written here before anything is sent.

SQLite in WAL mode with ``synchronous=FULL``: a committed reading or sealed batch
survives a power cut. Sealing takes the oldest unsealed readings, signs them as the next
batch of the device's hash chain and stores the exact bytes in one transaction; the
same bytes are re-sent until the broker acknowledges them, so a seq never changes
content. Over the bound, the oldest *unsealed* readings are dropped, counted and logged.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from civicmesh.identity import Signer
from civicmesh.metrics import BY_CODE, BY_NAME
from civicmesh.protocol import GENESIS_HASH, Reading, SignedBatch, make_payload, seal_batch
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
)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending_readings: int
    sealed_batches: int
    oldest_pending_ms: int | None
    last_seq: int
    dropped_total: int


class Outbox:
    def __init__(self, path: Path, *, max_readings: int = 500_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_readings = max_readings
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
            done = {row[0] for row in self._db.execute("SELECT version FROM schema_migrations")}
            for version, name, sql in MIGRATIONS:
                if version in done:
                    continue
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in sql.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, now_ms())
                    )
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    self._db.execute("ROLLBACK")
                    raise

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
                    "INSERT INTO sealed (seq, hash, message, sealed_ms) VALUES (?, ?, ?, ?)",
                    (batch.seq, batch.hash, batch.message, payload.sealed_at_ms),
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

    def unsent(self, limit: int = 200) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, message FROM sealed ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(seq, bytes(message)) for seq, message in rows]

    def mark_sent(self, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM sealed WHERE seq = ?", [(s,) for s in seqs])
            self._db.execute("COMMIT")

    def stats(self) -> OutboxStats:
        with self._lock:
            pending, oldest = self._db.execute("SELECT count(*), min(ts) FROM pending").fetchone()
            (sealed,) = self._db.execute("SELECT count(*) FROM sealed").fetchone()
            seq, dropped = self._db.execute("SELECT seq, dropped_total FROM head").fetchone()
        return OutboxStats(pending, sealed, oldest, seq, dropped)
