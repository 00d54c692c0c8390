"""Store failures sorted at the boundary: transient (retry with backoff) or permanent.

A transient failure is the database being away or busy (connection lost, server shutting
down, disk full, lock timeout): the same write succeeds later, so the group is kept and
retried. A permanent failure is the data itself (a value out of a column's range, a NUL
or a lone surrogate in text, a constraint): retrying it would stall everything behind
it forever, so the message that carries it is quarantined with the database's reason.
"""

from __future__ import annotations

import sqlite3

import psycopg

from analytics.store.base import StoreError
from civicmesh.errors import CivicmeshError

# SQLSTATE classes that name the data, not the server: 22 data exception, 23 integrity
# constraint violation. Everything else (08 connection, 53 resources, 57 operator
# intervention, 40 rollback, 58 system, XX internal) may pass when retried.
_PERMANENT_SQLSTATE_CLASSES = ("22", "23")

# Raised by the drivers while adapting a parameter (before the server saw anything).
PARAMETER_ERRORS = (ValueError, TypeError, OverflowError, UnicodeError)


class IngestError(CivicmeshError):
    """The ingest worker was used wrongly (started twice, a doubled worker id, ...)."""

    reason = "ingest.error"


def is_permanent(exc: BaseException) -> bool:
    """Is ``exc`` (a StoreError or a driver's own error) caused by the data written?"""
    cause: BaseException | None = exc
    if isinstance(exc, StoreError):
        cause = exc.__cause__
        if cause is None:
            return False  # the store's own refusals: closed, cannot connect
    if isinstance(cause, psycopg.Error):
        state = cause.sqlstate or ""
        if isinstance(cause, psycopg.DataError | psycopg.IntegrityError):
            return True
        if isinstance(cause, psycopg.OperationalError | psycopg.InterfaceError):
            return False
        return state[:2] in _PERMANENT_SQLSTATE_CLASSES
    if isinstance(cause, sqlite3.Error):
        # OperationalError: locked, busy, disk I/O, full; the rest is about the data.
        return not isinstance(cause, sqlite3.OperationalError)
    return isinstance(cause, PARAMETER_ERRORS)


def describe(exc: BaseException, limit: int = 300) -> str:
    """The database's reason, one line, bounded (it goes into a quarantine detail)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit]
