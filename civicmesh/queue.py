"""The one durable SQLite queue under the edge outbox and the gateway buffer.

Both keep messages that must survive a power cut until the next hop's receipt names
them, in SQLite (WAL, ``synchronous=FULL``, numbered migrations: see
:mod:`civicmesh.sqlite_state`). What they share lives here:

- one lock per queue, and transactions that **always** end: :meth:`DurableQueue.write`
  commits, or rolls back on any error (an SQLite error, a bug, a signal), so a
  connection is never left inside a transaction ("cannot start a transaction within a
  transaction" on every later call);
- SQLite errors converted at this boundary: :class:`QueueFullError` when the disk (or
  the database's size limit) is full, :class:`QueueError` for the rest;
- the size of what is queued, in bytes, and the free space left on its disk, which the
  owners bound with their overflow policy;
- a reserve file beside the database: space a full disk gives back, so that the
  transaction that makes room can still be written (in WAL mode even a DELETE needs
  some free disk).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from civicmesh.errors import CivicmeshError
from civicmesh.sqlite_state import Migration, open_state

log = logging.getLogger(__name__)


class QueueError(CivicmeshError):
    """A durable queue's database failed; the transaction was rolled back."""


class QueueFullError(QueueError):
    """The queue's disk is full: nothing was written; make room (the overflow policy)."""


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0)
    if isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_FULL:
        return True
    return "database or disk is full" in str(exc)


def convert(exc: sqlite3.Error, what: str) -> QueueError:
    """The civicmesh error for an SQLite error (disk full or other)."""
    if _is_full(exc):
        return QueueFullError(f"{what}: the disk is full ({exc})")
    return QueueError(f"{what}: {exc}")


class DurableQueue:
    """An SQLite state database with one writer at a time and all-or-nothing writes."""

    def __init__(self, path: Path, migrations: Sequence[Migration]) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            self._db = open_state(path, migrations)
        except sqlite3.Error as exc:
            raise convert(exc, f"cannot open {path}") from None

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """``with queue.write() as db:`` one transaction (``BEGIN IMMEDIATE``), committed
        at the end of the block and rolled back when anything in it raises."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, sqlite3.Error):
                    raise convert(exc, f"write to {self.path.name} failed") from exc
                raise

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """``with queue.read() as db:`` queries under the queue's lock (no transaction)."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                self._rollback()
                raise convert(exc, f"read of {self.path.name} failed") from exc

    def _rollback(self) -> None:
        # SQLite may have ended the transaction itself (SQLITE_FULL can); a second
        # ROLLBACK would then fail and hide the first error.
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.error("rollback of %s failed: %s", self.path.name, exc)

    def file_bytes(self) -> int:
        """Bytes the database takes on disk now: its pages in use plus the WAL file."""
        with self.read() as db:
            (pages,) = db.execute("PRAGMA page_count").fetchone()
            (free,) = db.execute("PRAGMA freelist_count").fetchone()
            (size,) = db.execute("PRAGMA page_size").fetchone()
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            wal_bytes = wal.stat().st_size
        except OSError:
            wal_bytes = 0
        return (int(pages) - int(free)) * int(size) + wal_bytes

    def free_page_bytes(self, db: sqlite3.Connection) -> int:
        """Bytes of pages inside the database file that are free for reuse (within the
        current transaction, deletions count at once)."""
        (free,) = db.execute("PRAGMA freelist_count").fetchone()
        (size,) = db.execute("PRAGMA page_size").fetchone()
        return int(free) * int(size)

    def disk_free_bytes(self) -> int:
        """Free bytes on the file system that holds the queue."""
        try:
            return shutil.disk_usage(self.path.parent).free
        except OSError:
            return 0

    # ------------------------------------------------------------- the disk reserve

    @property
    def reserve_path(self) -> Path:
        return self.path.with_name(self.path.name + ".reserve")

    def keep_reserve(self, size: int) -> bool:
        """Hold ``size`` bytes of the disk in a reserve file beside the database, when
        there is room for it and twice as much: the space a full disk gives back (see
        :meth:`release_reserve`). True when the reserve is in place."""
        path = self.reserve_path
        try:
            if path.stat().st_size >= size:
                return True
        except FileNotFoundError:
            pass
        except OSError:
            return False
        if self.disk_free_bytes() < 3 * size:
            return False
        try:
            with path.open("wb") as handle:
                chunk = bytes(64 * 1024)
                for _ in range(0, size, len(chunk)):
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            log.info("no disk reserve beside %s: %s", self.path.name, exc)
            path.unlink(missing_ok=True)
            return False
        return True

    def release_reserve(self) -> bool:
        """The disk is full: give the reserve file's space back (so a transaction that
        makes room can run). True when there was one."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        log.warning("disk full under %s: released its %s", self.path.name, self.reserve_path.name)
        return True

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it: gives back the WAL's disk
        space (after a burst, or when the disk is full); harmless when it cannot."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.info("checkpoint of %s failed: %s", self.path.name, exc)

    def close(self) -> None:
        with self._lock:
            self._db.close()
