"""``civicmesh import`` end to end against a raw insert of the same rows, in one run.

    python -m bench.importer [--copies N] [--postgres URL]

The UCI recording (../shared/datasets/uci_air_quality) is copied N times as N stations
(each a file of its own), then imported with the shipped mapping
(deploy/import/uci.toml) through the real command: CSV parsing, unit handling, one
importer key per station, sealing and signing, ingest's verification (envelope, batch,
every reading), the ledger, the audit-log leaves and the readings. The rollup refresh at
the end is timed apart. The baseline writes the very rows the import stored, in the same
run and on the same store type, the fastest plain way: SQLite ``executemany`` into a bare
table with the readings index (embedded store), or binary ``COPY`` into the same indexed
readings table in a fresh schema (PostgreSQL).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
UCI = ROOT.parent / "shared" / "datasets" / "uci_air_quality" / "AirQualityUCI.csv"
MAPPING = ROOT / "deploy" / "import" / "uci.toml"


def stations(folder: Path, copies: int) -> list[Path]:
    files = []
    for i in range(copies):
        path = folder / f"uci-copy-{i:03d}.csv"
        shutil.copyfile(UCI, path)
        files.append(path)
    return files


def import_rate(folder: Path, url: str, files: list[Path]) -> dict[str, float]:
    from civicmesh.cli import build_parser, main

    build_parser()  # the command modules are loaded: startup (~1 s) is not throughput
    args = ["import", "--mapping", str(MAPPING), *map(str, files), "--database-url", url]
    args += ["--registry-file", str(folder / "registry.json"), "--no-rollups"]
    args += ["--state-dir", str(folder / "import")]
    out = io.StringIO()
    began = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(args)
    elapsed = time.perf_counter() - began
    if code != 0:
        raise SystemExit(f"import failed:\n{out.getvalue()}")
    from analytics.store import open_store

    store = open_store(url)
    try:
        readings = store.counts().readings
        began = time.perf_counter()
        store.refresh_rollups()
        rollups = time.perf_counter() - began
    finally:
        store.close()
    return {"readings": readings, "seconds": elapsed, "rollup_seconds": rollups}


def sqlite_baseline(db: Path, scratch: Path) -> float:
    """Readings/s of one executemany of the same rows into a bare indexed table."""
    source = sqlite3.connect(db)
    rows = source.execute(
        "SELECT device_id, ts, metric, value, quality, raw, anomaly, seq FROM readings"
    ).fetchall()
    source.close()
    conn = sqlite3.connect(scratch, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE readings (device_id TEXT NOT NULL, ts INTEGER NOT NULL, "
            "metric INTEGER NOT NULL, value REAL NOT NULL, quality INTEGER NOT NULL, "
            "raw REAL, anomaly REAL, seq INTEGER NOT NULL)"
        )
        conn.execute("CREATE INDEX readings_device_metric_ts ON readings (device_id, metric, ts)")
        began = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
        elapsed = time.perf_counter() - began
    finally:
        conn.close()
    return len(rows) / elapsed


def postgres_baseline(url: str, baseline_url: str) -> float:
    """Readings/s of binary COPY of the same rows into the same (partitioned, indexed)
    readings table of a fresh schema."""
    import numpy as np
    import psycopg

    from bench.copydata import COLUMNS, copy_rows
    from bench.ingest import open_backend

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT device_id, (extract(epoch FROM ts) * 1000)::bigint, metric, value, seq "
            "FROM readings"
        ).fetchall()
    devices = np.array([r[0].encode() for r in rows], dtype="S16")
    ts = np.array([r[1] for r in rows], dtype=np.int64)
    data = copy_rows(
        devices,
        ts,
        np.array([r[2] for r in rows], dtype=np.int16),
        np.array([r[3] for r in rows], dtype=np.float64),
        np.array([r[4] for r in rows], dtype=np.int64),
    )
    store = open_backend(baseline_url, "postgresql")
    weeks = int((ts.max() - ts.min()) // (7 * 86_400_000)) + 2
    store.ensure_partitions_ahead(int(ts.min()), weeks=weeks)
    store.close()
    with psycopg.connect(baseline_url, autocommit=True) as conn:
        began = time.perf_counter()
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(f"COPY readings ({COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.write(data)
        elapsed = time.perf_counter() - began
    return len(rows) / elapsed


def run(copies: int, postgres: str | None) -> dict[str, Any]:
    if not UCI.exists():
        raise SystemExit(f"{UCI} not found: the UCI recording lives in ../shared/datasets/")
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        folder = Path(tmp)
        files = stations(folder, copies)
        if postgres is None:
            url = f"sqlite:///{folder / 'store.db'}"
            result = import_rate(folder, url, files)
            baseline = sqlite_baseline(folder / "store.db", folder / "bare.db")
            path = "sqlite (embedded store) vs executemany into a bare indexed table"
        else:
            import psycopg

            from bench.ingest import schema_url

            stamp = f"{int(time.time())}"
            schemas = [f"bench_import_{stamp}", f"bench_import_raw_{stamp}"]
            try:
                url = schema_url(postgres, schemas[0])
                result = import_rate(folder, url, files)
                baseline = postgres_baseline(url, schema_url(postgres, schemas[1]))
            finally:
                with psycopg.connect(postgres, autocommit=True) as conn:
                    for schema in schemas:
                        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())
            path = "postgresql (plain) vs binary COPY into the same readings table"
    rate = result["readings"] / result["seconds"]
    return {
        "path": path,
        "stations": copies,
        "readings": int(result["readings"]),
        "import_seconds": result["seconds"],
        "import_readings_per_s": rate,
        "rollup_seconds": result["rollup_seconds"],
        "baseline_readings_per_s": baseline,
        "ratio": rate / baseline,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.importer", description=__doc__)
    parser.add_argument("--copies", type=int, default=8, help="stations (copies of UCI)")
    parser.add_argument("--postgres", help="a PostgreSQL database URL (default: SQLite)")
    args = parser.parse_args(argv)
    r = run(args.copies, args.postgres)
    print(f"path: {r['path']}")
    print(f"stations: {r['stations']}, readings: {r['readings']:,}")
    print(
        f"import end to end: {r['import_readings_per_s']:,.0f} readings/s "
        f"({r['import_seconds']:.2f} s; rollup refresh after it {r['rollup_seconds']:.2f} s)"
    )
    print(f"raw insert of the same rows: {r['baseline_readings_per_s']:,.0f} readings/s")
    print(f"ratio import / raw: {r['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
