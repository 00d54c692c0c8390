"""The audit log's tables (migration 0008) in SQLite and PostgreSQL / TimescaleDB.

:meth:`AuditTables.append` runs inside the store's batch transaction, so a batch is
never stored without its leaf or a leaf without its batch. Writers serialize on the
``audit_head`` row (SQLite: ``BEGIN IMMEDIATE`` already does; PostgreSQL: ``FOR
UPDATE``), so leaf indexes are dense and in commit order across ingest workers. The
frontier (one hash per set bit of the size) is cached between transactions and
re-read only when another writer moved the head.

The read side implements :class:`civicmesh.audit.merkle.HashStore` for proofs and
the static mirror.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from analytics.store.base import StoreError
from civicmesh.audit.leaf import make_leaf
from civicmesh.audit.merkle import NodeId, TreeAppender, leaf_hash, range_nodes

SQLITE = "sqlite"
POSTGRES = "postgres"


class LeafFields(Protocol):
    """What a leaf is made of (a StoredBatch has it)."""

    @property
    def device_id(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def device_message(self) -> bytes: ...
    @property
    def gateway_message(self) -> bytes: ...


def batch_leaf(batch: LeafFields) -> bytes:
    return make_leaf(
        batch.device_id, batch.seq, batch.device_message, batch.gateway_message
    ).encode()


class AuditTables:
    """One store's audit log. ``cursor()`` gives a context manager yielding a cursor
    outside any write transaction (reads)."""

    def __init__(
        self,
        dialect: str,
        read: Callable[[str, Callable[[Any], Any]], Any],
        write: Callable[[str], Any],
    ) -> None:
        if dialect not in (SQLITE, POSTGRES):
            raise ValueError(f"unknown dialect {dialect!r}")
        self.dialect = dialect
        self.enabled = True  # off only to measure what the log costs (bench --only audit)
        self._read = read
        self._write = write
        self._p = "?" if dialect == SQLITE else "%s"
        self._lock = threading.Lock()
        self._cache: tuple[int, list[bytes]] | None = None

    # -- writing (inside the caller's transaction) ---------------------------

    def append(self, cur: Any, batches: Sequence[LeafFields]) -> list[int]:
        """Append the leaves of newly stored ``batches`` (in ledger order)."""
        if not self.enabled or not batches:
            return []
        # PostgreSQL: one round trip locks the head and finds leaves that exist already,
        # one more writes leaves, nodes and the head (round trips are what the log costs).
        if self.dialect == POSTGRES:
            size, known = self._pg_head(cur, batches)
        else:
            (size,) = cur.execute("SELECT size FROM audit_head WHERE id = 1").fetchone()
            known = self._logged(cur, batches)
        with self._lock:
            cached = self._cache
        if cached is not None and cached[0] == size:
            frontier = cached[1]
        else:
            frontier = self._nodes(cur, range_nodes(0, size))
        if known:
            # Batches whose leaves are in the log already: the ledger lost them (a restore,
            # a replay after a store loss) and they come back. The log keeps its leaf; a
            # batch that differs from it shows as a mismatch to `audit verify`.
            batches = [b for b in batches if (b.device_id, b.seq) not in known]
            if not batches:
                return []
        appender = TreeAppender(size, frontier)
        hashes = [leaf_hash(batch_leaf(b)) for b in batches]
        new = appender.extend(hashes)
        leaves = [
            (size + i, b.device_id, b.seq, h)
            for i, (b, h) in enumerate(zip(batches, hashes, strict=True))
        ]
        nodes = [(level, idx, h) for level, idx, h in new if level > 0]
        if self.dialect == SQLITE:
            cur.executemany(
                "INSERT INTO audit_leaves (idx, device_id, seq, hash) VALUES (?, ?, ?, ?)", leaves
            )
            cur.executemany("INSERT INTO audit_nodes (level, idx, hash) VALUES (?, ?, ?)", nodes)
            cur.execute("UPDATE audit_head SET size = ? WHERE id = 1", (appender.size,))
        else:
            node_columns = [list(col) for col in zip(*nodes, strict=True)] or [[], [], []]
            cur.execute(
                "WITH leaves AS (INSERT INTO audit_leaves (idx, device_id, seq, hash) "
                "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::bytea[])), "
                "nodes AS (INSERT INTO audit_nodes (level, idx, hash) "
                "SELECT * FROM unnest(%s::smallint[], %s::bigint[], %s::bytea[])) "
                "UPDATE audit_head SET size = %s WHERE id = 1",
                [*(list(col) for col in zip(*leaves, strict=True)), *node_columns, appender.size],
                binary=True,
            )
        new_frontier = appender.frontier()
        with self._lock:
            # Valid only once the transaction commits; a rollback leaves the head at the
            # old size, which no longer matches, so the cache is simply not used.
            self._cache = (appender.size, new_frontier)
        return [leaf[0] for leaf in leaves]

    def _pg_head(self, cur: Any, batches: Sequence[LeafFields]) -> tuple[int, set[tuple[str, int]]]:
        rows = cur.execute(
            "WITH head AS (SELECT size FROM audit_head WHERE id = 1 FOR UPDATE) "
            "SELECT size, NULL, NULL FROM head UNION ALL "
            "SELECT NULL, l.device_id, l.seq FROM audit_leaves l JOIN "
            "unnest(%s::text[], %s::bigint[]) AS k(device_id, seq) "
            "ON l.device_id = k.device_id AND l.seq = k.seq",
            ([b.device_id for b in batches], [b.seq for b in batches]),
        ).fetchall()
        size = next(int(r[0]) for r in rows if r[0] is not None)
        return size, {(str(d), int(q)) for h, d, q in rows if h is None}

    def _logged(self, cur: Any, batches: Sequence[LeafFields]) -> set[tuple[str, int]]:
        """The keys among ``batches`` that have a leaf already."""
        if self.dialect == SQLITE:
            marks = ",".join("(?, ?)" for _ in batches)
            params: list[Any] = [v for b in batches for v in (b.device_id, b.seq)]
            rows = cur.execute(
                "SELECT device_id, seq FROM audit_leaves "
                f"WHERE (device_id, seq) IN (VALUES {marks})",
                params,
            ).fetchall()
        else:
            rows = cur.execute(
                "SELECT l.device_id, l.seq FROM audit_leaves l JOIN "
                "unnest(%s::text[], %s::bigint[]) AS k(device_id, seq) "
                "ON l.device_id = k.device_id AND l.seq = k.seq",
                ([b.device_id for b in batches], [b.seq for b in batches]),
            ).fetchall()
        return {(str(d), int(q)) for d, q in rows}

    def _nodes(self, cur: Any, ids: Sequence[NodeId]) -> list[bytes]:
        found: dict[NodeId, bytes] = {}
        by_level: dict[int, list[int]] = {}
        for level, idx in ids:
            by_level.setdefault(level, []).append(idx)
        for level, indexes in by_level.items():
            table = "audit_leaves" if level == 0 else "audit_nodes"
            where = "" if level == 0 else f"level = {int(level)} AND "
            if self.dialect == SQLITE:
                marks = ",".join("?" * len(indexes))
                rows = cur.execute(
                    f"SELECT idx, hash FROM {table} WHERE {where}idx IN ({marks})", indexes
                ).fetchall()
            else:
                rows = cur.execute(
                    f"SELECT idx, hash FROM {table} WHERE {where}idx = ANY(%s)", (indexes,)
                ).fetchall()
            for idx, h in rows:
                found[(level, int(idx))] = bytes(h)
        missing = [node for node in ids if node not in found]
        if missing:
            raise StoreError(f"audit log: no stored hash for nodes {missing[:3]}")
        return [found[node] for node in ids]

    def backfill(self, batch_size: int = 500) -> int:
        """Append batches stored before the log existed ((ingested_at, device, seq)
        order); returns how many."""
        if not self.enabled:
            return 0
        total = 0
        while True:

            def one_round(cur: Any) -> int:
                rows = cur.execute(
                    "SELECT b.device_id, b.seq, b.device_message, b.gateway_message "
                    "FROM batches b LEFT JOIN audit_leaves l "
                    "ON l.device_id = b.device_id AND l.seq = b.seq WHERE l.idx IS NULL "
                    f"ORDER BY b.ingested_at, b.device_id, b.seq LIMIT {int(batch_size)}"
                ).fetchall()
                self.append(
                    cur, [_Backfilled(str(d), int(s), bytes(m), bytes(g)) for d, s, m, g in rows]
                )
                return len(rows)

            done = self._write_run("backfilling the audit log", one_round)
            total += done
            if done < batch_size:
                return total

    def _write_run(self, what: str, fn: Callable[[Any], int]) -> int:
        with self._write(what) as cur:
            return fn(cur)

    # -- reading -------------------------------------------------------------

    def size(self) -> int:
        return int(
            self._read(
                "reading the audit log size",
                lambda cur: cur.execute("SELECT size FROM audit_head WHERE id = 1").fetchone()[0],
            )
        )

    def read_nodes(self, ids: Sequence[NodeId]) -> list[bytes]:
        result: list[bytes] = self._read("reading audit hashes", lambda cur: self._nodes(cur, ids))
        return result

    def leaf_index(self, device_id: str, seq: int) -> int | None:
        row = self._read(
            "finding a leaf",
            lambda cur: cur.execute(
                f"SELECT idx FROM audit_leaves WHERE device_id = {self._p} AND seq = {self._p}",
                (device_id, seq),
            ).fetchone(),
        )
        return None if row is None else int(row[0])

    def leaf_indexes(self, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        return {k: i for k in keys if (i := self.leaf_index(*k)) is not None}

    def entries(self, lo: int, hi: int) -> list[bytes]:
        """The gateway envelopes of leaves ``lo`` to ``hi - 1``, in log order."""
        p = self._p
        rows = self._read(
            "reading audit entries",
            lambda cur: cur.execute(
                "SELECT l.idx, b.gateway_message FROM audit_leaves l JOIN batches b "
                "ON b.device_id = l.device_id AND b.seq = l.seq "
                f"WHERE l.idx >= {p} AND l.idx < {p} ORDER BY l.idx",
                (lo, hi),
            ).fetchall(),
        )
        if len(rows) != hi - lo:
            raise StoreError(
                f"audit log: leaves {lo}..{hi - 1} have {len(rows)} stored batches of {hi - lo}"
            )
        return [bytes(m) for _, m in rows]

    def save_checkpoint(self, size: int, note: bytes, made_at_ms: int) -> None:
        p = self._p
        conflict = "ON CONFLICT (size) DO NOTHING"
        with self._write("saving a checkpoint") as cur:
            cur.execute(
                "INSERT INTO audit_checkpoints (size, note, made_at_ms) "
                f"VALUES ({p}, {p}, {p}) {conflict}",
                (size, note, made_at_ms),
            )

    def latest_checkpoint(self) -> tuple[int, bytes] | None:
        row = self._read(
            "reading the latest checkpoint",
            lambda cur: cur.execute(
                "SELECT size, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1"
            ).fetchone(),
        )
        return None if row is None else (int(row[0]), bytes(row[1]))

    def save_cosignature(self, size: int, witness: str, line: str, received_at_ms: int) -> None:
        p = self._p
        with self._write("saving a cosignature") as cur:
            cur.execute(
                "INSERT INTO audit_cosignatures (size, witness, line, received_at_ms) "
                f"VALUES ({p}, {p}, {p}, {p}) ON CONFLICT (size, witness) DO UPDATE "
                "SET line = excluded.line, received_at_ms = excluded.received_at_ms",
                (size, witness, line, received_at_ms),
            )

    def cosignatures(self, size: int) -> list[str]:
        rows = self._read(
            "reading cosignatures",
            lambda cur: cur.execute(
                f"SELECT line FROM audit_cosignatures WHERE size = {self._p} ORDER BY witness",
                (size,),
            ).fetchall(),
        )
        return [str(r[0]) for r in rows]


class _Backfilled:
    """The fields of a stored batch that its leaf needs (backfill reads only these)."""

    __slots__ = ("device_id", "device_message", "gateway_message", "seq")

    def __init__(
        self, device_id: str, seq: int, device_message: bytes, gateway_message: bytes
    ) -> None:
        self.device_id = device_id
        self.seq = seq
        self.device_message = device_message
        self.gateway_message = gateway_message
