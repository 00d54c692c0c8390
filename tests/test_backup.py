"""``civicmesh db backup | restore | verify | migrate --dry-run`` on both stores, as the
operator runs them: backup -> wipe -> restore -> same counts, every chain verifies; and
an upgrade from a frozen store of schema 6 (tests/fixtures, made before 0007)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from support import create_database, drop_database

from analytics.store import open_store
from civicmesh.registry import Registry

FIXTURES = Path(__file__).parent / "fixtures"
CLI = str(Path(sys.executable).parent / "civicmesh")
pytestmark = pytest.mark.integration


def civicmesh(*args: str | Path, registry: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIVICMESH")}
    env["CIVICMESH_REGISTRY_FILE"] = str(registry)
    return subprocess.run(
        [CLI, *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


def counts(url: str) -> tuple[int, int, int]:
    store = open_store(url)
    try:
        store.migrate()
        c = store.counts()
        return c.batches, c.readings, c.quarantined
    finally:
        store.close()


def load_fixture(url: str, tmp: Path) -> None:
    """A store of schema 6 with two devices' chains (see fixtures/make_store_fixtures.py)."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url[len("sqlite:///") :])
        conn.executescript((FIXTURES / "store-v6.sqlite.sql").read_text())
        conn.close()
    else:
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f",
             str(FIXTURES / "store-v6.postgresql.sql")],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip


def site(tmp: Path) -> Path:
    """The central's files a backup must carry: registry, a key, a secret."""
    folder = tmp / "site"
    (folder / "pki").mkdir(parents=True)
    (folder / "secrets").mkdir()
    shutil.copy(FIXTURES / "store-v6.registry.json", folder / "registry.json")
    (folder / "pki" / "ca.key").write_text("a key\n")
    (folder / "pki" / "ca.key").chmod(0o600)
    (folder / "secrets" / "session_secret").write_text("s" * 64 + "\n")
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(params=["sqlite", "postgresql"])
def two_stores(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two empty stores of one kind: the one backed up, the one restored into."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
        return
    a, b = create_database(), create_database()
    try:
        yield a, b
    finally:
        drop_database(a)
        drop_database(b)


def test_backup_wipe_restore_same_counts_and_every_chain_verifies(
    two_stores: tuple[str, str], tmp_path: Path
) -> None:
    source, target = two_stores
    folder = site(tmp_path)
    registry = folder / "registry.json"
    load_fixture(source, tmp_path)
    before = counts(source)  # also upgrades the fixture to the current schema
    assert before == (10, 30, 0)
    files = tree(folder)
    out = tmp_path / "backup.tar.gz"
    made = civicmesh("db", "backup", "--database-url", source, "--site-dir", folder,
                     "--out", out, registry=registry)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "10 batches, 30 readings" in made.stdout
    assert out.stat().st_mode & 0o777 == 0o600  # it holds the site's keys
    with tarfile.open(out) as tar:
        assert "site/pki/ca.key" in tar.getnames() and "site/registry.json" in tar.getnames()

    shutil.rmtree(folder)  # the server is lost: its files and its store
    restored = civicmesh("db", "restore", out, "--database-url", target, "--site-dir", folder,
                         registry=registry)  # fmt: skip
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert counts(target) == before
    assert tree(folder) == files
    verified = civicmesh("db", "verify", "--database-url", target, registry=registry)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "2 devices, 10 batches: every chain verifies" in verified.stdout

    again = civicmesh("db", "restore", out, "--database-url", target, registry=registry)
    assert again.returncode == 1 and "already holds batches" in again.stderr
    assert "Traceback" not in again.stderr


def test_verify_finds_a_ledger_row_that_differs_from_its_signed_batch(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    load_fixture(url, tmp_path)
    counts(url)
    conn = sqlite3.connect(tmp_path / "s.db")
    conn.execute("UPDATE batches SET prev_hash = zeroblob(32) WHERE seq = 3")
    conn.commit()
    conn.close()
    proc = civicmesh("db", "verify", "--database-url", url,
                     registry=FIXTURES / "store-v6.registry.json")  # fmt: skip
    assert proc.returncode == 1
    assert "seq 3: does not link to seq 2" in proc.stdout and "2 problem(s)" in proc.stdout


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_upgrade_from_schema_6_lists_then_applies_and_keeps_the_data(
    backend: str, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}" if backend == "sqlite" else create_database()
    registry = FIXTURES / "store-v6.registry.json"
    try:
        load_fixture(url, tmp_path)
        dry = civicmesh("db", "migrate", "--dry-run", "--database-url", url, registry=registry)
        assert dry.returncode == 0, dry.stderr
        assert "would apply 0007_dashboard" in dry.stdout
        assert "0006" not in dry.stdout
        assert f"store path: {backend}" in dry.stdout
        again = civicmesh("db", "migrate", "--dry-run", "--database-url", url, registry=registry)
        assert again.stdout == dry.stdout  # the dry run changed nothing
        applied = civicmesh("db", "migrate", "--database-url", url, registry=registry)
        assert applied.returncode == 0 and "0007_dashboard" in applied.stdout, applied.stderr
        assert (
            "0 migration(s) pending"
            in civicmesh(
                "db", "migrate", "--dry-run", "--database-url", url, registry=registry
            ).stdout
        )
        store = open_store(url)
        try:
            reg = Registry.load(registry)
            device = sorted(reg.devices)[0]
            assert [e.seq for e in store.ledger(device)] == [1, 2, 3, 4, 5]
            values = sorted(
                r.value for r in store.readings(device, 1_699_000_000_000, 1_701_000_000_000)
            )
            assert values == sorted(10.0 + s + i for s in range(1, 6) for i in range(3))
            store.zone_shapes()  # the table 0007 adds is there
        finally:
            store.close()
        verified = civicmesh("db", "verify", "--database-url", url, registry=registry)
        assert "every chain verifies" in verified.stdout, verified.stdout
    finally:
        if backend == "postgresql":
            drop_database(url)
