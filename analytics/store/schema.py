"""Numbered SQL migrations shipped with the package, one folder per backend.

A migration is ``migrations/<backend>/NNNN_name.sql``; backends apply the pending ones
in order and record each in ``schema_migrations`` inside the same transaction.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from analytics.store.base import StoreError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# A migration holding this line runs statement by statement outside a transaction
# (TimescaleDB's continuous aggregates cannot be created inside one).
NO_TRANSACTION = "-- civicmesh: no-transaction"
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # file stem, e.g. "0001_initial"
    sql: str


def load_migrations(backend: str) -> list[Migration]:
    """The migrations of ``backend`` ordered by version; gaps and duplicates are refused."""
    folder = MIGRATIONS_DIR / backend
    found: list[Migration] = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise StoreError(f"Migration file {path} is not named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), path.stem, path.read_text(encoding="utf-8")))
    if not found:
        raise StoreError(f"No migrations found in {folder}")
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise StoreError(
                f"Migrations of {backend} must be numbered 0001, 0002, ... without gaps; "
                f"found {migration.name} where {expected:04d} was expected"
            )
    return found


def split_statements(script: str) -> list[str]:
    """The statements of a migration script, for both SQL backends: SQLite runs them one
    by one inside its transaction (``executescript`` would commit first), PostgreSQL the
    no-transaction migrations one by one in autocommit mode.

    ``sqlite3.complete_statement`` knows string literals and comments, so a ';' inside them
    does not split (dollar-quoted PostgreSQL bodies are not supported: no migration that
    runs this way has one). Comment lines before a statement are dropped."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        if not pending and (not line.strip() or line.strip().startswith("--")):
            continue  # comments and blank lines between statements
        pending += line
        if sqlite3.complete_statement(pending):
            statement = pending.strip()
            pending = ""
            if statement.strip(";").strip():
                statements.append(statement)
    if pending.strip():
        raise StoreError(f"Migration script ends with an incomplete statement: {pending[:80]!r}")
    return statements
