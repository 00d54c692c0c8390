"""Throw-away PostgreSQL databases on the server the test run was given."""

from __future__ import annotations

import os
import secrets
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class PostgresUnavailable(RuntimeError):
    """The test PostgreSQL server cannot be reached or refuses the admin role."""


def admin_url() -> str:
    """Server and role for creating test databases: ``CIVICMESH_TEST_PG_URL`` or the default."""
    return os.environ.get("CIVICMESH_TEST_PG_URL") or DEFAULT_ADMIN_URL


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
