"""Throw-away PostgreSQL databases on the servers the test run was given.

Two servers: plain PostgreSQL (``CIVICMESH_TEST_PG_URL``, the shared one on 5432) and a
real TimescaleDB (``CIVICMESH_TEST_TSDB_URL``, a private cluster that scripts/test.sh
makes from ../shared/timescaledb/ or an installed package), plus a cluster of that same
installation that does not preload the extension (``CIVICMESH_TEST_TSDB_NOPRELOAD_URL``).
"""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    from analytics.store.base import StoragePolicy

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TSDB_URL_ENV = "CIVICMESH_TEST_TSDB_URL"
TSDB_NOPRELOAD_URL_ENV = "CIVICMESH_TEST_TSDB_NOPRELOAD_URL"
HOW_TO_GET_TIMESCALEDB = (
    "Run the suite with ./scripts/test.sh: it starts a private TimescaleDB server from "
    "../shared/timescaledb/ (beside the repository) or from an installed TimescaleDB "
    "package for PostgreSQL 15, on free private ports. Or set {env} to a TimescaleDB "
    "server (a role allowed to CREATE DATABASE), or deselect these tests explicitly with "
    "-m 'not timescaledb'."
)


def quiet_policy() -> StoragePolicy:
    """Storage policy of test stores on TimescaleDB: no retention, no compression (test
    data lie in 2023; the policies' background jobs would drop or compress it mid-test).
    The policy tests set their own."""
    from analytics.store.base import RetentionPolicy, StoragePolicy

    return StoragePolicy(
        chunk_hours=24.0, compress_after_days=36_500.0, retention=RetentionPolicy()
    )


class PostgresUnavailable(RuntimeError):
    """The test PostgreSQL server cannot be reached or refuses the admin role."""


class TimescaleUnavailable(PostgresUnavailable):
    """No TimescaleDB server was given to the test run."""


def admin_url() -> str:
    """Server and role for creating test databases: ``CIVICMESH_TEST_PG_URL`` or the default."""
    return os.environ.get("CIVICMESH_TEST_PG_URL") or DEFAULT_ADMIN_URL


def tsdb_admin_url() -> str:
    """The TimescaleDB server (preloading the extension) the test run was given."""
    url = os.environ.get(TSDB_URL_ENV)
    if not url:
        raise TimescaleUnavailable(
            f"{TSDB_URL_ENV} is not set: no TimescaleDB server for this test. "
            + HOW_TO_GET_TIMESCALEDB.format(env=TSDB_URL_ENV)
        )
    return url


def tsdb_nopreload_admin_url() -> str:
    """A server with the TimescaleDB files installed that does not preload it."""
    url = os.environ.get(TSDB_NOPRELOAD_URL_ENV)
    if not url:
        raise TimescaleUnavailable(
            f"{TSDB_NOPRELOAD_URL_ENV} is not set: no server with TimescaleDB installed but "
            "not preloaded. " + HOW_TO_GET_TIMESCALEDB.format(env=TSDB_NOPRELOAD_URL_ENV)
        )
    return url


def database_url(server_url: str, name: str) -> str:
    """``server_url`` pointing at database ``name`` instead (query string kept)."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _admin_connection(server_url: str) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(server_url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise PostgresUnavailable(
            f"PostgreSQL is not reachable at {redacted(server_url)}: {exc}".strip()
            + "\nRun the suite with ./scripts/test.sh (it starts PostgreSQL), or set "
            "CIVICMESH_TEST_PG_URL to a role allowed to CREATE DATABASE."
        ) from exc


def create_database(server_url: str | None = None, prefix: str = "civicmesh_test_") -> str:
    """Create a uniquely named empty database and return its URL."""
    server = server_url or admin_url()
    name = f"{prefix}{secrets.token_hex(6)}"
    with _admin_connection(server) as conn:
        create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        row = conn.execute(
            "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = 'template1'"
        ).fetchone()
        if row is None or row[0] != "UTF8":
            # A cluster created without a locale (fresh container, no LANG) is SQL_ASCII,
            # where psycopg returns text as bytes; the code under test expects UTF-8.
            create += sql.SQL(" ENCODING 'UTF8' LOCALE 'C.UTF-8' TEMPLATE template0")
        conn.execute(create)
    return database_url(server, name)


def drop_database(url: str, server_url: str | None = None) -> None:
    """Drop the database ``url`` names, disconnecting whoever still uses it."""
    name = urlsplit(url).path.lstrip("/")
    with _admin_connection(server_url or admin_url()) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
