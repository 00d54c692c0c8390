"""Durable local state in SQLite, as the edge outbox and the gateway buffer keep it.

WAL mode with ``synchronous=FULL``: a committed transaction survives a power cut.
Schema changes are numbered migrations recorded in ``schema_migrations``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from civicmesh.protocol import message_digest
from civicmesh.timeutil import now_ms

Migration = tuple[int, str, str]  # (version, name, SQL statements separated by ";")


def _digest(message: bytes | None) -> bytes | None:
    return None if message is None else message_digest(bytes(message))


def open_state(path: Path, migrations: Sequence[Migration]) -> sqlite3.Connection:
    """Open (creating if needed) a state database and bring its schema up to date.

    The connection runs in autocommit mode (transactions are explicit) and may be used
    from several threads under the caller's lock. SQL can call ``message_digest(blob)``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    # A small WAL: checkpointed every 256 pages (1 MiB) and cut back to 1 MiB after, so
    # a node's small disk is not taken by the log (SQLite's default lets it reach 4 MiB
    # and keeps the file that large).
    db.execute("PRAGMA wal_autocheckpoint=256")
    db.execute(f"PRAGMA journal_size_limit={1024 * 1024}")
    db.create_function("message_digest", 1, _digest, deterministic=True)
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )
    done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
    for version, name, sql in migrations:
        if version in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in sql.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, now_ms()))
            db.execute("COMMIT")
        except sqlite3.Error:
            db.execute("ROLLBACK")
            db.close()
            raise
    return db
