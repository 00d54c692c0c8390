"""``civicmesh db backup | restore | verify`` and ``db migrate --dry-run``.

A backup is one tar file (mode 0600: it holds keys) with

    manifest.json   backend, schema versions, counts, the time it was made
    store.sqlite    SQLite: a consistent copy made with the online backup API, or
    store.pgdump    PostgreSQL / TimescaleDB: ``pg_dump --format=custom``
    site/...        the central's files: registry, tokens, users, PKI, secrets, config

Restore refuses a store that already holds batches (``--force`` to overwrite the site
files only, never to merge ledgers). TimescaleDB follows its documented procedure:
``timescaledb_pre_restore()``, ``pg_restore``, ``timescaledb_post_restore()``.
``db verify`` re-checks every device's chain in the restored ledger: each batch's
device signature against the registry, its sequence number and its link to the one
before.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import Store, StoreError
from analytics.store.schema import load_migrations
from civicmesh.errors import CivicmeshError
from civicmesh.protocol import GENESIS_HASH, ProtocolError, open_batch
from civicmesh.registry import Registry
from civicmesh.timeutil import now_ms

FORMAT = "civicmesh-backup-v1"
# What of the site directory a backup carries (all of it that `setup central` writes).
SITE_FILES = (
    "analytics.toml",
    "mosquitto.conf",
    "mosquitto.acl",
    "registry.json",
    "api-tokens.json",
    "dashboard-users.json",
    "pki",
    "secrets",
)


class BackupError(CivicmeshError):
    reason = "backup.invalid"


@dataclass(frozen=True, slots=True)
class ChainReport:
    devices: int
    batches: int
    problems: list[str]


def _sqlite_path(url: str) -> Path:
    return Path(url[len("sqlite:///") :])


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} is not installed (Debian: apt-get install postgresql-client)")
    return found


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise BackupError(f"{what} failed: {proc.stderr.strip()[-2000:]}")
    return proc


def _psql(url: str, sql: str) -> str:
    return _run(
        [_pg_tool("psql"), "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql], "psql"
    ).stdout.strip()


def schema_versions(url: str) -> list[int]:
    """Versions recorded in the store's ``schema_migrations`` (empty for a new store)."""
    if url.startswith("sqlite:///"):
        path = _sqlite_path(url)
        if not path.exists():
            return []
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'"
            ).fetchone()
            if table is None:
                return []
            return sorted(v for (v,) in conn.execute("SELECT version FROM schema_migrations"))
    present = _psql(url, "SELECT to_regclass('schema_migrations') IS NOT NULL")
    if present != "t":
        return []
    out = _psql(url, "SELECT version FROM schema_migrations ORDER BY version")
    return [int(v) for v in out.split()]


def _pg_backend(url: str, mode: str) -> str:
    hypertable = _psql(
        url,
        "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'",
    )
    if hypertable != "0":
        found = _psql(
            url,
            "SELECT count(*) FROM timescaledb_information.hypertables"
            " WHERE hypertable_name = 'readings'",
        )
        if found != "0":
            return "timescaledb"
    if schema_versions(url):
        return "postgresql"
    available = _psql(
        url, "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    return "timescaledb" if mode != "off" and available != "0" else "postgresql"


def pending_migrations(settings: AnalyticsSettings) -> tuple[str, list[tuple[str, str]]]:
    """The store's backend and the migrations ``migrate`` would apply, each with the
    first comment line of its file (what it changes)."""
    url = settings.database_url
    backend = (
        "sqlite" if url.startswith("sqlite:///") else _pg_backend(url, settings.storage.timescaledb)
    )
    done = set(schema_versions(url))
    pending = []
    for migration in load_migrations(backend):
        if migration.version in done:
            continue
        summary = next(
            (
                ln.lstrip("- ").strip()
                for ln in migration.sql.splitlines()
                if ln.startswith("--") and "civicmesh:" not in ln
            ),
            "",
        )
        pending.append((migration.name, summary))
    return backend, pending


# ------------------------------------------------------------------------- backup


def _counts(store: Store) -> dict[str, int]:
    return {k: int(v) for k, v in asdict(store.counts()).items()}


def backup(settings: AnalyticsSettings, site_dir: Path | None, out: Path) -> dict[str, Any]:
    """Write a backup of the store (and of ``site_dir``) to ``out``; returns the manifest."""
    url = settings.database_url
    store = open_store(url, timescaledb=settings.storage.timescaledb)
    try:
        store.migrate()
        counts = _counts(store)
        backend = store.backend
    finally:
        store.close()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "backend": backend,
        "schema_versions": schema_versions(url),
        "counts": counts,
        "made_at_ms": now_ms(),
        "site_files": [],
    }
    with tempfile.TemporaryDirectory(prefix="civicmesh-backup-") as tmp:
        work = Path(tmp)
        if url.startswith("sqlite:///"):
            dump = work / "store.sqlite"
            src = sqlite3.connect(_sqlite_path(url))
            dst = sqlite3.connect(dump)
            try:
                src.backup(dst)  # consistent while ingest keeps writing
            finally:
                dst.close()
                src.close()
        else:
            dump = work / "store.pgdump"
            _run(
                [_pg_tool("pg_dump"), "--format=custom", "--no-owner", "-d", url, "-f", str(dump)],
                "pg_dump",
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
            tar.add(dump, arcname=dump.name)
            if site_dir is not None:
                for name in SITE_FILES:
                    if (site_dir / name).exists():
                        tar.add(site_dir / name, arcname=f"site/{name}")
                        manifest["site_files"].append(name)
            data = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    os.chmod(out, 0o600)
    return manifest


def _read_manifest(tar: tarfile.TarFile, path: Path) -> dict[str, Any]:
    try:
        member = tar.extractfile("manifest.json")
    except KeyError:
        raise BackupError(f"{path} is not a civicmesh backup (no manifest.json)") from None
    if member is None:
        raise BackupError(f"{path}: manifest.json is not a file")
    manifest: dict[str, Any] = json.loads(member.read())
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path} is not a {FORMAT} backup")
    return manifest


