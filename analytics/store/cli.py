"""``civicmesh db status``: the store's path, size, chunks, compression and policies.

Registered into the ``db`` command group by whoever builds it (``add_db_status``), so the
group stays open to more actions (migrate, backup, restore...)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analytics.settings import AnalyticsSettings


def add_db_status(
    db_cmds: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
    settings_of: Callable[[argparse.Namespace], AnalyticsSettings],
) -> None:
    """Add ``status`` to the ``db`` group; ``common`` adds --config/--database-url and
    ``settings_of`` turns the parsed arguments into settings."""
    status = db_cmds.add_parser(
        "status",
        help="store path, chunks, compression ratio, policies and when each last ran",
        description=(
            "Show the store's path (SQLite, plain PostgreSQL or TimescaleDB), its ledger "
            "counts and, on TimescaleDB, every hypertable's chunks and compression ratio and "
            "every policy with its settings, last run, result and visible effect. Reads "
            "only; migrates nothing."
        ),
    )
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    def run(args: argparse.Namespace) -> int:
        return _db_status(settings_of(args), as_json=bool(args.json))

    status.set_defaults(func=run)


def _db_status(settings: AnalyticsSettings, *, as_json: bool) -> int:
    from analytics.store import open_store
    from analytics.store.base import StoreError
    from analytics.store.status import print_status

    store = open_store(settings.database_url, timescaledb=settings.storage.timescaledb)
    try:
        reader: Callable[[], dict[str, Any]] | None = getattr(store, "status", None)
        if reader is None:
            print(f"{store.backend}: no status available", file=sys.stderr)
            return 1
        status = reader()
    except StoreError as exc:
        print(f"civicmesh db status: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print_status(status, as_json=as_json, out=print)
    return 0
