"""Storage backends behind one interface (:class:`analytics.store.base.Store`).

``open_store(url)`` picks the backend from the URL scheme:

- ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``: embedded single file;
- ``postgresql://user@host:port/dbname`` (or ``postgres://``): PostgreSQL via psycopg 3.
"""

from __future__ import annotations

from pathlib import Path

from analytics.store.base import StoragePolicy, Store, StoreError

ACCEPTED_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")

__all__ = ["ACCEPTED_SCHEMES", "Store", "StoreError", "open_existing_store", "open_store"]


def open_store(
    url: str, *, timescaledb: str = "auto", policy: StoragePolicy | None = None
) -> Store:
    """A new store instance for ``url``; call ``migrate()`` before first use.

    ``timescaledb`` (PostgreSQL only): ``auto`` takes the TimescaleDB path when the
    extension is installed and preloaded on the server (a new schema; an existing one
    keeps its path), ``require`` insists, ``off`` never takes it. ``policy``: chunks,
    compression and retention, which the TimescaleDB path sets up itself in ``migrate()``
    (default: :data:`analytics.store.base.DEFAULT_STORAGE_POLICY`)."""
    if url.startswith("sqlite:///"):
        from analytics.store.sqlite import SqliteStore

        path = url[len("sqlite:///") :]
        if not path or path == ":memory:":
            raise StoreError(
                f"Store URL {url!r} names no database file; give a file path such as "
                "sqlite:///var/civicmesh.db (relative) or sqlite:////srv/civicmesh.db (absolute)"
            )
        return SqliteStore(Path(path))
    if url.startswith(("postgresql://", "postgres://")):
        # Imported lazily so the embedded store works without psycopg installed.
        from analytics.store.postgres import PostgresStore

        return PostgresStore(url, timescaledb=timescaledb, policy=policy)
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise StoreError(
        f"Unsupported store URL scheme {scheme!r}; use one of "
        "sqlite:///path/to/file.db, sqlite:////absolute/path.db or postgresql://user@host/dbname"
    )


def open_existing_store(url: str) -> Store:
    """:func:`open_store` for a command that reads the central store: a SQLite path with
    no file behind it is refused (ValueError) instead of becoming a new, empty store."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
        raise ValueError(
            f"no store at {url}; give the central store with --database-url "
            "(or database_url in --config)"
        )
    return open_store(url)