def restore(
    settings: AnalyticsSettings, archive: Path, site_dir: Path | None, *, force: bool = False
) -> dict[str, Any]:
    """Restore ``archive`` into the (empty) store of ``settings`` and into ``site_dir``."""
    url = settings.database_url
    try:
        tar = tarfile.open(archive, "r:gz")  # noqa: SIM115 - closed by the with below
    except (FileNotFoundError, tarfile.TarError) as exc:
        raise BackupError(f"Cannot read backup {archive}: {exc}") from None
    with tar, tempfile.TemporaryDirectory(prefix="civicmesh-restore-") as tmp:
        manifest = _read_manifest(tar, archive)
        tar.extractall(tmp, filter="data")
        work = Path(tmp)
        if schema_versions(url):
            store = open_store(url, timescaledb=settings.storage.timescaledb)
            try:
                if store.counts().batches:
                    raise BackupError(
                        f"The store at {store!r} already holds batches: restore goes into an "
                        "empty store (create a new database, or move the SQLite file away)"
                    )
            finally:
                store.close()
        sqlite_dump = manifest["backend"] == "sqlite"
        if sqlite_dump != url.startswith("sqlite:///"):
            raise BackupError(
                f"The backup is of a {manifest['backend']} store; database_url is {url[:12]}..."
                " (restore into the same kind of store)"
            )
        if sqlite_dump:
            target = _sqlite_path(url)
            target.parent.mkdir(parents=True, exist_ok=True)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{target}{suffix}").unlink(missing_ok=True)
            src = sqlite3.connect(work / "store.sqlite")
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
                src.close()
        else:
            _restore_postgres(url, work / "store.pgdump", manifest["backend"] == "timescaledb")
        if site_dir is not None and (work / "site").exists():
            _restore_site(work / "site", site_dir, force=force)
    store = open_store(url, timescaledb=settings.storage.timescaledb)
    try:
        store.migrate()  # a backup of an older release's schema is upgraded here
        manifest["restored_counts"] = _counts(store)
    finally:
        store.close()
    return manifest


def _restore_postgres(url: str, dump: Path, timescale: bool) -> None:
    if timescale:
        # TimescaleDB's documented procedure: the extension first, restore mode around
        # pg_restore (it stops background workers and lets catalog rows in as they were).
        _psql(url, "CREATE EXTENSION IF NOT EXISTS timescaledb")
        _psql(url, "SELECT timescaledb_pre_restore()")
    try:
        _run(
            [_pg_tool("pg_restore"), "--no-owner", "--exit-on-error", "-d", url, str(dump)],
            "pg_restore",
        )
    finally:
        if timescale:
            _psql(url, "SELECT timescaledb_post_restore()")


def _restore_site(source: Path, site_dir: Path, *, force: bool) -> None:
    for item in sorted(source.rglob("*")):
        target = site_dir / item.relative_to(source)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        if target.exists() and not force:
            if target.read_bytes() != item.read_bytes():
                raise BackupError(
                    f"{target} exists and differs from the backup's; move it away or pass --force"
                )
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item, target)


