"""The three migration trees (sqlite, postgresql, timescaledb) describe one schema.

Each tree is migrated into a fresh store and read back from the database catalog (not
from the SQL text): tables and views, columns with a dialect-neutral type and
nullability, primary keys, unique constraints, the columns each CHECK constrains, and
indexes. They must agree except for the differences listed below, each with its reason;
a change to one tree that is not made to the others fails here.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from analytics.store import open_store
from tests.test_store import (
    BACKENDS,
    Backend,
    make_backend,
    pg_session_database,
    tsdb_session_database,
)

__all__ = ["pg_session_database", "tsdb_session_database"]

# Dialect-neutral column types. SQLite keeps times as epoch ms (INTEGER), PostgreSQL as
# timestamptz; JSON is TEXT in SQLite.
_PG_TYPES = {
    "text": "text",
    "smallint": "integer",
    "integer": "integer",
    "bigint": "integer",
    "double precision": "real",
    "bytea": "blob",
    "timestamp with time zone": "time",
    "jsonb": "json",
    "boolean": "integer",
}
_SQLITE_TYPES = {"TEXT": "text", "INTEGER": "integer", "REAL": "real", "BLOB": "blob"}

# Known, intended differences.
# - TimescaleDB: the rollup levels are continuous aggregates (views: no keys, no CHECKs,
#   their indexes live on the materialization hypertable in another schema) and
#   create_hypertable adds a time index of its own.
TIMESCALE_VIEWS = {"rollup_1m", "rollup_1h", "rollup_1d"}
TIMESCALE_EXTRA_INDEXES = {("readings", ("ts",)), ("batches", ("seq",))}
TIMESCALE_VIEW_INDEXES = {
    ("rollup_1m", ("metric", "bucket")),
    ("rollup_1h", ("metric", "bucket")),
    ("rollup_1d", ("metric", "bucket")),
}
# - SQLite stores NaN as NULL and has no 'Infinity' literal: its readings CHECKs are
#   range checks on the same columns, so these compare equal. CHECKs the other trees have
#   and SQLite cannot (none today; its 0010 added the missing reports.kind CHECK):
SQLITE_MISSING_CHECKS: set[tuple[str, str]] = set()


def _pg_schema(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        columns = conn.execute(
            "SELECT c.table_name, c.column_name, c.data_type, c.is_nullable = 'YES',"
            " t.table_type FROM information_schema.columns c"
            " JOIN information_schema.tables t ON t.table_schema = c.table_schema"
            " AND t.table_name = c.table_name WHERE c.table_schema = current_schema()"
        ).fetchall()
        constraints = conn.execute(
            "SELECT cl.relname, con.contype, array_agg(a.attname::text ORDER BY a.attname)"
            " FROM pg_constraint con JOIN pg_class cl ON cl.oid = con.conrelid"
            " JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = ANY(con.conkey)"
            " WHERE cl.relnamespace = current_schema()::regnamespace"
            " AND con.contype IN ('p', 'u', 'c') GROUP BY con.oid, cl.relname, con.contype"
        ).fetchall()
        indexes = conn.execute(
            "SELECT t.relname, array_agg(a.attname::text ORDER BY k.ord)"
            " FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid"
            " JOIN pg_class ix ON ix.oid = i.indexrelid"
            " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum"
            " WHERE t.relnamespace = current_schema()::regnamespace"
            " AND NOT i.indisprimary AND NOT EXISTS (SELECT 1 FROM pg_constraint c"
            "  WHERE c.conindid = i.indexrelid AND c.contype = 'u')"
            " GROUP BY i.indexrelid, t.relname"
        ).fetchall()
        # the plain path's weekly partitions (and DEFAULT) inherit the parent's schema
        partitions = {
            name
            for (name,) in conn.execute(
                "SELECT relname FROM pg_class WHERE relispartition"
                " AND relnamespace = current_schema()::regnamespace"
            ).fetchall()
        }
    columns = [row for row in columns if row[0] not in partitions]
    constraints = [row for row in constraints if row[0] not in partitions]
    indexes = [row for row in indexes if row[0] not in partitions]
    out: dict[str, Any] = {"tables": {}, "views": set(), "keys": set(), "checks": set()}
    for table, column, dtype, nullable, kind in columns:
        out["tables"].setdefault(table, {})[column] = (_PG_TYPES.get(dtype, dtype), nullable)
        if kind == "VIEW":
            out["views"].add(table)
    for table, kind, cols in constraints:
        if kind == "c":
            out["checks"].update((table, c) for c in cols)
        else:
            out["keys"].add((table, "primary" if kind == "p" else "unique", tuple(sorted(cols))))
    out["indexes"] = {(table, tuple(cols)) for table, cols in indexes}
    return out


def _sqlite_schema(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"tables": {}, "views": set(), "keys": set(), "checks": set()}
    out["indexes"] = set()
    with sqlite3.connect(path) as conn:
        tables = conn.execute(
            "SELECT name, type, sql FROM sqlite_master WHERE type IN ('table', 'view')"
            " AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        for table, kind, sql in tables:
            if kind == "view":
                out["views"].add(table)
            info = conn.execute(f"PRAGMA table_info({table})").fetchall()
            cols = {}
            pk = []
            for _, name, dtype, notnull, _, pk_pos in info:
                # a PRIMARY KEY column is NOT NULL on PostgreSQL; SQLite does not say so
                cols[name] = (_SQLITE_TYPES.get(dtype.upper(), dtype), not notnull and not pk_pos)
                if pk_pos:
                    pk.append(name)
            out["tables"][table] = cols
            if pk:
                out["keys"].add((table, "primary", tuple(sorted(pk))))
            for check in re.findall(r"CHECK\s*\((.*?)\)\s*(?:,|\n|$)", sql or "", re.S):
                out["checks"].update((table, c) for c in cols if re.search(rf"\b{c}\b", check))
            for _, index, unique, origin, _ in conn.execute(f"PRAGMA index_list({table})"):
                names = tuple(r[2] for r in conn.execute(f"PRAGMA index_info({index})"))
                if origin == "pk":
                    continue
                if origin == "u" or unique:
                    out["keys"].add((table, "unique", tuple(sorted(names))))
                else:
                    out["indexes"].add((table, names))
    return out


@pytest.fixture
def schemas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    found: dict[str, Any] = {}
    for param in BACKENDS:
        name = param if isinstance(param, str) else param.values[0]

        class _Request:  # make_backend's view of a parametrized request
            def __init__(self, value: str) -> None:
                self.param = value
                self.getfixturevalue = request.getfixturevalue
                self.addfinalizer = request.addfinalizer

        backend: Backend = make_backend(_Request(name), tmp_path)  # type: ignore[arg-type]
        store = backend.open()
        store.migrate()
        store.close()
        if name == "sqlite":
            found[name] = _sqlite_schema(Path(backend.url.removeprefix("sqlite:///")))
        else:
            found[name] = _pg_schema(backend.url)
    yield found


def _without(schema: dict[str, Any], drop_tables: set[str]) -> dict[str, Any]:
    return {
        "tables": {t: c for t, c in schema["tables"].items() if t not in drop_tables},
        "keys": {k for k in schema["keys"] if k[0] not in drop_tables},
        "checks": {c for c in schema["checks"] if c[0] not in drop_tables},
        "indexes": {i for i in schema["indexes"] if i[0] not in drop_tables},
    }


@pytest.mark.integration
@pytest.mark.timescaledb
def test_the_three_migration_trees_describe_one_schema(schemas: dict[str, Any]) -> None:
    sqlite, plain, ts = schemas["sqlite"], schemas["postgresql"], schemas["timescaledb"]
    assert ts["views"] == TIMESCALE_VIEWS and not plain["views"] and not sqlite["views"]
    # Same tables (and views), same columns, types and nullability everywhere.
    assert set(sqlite["tables"]) == set(plain["tables"]) == set(ts["tables"])
    for table in plain["tables"]:
        if table in TIMESCALE_VIEWS:  # a view's columns are all nullable to the catalog
            kinds = {column: kind for column, (kind, _) in plain["tables"][table].items()}
            assert {c: k for c, (k, _) in ts["tables"][table].items()} == kinds, table
        else:
            assert plain["tables"][table] == ts["tables"][table], table
        expected = {
            column: ("integer" if kind == "time" else "text" if kind == "json" else kind, null)
            for column, (kind, null) in plain["tables"][table].items()
        }
        assert sqlite["tables"][table] == expected, table
    # Keys, CHECKs and indexes: the plain tree against each of the others.
    tables = set(plain["tables"])
    assert _without(ts, TIMESCALE_VIEWS)["keys"] == _without(plain, TIMESCALE_VIEWS)["keys"]
    assert _without(ts, TIMESCALE_VIEWS)["checks"] == _without(plain, TIMESCALE_VIEWS)["checks"]
    assert ts["indexes"] - TIMESCALE_EXTRA_INDEXES == plain["indexes"] - TIMESCALE_VIEW_INDEXES
    assert sqlite["keys"] == plain["keys"]
    assert plain["checks"] - sqlite["checks"] == SQLITE_MISSING_CHECKS
    assert sqlite["checks"] <= plain["checks"]
    assert sqlite["indexes"] == plain["indexes"], tables


def test_the_comparison_fails_on_a_drifted_tree(tmp_path: Path) -> None:
    """The catalog reader sees what a drift would change (a check that can fail)."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    store = open_store(url)
    store.migrate()
    store.close()
    before = _sqlite_schema(tmp_path / "a.db")
    with sqlite3.connect(tmp_path / "a.db") as conn:
        conn.execute("ALTER TABLE devices ADD COLUMN extra TEXT")
        conn.execute("CREATE INDEX devices_kind ON devices (kind)")
        conn.execute("CREATE TABLE drift (x INTEGER CHECK (x > 0))")
    after = _sqlite_schema(tmp_path / "a.db")
    assert after["tables"]["devices"]["extra"] == ("text", True)
    assert ("devices", ("kind",)) in after["indexes"] - before["indexes"]
    assert ("drift", "x") in after["checks"]
