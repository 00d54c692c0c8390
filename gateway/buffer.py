"""The gateway's durable state: chain heads per device and the forward queue (SQLite WAL).

Accepting a batch updates its device's chain head and enqueues its envelope in one
transaction, so a killed gateway neither loses a batch nor forwards one twice as new.
An envelope is *forwarded* once the upstream broker acknowledged it and *confirmed* once
ingest's receipt names it; forwarded but unconfirmed envelopes are forwarded again as
:mod:`civicmesh.custody` decides. Confirmed envelopes are kept for
``keep_forwarded_hours``, for replay after a central loss and to recognise a device
re-sending a batch the gateway already has.

The buffer is bounded (envelopes and bytes). Past the bound the oldest confirmed
envelopes (kept only for replay) go first; if that is not enough, the overflow policy
drops the oldest unconfirmed ones, counted in ``dropped_total`` and logged at warning.
Dropping is safe for custody only while devices keep their batches until the receipt:
a device batch whose envelope was dropped is still receipted, so set the bound well
above a normal backlog. It sits on :class:`civicmesh.queue.DurableQueue` (transactions
that always roll back on error, disk-full errors converted).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from civicmesh.custody import ResendPlan
from civicmesh.protocol import GENESIS_HASH, ChainHead, message_digest
from civicmesh.queue import DurableQueue
from civicmesh.timeutil import now_ms

log = logging.getLogger(__name__)

MIGRATIONS = (
    (
        1,
        "initial",
        """
        CREATE TABLE heads (device_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash BLOB NOT NULL);
        CREATE TABLE outgoing (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
            body BLOB NOT NULL, created_ms INTEGER NOT NULL, forwarded_ms INTEGER);
        CREATE INDEX outgoing_pending ON outgoing (id) WHERE forwarded_ms IS NULL
        """,
    ),
    (
        2,
        "receipts",
        """
        ALTER TABLE outgoing ADD COLUMN digest BLOB;
        ALTER TABLE outgoing ADD COLUMN confirmed_ms INTEGER;
        ALTER TABLE outgoing ADD COLUMN device_id TEXT;
        ALTER TABLE outgoing ADD COLUMN seq INTEGER;
        ALTER TABLE outgoing ADD COLUMN device_digest BLOB;
        ALTER TABLE outgoing ADD COLUMN batch_hash BLOB;
        ALTER TABLE outgoing ADD COLUMN prev_hash BLOB;
        UPDATE outgoing SET digest = message_digest(body);
        UPDATE outgoing SET confirmed_ms = forwarded_ms;
        CREATE INDEX outgoing_digest ON outgoing (digest);
        CREATE INDEX outgoing_device_seq ON outgoing (device_id, seq);
        CREATE INDEX outgoing_unconfirmed ON outgoing (forwarded_ms) WHERE confirmed_ms IS NULL
        """,
    ),
    (
        3,
        "bounds",
        """
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO counters VALUES ('dropped_total', 0)
        """,
    ),
    (
        4,
        "held gaps",
        """
        ALTER TABLE outgoing ADD COLUMN held_until_ms INTEGER;
        CREATE INDEX outgoing_held ON outgoing (device_id, id) WHERE held_until_ms IS NOT NULL
        """,
    ),
)

# A batch waiting for its chain to link: none of its device's later envelopes overtakes it.
_NOT_HELD = (
    "NOT EXISTS (SELECT 1 FROM outgoing AS h WHERE h.held_until_ms IS NOT NULL "
    "AND h.device_id = outgoing.device_id AND h.id <= outgoing.id)"
)


class GatewayBuffer:
    def __init__(
        self,
        path: Path,
        *,
        await_receipts: bool = True,
        max_envelopes: int = 1_000_000,
        max_bytes: int = 1024 * 1024 * 1024,
    ) -> None:
        self.await_receipts = await_receipts
        self.max_envelopes = max_envelopes
        self.max_bytes = max_bytes
        self._queue = DurableQueue(path, MIGRATIONS)

    def head(self, device_id: str) -> ChainHead | None:
        with self._queue.read() as db:
            row = db.execute(
                "SELECT seq, hash FROM heads WHERE device_id = ?", (device_id,)
            ).fetchone()
        return None if row is None else ChainHead(int(row[0]), bytes(row[1]))

    def known_digest(self, device_id: str, seq: int) -> bytes | None:
        """The digest of the device message accepted as (device, seq), while it is kept."""
        with self._queue.read() as db:
            row = db.execute(
                "SELECT device_digest FROM outgoing WHERE device_id = ? AND seq = ?",
                (device_id, seq),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def links_behind_head(
        self, device_id: str, seq: int, batch_hash: bytes, prev_hash: bytes
    ) -> str | None:
        """Can a batch behind the device's head be accepted? None when it can, else why not.

        A batch lost on the way and re-sent arrives after its successors were accepted
        across a gap. It fills the gap when its seq is still free and it links to the
        neighbours the buffer knows: a taken seq or a broken link is a fork."""
        with self._queue.read() as db:
            rows = db.execute(
                "SELECT seq, batch_hash, prev_hash FROM outgoing "
                "WHERE device_id = ? AND seq BETWEEN ? AND ?",
                (device_id, seq - 1, seq + 1),
            ).fetchall()
        linked = seq == 1 and prev_hash == GENESIS_HASH
        if seq == 1 and not linked:
            return "seq 1 must name the genesis hash as previous"
        for other, other_hash, other_prev in rows:
            if other == seq:
                return f"seq {seq} was already accepted with other content"
            if other == seq + 1 and other_prev is not None:
                if bytes(other_prev) != batch_hash:
                    return f"seq {seq + 1} names another batch as its predecessor"
                linked = True
            if other == seq - 1 and other_hash is not None:
                if bytes(other_hash) != prev_hash:
                    return f"it names another batch than the accepted seq {seq - 1} as previous"
                linked = True
        if not linked:
            # Neither neighbour is held: nothing it could be checked against.
            return f"it links to no batch the gateway holds (seq {seq - 1} or {seq + 1})"
        return None

    def accept(
        self,
        device_id: str,
        seq: int,
        digest: bytes,
        topic: str,
        body: bytes,
        device_message: bytes,
        *,
        prev_hash: bytes | None = None,
        advance_head: bool = True,
        hold_until_ms: int | None = None,
    ) -> int:
        """Advance the device's chain head (unless filling a gap behind it) and enqueue
        its envelope, atomically; ``hold_until_ms`` holds it (and its device's later
        envelopes) until its predecessor arrives and links, or until that time.

        Returns how many held envelopes this one released by linking them."""
        with self._queue.write() as db:
            if advance_head:
                db.execute(
                    "INSERT INTO heads VALUES (?, ?, ?) ON CONFLICT (device_id) "
                    "DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                    (device_id, seq, digest),
                )
            db.execute(
                "INSERT INTO outgoing (topic, body, created_ms, digest, device_id, seq, "
                "device_digest, batch_hash, prev_hash, held_until_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    topic,
                    body,
                    now_ms(),
                    message_digest(body),
                    device_id,
                    seq,
                    message_digest(device_message),
                    digest,
                    prev_hash,
                    hold_until_ms,
                ),
            )
            # Its successor waits for exactly this batch: the chain links, release it.
            released = db.execute(
                "UPDATE outgoing SET held_until_ms = NULL WHERE device_id = ? AND seq = ? "
                "AND held_until_ms IS NOT NULL AND prev_hash = ?",
                (device_id, seq + 1, digest),
            ).rowcount
            self._enforce_bounds(db)
        return int(released)

    def release_held(self, now: int) -> list[tuple[str, int]]:
        """Release the held envelopes whose hold ended; returns their (device, seq)."""
        with self._queue.write() as db:
            rows = db.execute(
                "UPDATE outgoing SET held_until_ms = NULL "
                "WHERE held_until_ms IS NOT NULL AND held_until_ms <= ? RETURNING device_id, seq",
                (now,),
            ).fetchall()
        return [(str(device), int(seq)) for device, seq in rows]

    def held(self) -> int:
        with self._queue.read() as db:
            (count,) = db.execute(
                "SELECT count(*) FROM outgoing WHERE held_until_ms IS NOT NULL"
            ).fetchone()
        return int(count)

    def enqueue(self, topic: str, body: bytes) -> None:
        with self._queue.write() as db:
            db.execute(
                "INSERT INTO outgoing (topic, body, created_ms, digest) VALUES (?, ?, ?, ?)",
                (topic, body, now_ms(), message_digest(body)),
            )
            self._enforce_bounds(db)

    def _enforce_bounds(self, db: sqlite3.Connection) -> int:
        """Keep the buffer within its bound (inside the caller's transaction); return
        how many unconfirmed envelopes the overflow policy dropped."""
        count, size = db.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM outgoing"
        ).fetchone()
        if count <= self.max_envelopes and size <= self.max_bytes:
            return 0
        dropped = 0
        # Confirmed envelopes first (kept for replay only), then the oldest unconfirmed.
        for confirmed in (True, False):
            where = "confirmed_ms IS NOT NULL" if confirmed else "confirmed_ms IS NULL"
            rows = db.execute(
                f"SELECT id, length(body) FROM outgoing WHERE {where} ORDER BY id"
            ).fetchall()
            cut = None
            for row_id, length in rows:
                if count <= self.max_envelopes and size <= self.max_bytes:
                    break
                cut, count, size = row_id, count - 1, size - length
                dropped += 0 if confirmed else 1
            if cut is not None:
                db.execute(f"DELETE FROM outgoing WHERE {where} AND id <= ?", (cut,))
            if count <= self.max_envelopes and size <= self.max_bytes:
                break
        if dropped:
            db.execute(
                "UPDATE counters SET value = value + ? WHERE name = 'dropped_total'", (dropped,)
            )
            log.warning("gateway buffer over its bound: dropped the %d oldest envelopes", dropped)
        return dropped

    def dropped_total(self) -> int:
        with self._queue.read() as db:
            (value,) = db.execute(
                "SELECT value FROM counters WHERE name = 'dropped_total'"
            ).fetchone()
        return int(value)

    def size(self) -> tuple[int, int]:
        """Envelopes held (confirmed ones kept for replay included) and their bytes."""
        with self._queue.read() as db:
            count, size = db.execute(
                "SELECT count(*), coalesce(sum(length(body)), 0) FROM outgoing"
            ).fetchone()
        return int(count), int(size)

    def pending(self, limit: int, plan: ResendPlan | None = None) -> list[tuple[int, str, bytes]]:
        """Envelopes to forward, in order: never forwarded, or forwarded and unconfirmed
        where the resend ``plan`` (see :mod:`civicmesh.custody`) says to send again."""
        plan = plan or ResendPlan(0, 0, 0)
        with self._queue.read() as db:
            rows = db.execute(
                f"SELECT id, topic, body FROM outgoing WHERE forwarded_ms IS NULL AND {_NOT_HELD} "
                "UNION SELECT id, topic, body FROM outgoing "
                "WHERE confirmed_ms IS NULL AND forwarded_ms < ? "
                "UNION SELECT * FROM (SELECT id, topic, body FROM outgoing "
                "WHERE confirmed_ms IS NULL AND forwarded_ms < ? ORDER BY id LIMIT ?) "
                "ORDER BY id LIMIT ?",
                (plan.before_ms, plan.probe_before_ms, plan.probe, limit),
            ).fetchall()
        return [(int(i), str(t), bytes(b)) for i, t, b in rows]

    def mark_forwarded(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        stamp = now_ms()
        confirmed = None if self.await_receipts else stamp
        with self._queue.write() as db:
            db.executemany(
                "UPDATE outgoing SET forwarded_ms = ?, confirmed_ms = ? WHERE id = ?",
                [(stamp, confirmed, i) for i in ids],
            )

    def confirm(self, digests: Sequence[bytes]) -> tuple[int, int | None]:
        """Ingest's receipt names these envelope digests: they need no more forwarding.

        Returns how many were confirmed and the latest time one of them was forwarded."""
        if not digests:
            return 0, None
        stamp = now_ms()
        confirmed, newest = 0, None
        with self._queue.write() as db:
            for digest in digests:
                for (forwarded,) in db.execute(
                    "UPDATE outgoing SET confirmed_ms = ?, forwarded_ms = coalesce(forwarded_ms, ?)"
                    " WHERE digest = ? AND confirmed_ms IS NULL RETURNING forwarded_ms",
                    (stamp, stamp, digest),
                ).fetchall():
                    confirmed += 1
                    newest = forwarded if newest is None else max(newest, forwarded)
        return confirmed, newest

    def prune(self, older_than_ms: int) -> int:
        with self._queue.write() as db:
            cursor = db.execute(
                "DELETE FROM outgoing WHERE confirmed_ms IS NOT NULL AND confirmed_ms < ?",
                (older_than_ms,),
            )
        return int(cursor.rowcount)

    def requeue(self, since_ms: int) -> int:
        """Forward again every kept envelope received since ``since_ms``: the replay after
        a central store was lost (ingest stores each batch once, whatever comes twice)."""
        with self._queue.write() as db:
            cursor = db.execute(
                "UPDATE outgoing SET forwarded_ms = NULL, confirmed_ms = NULL "
                "WHERE created_ms >= ?",
                (since_ms,),
            )
        return int(cursor.rowcount)

    def backlog(self) -> int:
        """Envelopes not yet confirmed (with receipts) or not yet forwarded (without)."""
        with self._queue.read() as db:
            (count,) = db.execute(
                "SELECT count(*) FROM outgoing WHERE confirmed_ms IS NULL"
            ).fetchone()
        return int(count)

    def close(self) -> None:
        self._queue.close()