def verify_chains(store: Store, registry: Registry) -> ChainReport:
    """Every device's ledger, batch by batch: signature, sequence, link to the previous."""
    problems: list[str] = []
    batches = 0
    devices = sorted({d.device_id for d in store.devices()} | set(registry.devices))
    for device_id in devices:
        prev, seq = GENESIS_HASH, 0
        while True:
            page = store.ledger(device_id, after_seq=seq, limit=1000)
            if not page:
                break
            for entry in page:
                batches += 1
                where = f"device {device_id} seq {entry.seq}"
                if entry.seq != seq + 1:
                    problems.append(f"{where}: gap after seq {seq}")
                elif entry.prev_hash != prev:
                    problems.append(f"{where}: does not link to seq {seq}")
                try:
                    batch = open_batch(entry.device_message, registry.device_key)
                except ProtocolError as exc:
                    problems.append(f"{where}: {exc}")
                else:
                    if batch.hash != entry.payload_hash or batch.seq != entry.seq:
                        problems.append(f"{where}: the ledger row differs from the signed batch")
                prev, seq = entry.payload_hash, entry.seq
    return ChainReport(len(devices), batches, problems)


# --------------------------------------------------------------------------- CLI


def add_commands(
    db_cmds: argparse._SubParsersAction[argparse.ArgumentParser], common: Any, settings_of: Any
) -> None:
    """Add ``backup``, ``restore`` and ``verify`` to the ``db`` group (``common`` adds the
    --config/--database-url options, ``settings_of`` turns them into settings)."""
    back = db_cmds.add_parser("backup", help="store + registry, keys and config into one file")
    common(back)
    back.add_argument(
        "--site-dir",
        type=Path,
        help="the central's config folder (`setup central --dir`, e.g. /etc/civicmesh)",
    )
    back.add_argument("--out", type=Path, required=True, help="backup file (.tar.gz, 0600)")
    back.set_defaults(func=lambda a: _backup_cli(a, settings_of))
    rest = db_cmds.add_parser("restore", help="restore a backup into an empty store")
    common(rest)
    rest.add_argument("backup", type=Path)
    rest.add_argument("--site-dir", type=Path, help="where the site files go back")
    rest.add_argument("--force", action="store_true", help="overwrite differing site files")
    rest.set_defaults(func=lambda a: _restore_cli(a, settings_of))
    ver = db_cmds.add_parser("verify", help="check every device's chain in the ledger")
    common(ver)
    ver.set_defaults(func=lambda a: _verify_cli(a, settings_of))


def _backup_cli(args: argparse.Namespace, settings_of: Any) -> int:
    manifest = backup(settings_of(args), args.site_dir, args.out)
    counts = manifest["counts"]
    print(
        f"backup {args.out}: {manifest['backend']} store, {counts['batches']} batches, "
        f"{counts['readings']} readings, {counts['quarantined']} quarantined; site files: "
        f"{', '.join(manifest['site_files']) or 'none'}"
    )
    return 0


def _restore_cli(args: argparse.Namespace, settings_of: Any) -> int:
    manifest = restore(settings_of(args), args.backup, args.site_dir, force=args.force)
    want, got = manifest["counts"], manifest["restored_counts"]
    print(
        f"restored {args.backup}: {got['batches']} batches, {got['readings']} readings, "
        f"{got['quarantined']} quarantined (backup had {want['batches']}, "
        f"{want['readings']}, {want['quarantined']})"
    )
    if want != got:
        print("civicmesh: error: the restored counts differ from the backup's")
        return 1
    print("next: civicmesh db verify (checks every chain)")
    return 0


def _verify_cli(args: argparse.Namespace, settings_of: Any) -> int:
    settings: AnalyticsSettings = settings_of(args)
    if not settings.registry_file.exists():
        raise BackupError(f"No registry at {settings.registry_file} (registry_file)")
    store = open_store(settings.database_url, timescaledb=settings.storage.timescaledb)
    try:
        store.migrate()
        result = verify_chains(store, Registry.load(settings.registry_file))
    except StoreError:
        raise
    finally:
        store.close()
    for problem in result.problems[:50]:
        print(f"  {problem}")
    print(
        f"{result.devices} devices, {result.batches} batches: "
        + ("every chain verifies" if not result.problems else f"{len(result.problems)} problem(s)")
    )
    return 1 if result.problems else 0
