"""``civicmesh import``: bring an archive of readings in through the signed pipeline."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from analytics.importer.errors import ArchiveError
from analytics.importer.formats import read_archive
from analytics.importer.mapping import Mapping
from analytics.importer.run import (
    Importer,
    ImportState,
    Progress,
    StationState,
    open_for_import,
    plan_station,
    summarize,
)
from analytics.settings import AnalyticsSettings
from analytics.store.base import Store, StoreError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from analytics.cli import _common

    cmd = sub.add_parser(
        "import",
        help="import an archive (CSV) through sign -> verify -> ledger -> store",
        description="Import station archives: wide CSV (a time column or year/month/day/hour "
        "columns, one column per metric) or OpenAQ-style long CSV, described by an optional "
        "TOML mapping file. Each station gets its own importer key; readings are signed, "
        "chained and verified like field data and written straight into the store (no "
        "broker). Running it again imports only what is new. See docs/import.md.",
    )
    cmd.add_argument("files", nargs="+", type=Path, help="archive CSV file(s)")
    cmd.add_argument("--mapping", type=Path, help="TOML mapping file (columns, units, times)")
    cmd.add_argument(
        "--format",
        choices=("wide", "openaq"),
        help="archive layout (overrides the mapping's `format`; default wide)",
    )
    cmd.add_argument(
        "--timezone", help="zone of times without an offset: Europe/Rome, +01:00 or UTC"
    )
    cmd.add_argument(
        "--state-dir",
        type=Path,
        help="importer keys and progress (default: an `import` folder beside the registry "
        "file); keep it: the keys are the stations' identities",
    )
    cmd.add_argument("--registry-file", type=Path, help="registry JSON (overrides registry_file)")
    cmd.add_argument(
        "--dry-run", action="store_true", help="report what would be imported; change nothing"
    )
    cmd.add_argument("--no-rollups", action="store_true", help="skip the rollup refresh at the end")
    _common(cmd)
    cmd.set_defaults(func=_import)


def _import(args: argparse.Namespace) -> int:
    from analytics.cli import _settings

    settings = _settings(args)
    if args.registry_file is not None:
        settings.registry_file = args.registry_file
    if args.mapping is not None:
        mapping = Mapping.load(args.mapping, timezone_name=args.timezone)
        if args.format is not None:
            mapping.spec.format = args.format
    else:
        mapping = Mapping.default(args.format or "wide", args.timezone)
    state = ImportState(args.state_dir or settings.registry_file.parent / "import")
    archive = read_archive(list(args.files), mapping)
    if not archive.stations:
        raise ArchiveError("The archive holds no readings to import (see the skipped counts)")
    horizon = int(time.time() * 1000) + settings.ingest.max_future_ms
    if args.dry_run:
        states = _dry_states(settings, state)
        plans = [
            plan_station(d, states.get(d.station_id), horizon) for d in archive.stations.values()
        ]
        for line in summarize(archive, plans):
            print(line)
        print("dry run: nothing was written")
        return 0
    store = open_for_import(settings)
    try:
        importer = Importer(settings, store, state, mapping)
        states = importer.states()
        plans = [
            plan_station(d, states.get(d.station_id), horizon) for d in archive.stations.values()
        ]
        for line in summarize(archive, plans):
            print(line)
        total = sum(len(p.new) for p in plans)
        if total == 0:
            print("nothing new to import")
            return 0
        result = importer.run(plans, states, Progress(total))
        rate = result.readings / result.seconds if result.seconds else 0.0
        print(
            f"imported {result.readings:,} readings in {result.batches:,} signed batches "
            f"in {result.seconds:.2f} s ({rate:,.0f} readings/s)"
        )
        for reason, n in result.quarantined.most_common():
            print(f"  quarantined by verification: {n:,} {reason}")
        if not args.no_rollups:
            started = time.monotonic()
            store.refresh_rollups()
            print(f"rollups refreshed in {time.monotonic() - started:.2f} s")
        print(f"importer keys and progress: {state.root}")
    finally:
        store.close()
    return 0


def _dry_states(settings: AnalyticsSettings, state: ImportState) -> dict[str, StationState]:
    """The saved progress, moved forward by the ledger when the store can be read."""
    if not state.file.exists() and not (state.root / "keys").is_dir():
        return {}
    from analytics.store import open_store

    store: Store | None = None
    try:
        store = open_store(settings.database_url)
        return Importer(settings, store, state, Mapping.default("wide", None)).states()
    except StoreError as exc:
        print(f"note: store not readable ({exc}); using the saved progress", file=sys.stderr)
        return state.load()
    finally:
        if store is not None:
            store.close()
