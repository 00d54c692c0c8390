"""The TimescaleDB path on a real TimescaleDB server (scripts/test.sh provides one).

What the store-level tests (tests/test_store.py, tests/test_rollups.py, parametrized over
every backend) do not cover: the path choice when the extension is installed but not
preloaded, two stores in two schemas of one database, concurrent start-up from two
processes, the policies (compression, retention per level, refresh) and their effect,
real-time aggregation, late writes into compressed chunks and ``civicmesh db status``.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from support import (
    PostgresUnavailable,
    create_database,
    drop_database,
    quiet_policy,
    tsdb_admin_url,
    tsdb_nopreload_admin_url,
)

from analytics.store import open_store
from analytics.store import postgres as pg
from analytics.store.base import (
    DEFAULT_STORAGE_POLICY,
    Resolution,
    RetentionPolicy,
    StoragePolicy,
    StoreError,
)
from analytics.store.postgres import PostgresStore
from analytics.store.status import PORTAL_BUG, format_status
from civicmesh.protocol import Reading
from civicmesh.timeutil import now_ms
from tests.test_rollups import HOUR, close, readings, write_in_batches
from tests.test_store import (
    DAY,
    DEVICE_A,
    DEVICE_B,
    MIN,
    device,
    fresh_schema,
    sealed,
    unschedule_jobs,
)

pytestmark = [pytest.mark.integration, pytest.mark.timescaledb]

ALL_MIGRATIONS = [
    "0001_initial",
    "0002_rollups",
    "0003_lean_readings",
    "0004_c_collation",
    "0005_zone_rollups",
    "0006_reports",
    "0007_dashboard",
    "0008_audit_log",
    "0009_retention_horizons",
    "0010_sqlite_parity",
]


@pytest.fixture(scope="module")
def tsdb() -> Iterator[str]:
    """A database on the TimescaleDB test server for this module (a schema per test)."""
    try:
        server = tsdb_admin_url()
        url = create_database(server)
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        drop_database(url, server)


@pytest.fixture
def opened() -> Iterator[list[PostgresStore]]:
    stores: list[PostgresStore] = []
    yield stores
    for store in stores:
        store.close()
    for url in {store._conninfo for store in stores if store.timescale}:
        unschedule_jobs(url)


def new_store(
    url: str, opened: list[PostgresStore], policy: StoragePolicy | None = None, **kw: Any
) -> PostgresStore:
    store = PostgresStore(url, policy=policy or quiet_policy(), **kw)
    opened.append(store)
    return store


def jobs(url: str) -> list[tuple[Any, ...]]:
    """(job id, policy, relation, config without ids) of this schema's TimescaleDB jobs."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT job_id, proc_name, hypertable_name, config"
            " FROM timescaledb_information.jobs WHERE hypertable_schema = current_schema()"
            " ORDER BY proc_name, hypertable_name"
        ).fetchall()
    return [
        (job, proc, rel, {k: v for k, v in cfg.items() if not k.endswith("hypertable_id")})
        for job, proc, rel, cfg in rows
    ]


def run_policy(url: str, proc: str, done: Callable[[], bool], timeout_s: float = 90) -> None:
    """Have TimescaleDB's scheduler run this schema's ``proc`` jobs now and wait for their
    effect (``done()``). Not ``run_job`` in the foreground: the scheduler may be running the
    same new job right then, and the two would collide. The job's recorded result is not
    looked at: this release records runs as failed while their work commits."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT public.alter_job(job_id, next_start => now())"
            " FROM timescaledb_information.jobs"
            " WHERE hypertable_schema = current_schema() AND proc_name = %s",
            (proc,),
        )
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{proc} had no effect within {timeout_s} s"
        time.sleep(0.25)


def compressed_chunks(url: str) -> tuple[int, int]:
    """(compressed, all) chunks of this schema's readings."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE is_compressed), count(*)"
            " FROM timescaledb_information.chunks"
            " WHERE hypertable_schema = current_schema() AND hypertable_name = 'readings'"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# ------------------------------------------------------------------- the path choice


def test_installed_but_not_preloaded_auto_takes_plain_path_with_one_warning(
    opened: list[PostgresStore], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defect: "available" was taken as "usable"; the first migration then died with
    # FATAL: extension "timescaledb" must be preloaded.
    server = tsdb_nopreload_admin_url()
    monkeypatch.setattr(pg, "_WARNED_NOT_PRELOADED", set())
    database = create_database(server)
    try:
        with psycopg.connect(database) as conn:
            available = conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
            ).fetchone()
        assert available is not None  # the files are installed in that cluster
        caplog.set_level(logging.WARNING, logger="analytics.store.postgres")
        for _ in range(3):  # several workers open the store: one warning
            store = new_store(fresh_schema(database), opened, timescaledb="auto")
            store.migrate()
            assert (store.backend, store.timescale) == ("postgresql", False)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "not preloaded" in warnings[0].getMessage()
        assert "shared_preload_libraries" in warnings[0].getMessage()
        assert "restart" in warnings[0].getMessage()
        # db status says so too
        status = opened[0].status()
        assert any("not preloaded" in w for w in status["warnings"]), status["warnings"]
        # require refuses, with the same fix in its message
        required = new_store(fresh_schema(database), opened, timescaledb="require")
        with pytest.raises(StoreError, match=r"not preloaded.*shared_preload_libraries.*restart"):
            required.migrate()
    finally:
        for store in opened:
            store.close()
        drop_database(database, server)


def test_two_schemas_in_one_database_both_on_timescaledb(
    tsdb: str, opened: list[PostgresStore]
) -> None:
    # Defect: the extension was created in the first store's schema and called
    # unqualified, so a store in another schema could not find create_hypertable.
    first, second = (new_store(fresh_schema(tsdb), opened) for _ in range(2))
    for store in (first, second):
        assert store.migrate() == ALL_MIGRATIONS
        assert store.backend == "timescaledb" and store.timescale_schema == "public"
    with psycopg.connect(tsdb) as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone() or (0,)
        assert n == 1
    start = now_ms() - 3 * HOUR
    for i, store in enumerate((first, second)):
        store.upsert_devices([device(DEVICE_A, "harbour")])
        write_in_batches(store, DEVICE_A, readings(40 + i, start - start % HOUR, 1))
        store.refresh_rollups()
    a = first.rollup_series("pm25", start - DAY, start + DAY, Resolution.HOUR)
    b = second.rollup_series("pm25", start - DAY, start + DAY, Resolution.HOUR)
    assert a and b and a != b  # each schema its own data


# ----------------------------------------------------- concurrent start-up, policies


def _migrate_and_configure(url: str, policy: StoragePolicy) -> list[str]:
    store = PostgresStore(url, policy=policy)
    try:
        applied = store.migrate()
        store.configure(policy)
        return applied
    finally:
        store.close()


def test_concurrent_migrate_and_configure_from_two_processes(
    tsdb: str, opened: list[PostgresStore]
) -> None:
    # Defect: both reported 0002_rollups as applied by themselves, and two configure()
    # calls at once failed ("tuple concurrently updated", "policy already exists").
    url = fresh_schema(tsdb)
    policy = DEFAULT_STORAGE_POLICY
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_migrate_and_configure, [(url, policy), (url, policy)])
    assert sorted(results) == [[], ALL_MIGRATIONS]
    found = jobs(url)
    policies = sorted((proc, rel) for _, proc, rel, _ in found)
    assert policies == [
        ("policy_compression", "readings"),
        ("policy_refresh_continuous_aggregate", "rollup_1d"),
        ("policy_refresh_continuous_aggregate", "rollup_1h"),
        ("policy_refresh_continuous_aggregate", "rollup_1m"),
        ("policy_retention", "readings"),
        ("policy_retention", "rollup_1h"),
        ("policy_retention", "rollup_1m"),
    ]


def test_policies_are_set_by_the_store_and_changed_only_when_settings_change(
    tsdb: str, opened: list[PostgresStore]
) -> None:
    # Defect: policies were added only by the CLI's configure step (a store built
    # another way had none) and every start removed and re-created them.
    url = fresh_schema(tsdb)
    store = new_store(url, opened, policy=DEFAULT_STORAGE_POLICY)
    store.migrate()  # no configure() call: the store sets its policies up itself
    before = jobs(url)
    by_policy = {(proc, rel): cfg for _, proc, rel, cfg in before}
    assert by_policy[("policy_compression", "readings")]["compress_after"] == "7 days"
    assert by_policy[("policy_retention", "readings")]["drop_after"] == "90 days"
    assert by_policy[("policy_retention", "rollup_1m")]["drop_after"] == "30 days"
    assert by_policy[("policy_retention", "rollup_1h")]["drop_after"] == "730 days"
    assert ("policy_retention", "rollup_1d") not in by_policy  # kept forever
    # A restart with the same settings changes nothing (same job ids).
    again = new_store(url, opened, policy=DEFAULT_STORAGE_POLICY)
    again.migrate()
    again.configure(DEFAULT_STORAGE_POLICY)
    assert jobs(url) == before
    # One setting changed: that policy alone is replaced.
    changed = StoragePolicy(
        24.0, 7.0, RetentionPolicy(raw_days=60.0, rollup_1m_days=30.0, rollup_1h_days=730.0)
    )
    again.configure(changed)
    after = {(proc, rel): (job, cfg) for job, proc, rel, cfg in jobs(url)}
    old = {(proc, rel): (job, cfg) for job, proc, rel, cfg in before}
    assert after[("policy_retention", "readings")][1]["drop_after"] == "60 days"
    assert after[("policy_retention", "readings")][0] != old[("policy_retention", "readings")][0]
    for key in old:
        if key != ("policy_retention", "readings"):
            assert after[key] == old[key], key


# --------------------------------------------------------- what TimescaleDB brings


def test_compression_policy_segments_by_device_and_reads_back_identical(
    tsdb: str, opened: list[PostgresStore]
) -> None:
    url = fresh_schema(tsdb)
    policy = StoragePolicy(24.0, 2.0, RetentionPolicy())  # compress after 2 days
    store = new_store(url, opened, policy=policy)
    store.migrate()
    store.upsert_devices([device(DEVICE_A, "harbour"), device(DEVICE_B, "harbour")])
    start = now_ms() - 6 * DAY
    start -= start % DAY
    write_in_batches(store, DEVICE_A, readings(50, start, 24, every_ms=5 * MIN))
    write_in_batches(store, DEVICE_B, readings(51, start, 24, every_ms=5 * MIN))
    store.refresh_rollups()
    before = store.readings(DEVICE_A.key_id, start, start + DAY)
    with psycopg.connect(url) as conn:
        settings = conn.execute(
            "SELECT attname, segmentby_column_index, orderby_column_index"
            " FROM timescaledb_information.compression_settings"
            " WHERE hypertable_schema = current_schema() AND hypertable_name = 'readings'"
            " ORDER BY attname"
        ).fetchall()
    assert settings == [("device_id", 1, None), ("metric", 2, None), ("ts", None, 1)]
    # the policy itself, run by the scheduler: every chunk older than 2 days compressed
    run_policy(url, "policy_compression", lambda: compressed_chunks(url) == (1, 1))
    compressed = compressed_chunks(url)
    assert store.readings(DEVICE_A.key_id, start, start + DAY) == before
    status = store.status()
    readings_status = next(
        h for h in status["timescaledb"]["hypertables"] if h["name"] == "readings"
    )
    assert readings_status["compressed_chunks"] == compressed[0]
    assert readings_status["before_compression_bytes"] > readings_status["after_compression_bytes"]


def test_late_write_into_a_compressed_chunk(tsdb: str, opened: list[PostgresStore]) -> None:
    url = fresh_schema(tsdb)
    store = new_store(url, opened, policy=StoragePolicy(24.0, 1.0, RetentionPolicy()))
    store.migrate()
    store.upsert_devices([device(DEVICE_A, "harbour")])
    day = now_ms() - 4 * DAY
    day -= day % DAY
    seq = write_in_batches(store, DEVICE_A, readings(52, day, 24, every_ms=10 * MIN))
    store.refresh_rollups()
    run_policy(url, "policy_compression", lambda: compressed_chunks(url) == (1, 1))
    late = [Reading(day + 5 * HOUR + 1_000, "pm25", 777.0), Reading(day + 5 * HOUR, "no2", 1.5)]
    store.write_batches([sealed(DEVICE_A, seq, late)])
    assert store.refresh_rollups() == 1
    got = store.readings(DEVICE_A.key_id, day + 5 * HOUR, day + 5 * HOUR + 2_000)
    assert Reading(day + 5 * HOUR + 1_000, "pm25", 777.0) in got
    for resolution in (Resolution.MINUTE, Resolution.HOUR, Resolution.DAY):
        rolled = store.rollup_series("pm25", day, day + DAY, resolution)
        assert close(rolled, store.series("pm25", day, day + DAY, resolution.seconds))
        assert max(p.max for p in rolled) == 777.0


def test_retention_policy_per_level_drops_old_chunks(
    tsdb: str, opened: list[PostgresStore]
) -> None:
    url = fresh_schema(tsdb)
    policy = StoragePolicy(
        24.0, 36_500.0, RetentionPolicy(raw_days=20, rollup_1m_days=40, rollup_1h_days=100)
    )
    # The data arrive (and are rolled up) while no retention applies yet...
    store = new_store(url, opened)
    store.migrate()
    store.upsert_devices([device(DEVICE_A, "harbour")])
    now = now_ms()
    old, older, recent = now - 60 * DAY, now - 200 * DAY, now - 2 * HOUR
    seq = 1
    for start in (older, old, recent):
        seq = write_in_batches(store, DEVICE_A, readings(53, start - start % HOUR, 1), seq)
    store.refresh_rollups()
    device_id = DEVICE_A.key_id

    def present(resolution: Resolution, at: int) -> bool:
        step = (
            HOUR if resolution in (Resolution.RAW, Resolution.MINUTE) else resolution.seconds * 1000
        )
        first = at - at % step
        if resolution is Resolution.RAW:
            return bool(store.readings(device_id, first, first + step))
        # a device's series: the zone rollups (city and zone series) are kept forever
        series = store.rollup_series("pm25", first, first + step, resolution, device_id=device_id)
        return bool(series)

    store.configure(policy)  # ...then the policies come, and run
    run_policy(
        url,
        "policy_retention",  # the four jobs: readings, 1 min, 1 h (and none for 1 day)
        lambda: not any(
            (present(Resolution.RAW, old), present(Resolution.MINUTE, old),
             present(Resolution.HOUR, older))
        ),
    )  # fmt: skip
    # raw: 20 days; 1 min: 40 days; 1 h: 100 days; 1 day: forever
    assert [present(Resolution.RAW, t) for t in (older, old, recent)] == [False, False, True]
    assert [present(Resolution.MINUTE, t) for t in (older, old, recent)] == [False, False, True]
    assert [present(Resolution.HOUR, t) for t in (older, old, recent)] == [False, True, True]
    assert [present(Resolution.DAY, t) for t in (older, old, recent)] == [True, True, True]


def test_real_time_aggregates_show_recent_data_before_the_refresh(
    tsdb: str, opened: list[PostgresStore]
) -> None:
    store = new_store(fresh_schema(tsdb), opened)
    store.migrate()
    store.upsert_devices([device(DEVICE_A, "harbour")])
    start = now_ms() - 2 * HOUR
    start -= start % HOUR
    write_in_batches(store, DEVICE_A, readings(54, start, 1))
    # No refresh_rollups(), no policy run: real-time aggregation answers from the readings
    # (a device's series; zone and city series come from the zone rollups, which the
    # refresh keeps).
    day, device_id = start - start % DAY, DEVICE_A.key_id
    for resolution in (Resolution.MINUTE, Resolution.HOUR, Resolution.DAY):
        rolled = store.rollup_series("pm25", day, day + DAY, resolution, device_id=device_id)
        assert rolled, resolution
        raw = store.series("pm25", day, day + DAY, resolution.seconds, device_id=device_id)
        assert close(rolled, raw)


def test_db_status_shows_chunks_compression_policies_and_their_runs(
    tsdb: str, opened: list[PostgresStore]
) -> None:
    url = fresh_schema(tsdb)
    store = new_store(url, opened, policy=StoragePolicy(24.0, 1.0, RetentionPolicy(raw_days=30)))
    store.migrate()
    store.upsert_devices([device(DEVICE_A, "harbour")])
    day = now_ms() - 3 * DAY
    write_in_batches(store, DEVICE_A, readings(55, day - day % DAY, 24, every_ms=10 * MIN))
    # The scheduler runs the compression policy now (run_job in the foreground records
    # no run): status shows when it ran, with what result, and its effect.
    with psycopg.connect(url, autocommit=True) as conn:
        (asked,) = conn.execute(
            "SELECT now() FROM (SELECT public.alter_job(job_id, next_start => now())"
            " FROM timescaledb_information.jobs WHERE hypertable_schema = current_schema()"
            " AND proc_name = 'policy_compression') AS t"
        ).fetchone() or (None,)
    deadline = time.monotonic() + 60
    while True:
        status = store.status()
        compression = next(j for j in status["timescaledb"]["jobs"] if j["kind"] == "compression")
        ran = compression["last_run_started_at"]
        hyper = {h["name"]: h for h in status["timescaledb"]["hypertables"]}
        if ran is not None and ran >= asked and hyper["readings"]["compressed_chunks"]:
            break
        assert time.monotonic() < deadline, "the scheduler did not run the compression policy"
        time.sleep(0.5)
    assert status["backend"] == "timescaledb"
    kinds = {(j["kind"], j["relation"]) for j in status["timescaledb"]["jobs"]}
    assert ("compression", "readings") in kinds and ("retention", "readings") in kinds
    assert compression["last_run_started_at"] is not None
    # the effect, whatever the recorded result (see PORTAL_BUG)
    assert re.match(r"([1-9]\d*) of \1 chunks", compression["effect"]), compression["effect"]
    assert "chunks older than 1 day are compressed" in compression["effect"]
    text = format_status(status)
    assert "store path: timescaledb" in text
    assert "readings:" in text and "chunks" in text and "ratio" in text
    assert "job " in text and "last run" in text and "effect:" in text
    assert PORTAL_BUG in text and "judge each policy by its effect" in text


def test_db_status_on_the_plain_path(tsdb: str, opened: list[PostgresStore]) -> None:
    store = new_store(fresh_schema(tsdb), opened, timescaledb="off")
    store.migrate()
    store.write_batches([sealed(DEVICE_A, 1, [Reading(now_ms() - MIN, "pm25", 1.0)])])
    status = store.status()
    assert status["backend"] == "postgresql" and "timescaledb" not in status
    assert status["counts"] == {"batches": 1, "readings": 1, "quarantined": 0}
    assert "readings partitions:" in format_status(status)


def test_chunk_interval_follows_the_policy(tsdb: str, opened: list[PostgresStore]) -> None:
    url = fresh_schema(tsdb)
    store = new_store(url, opened, policy=StoragePolicy(6.0, 36_500.0, RetentionPolicy()))
    store.migrate()
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT time_interval FROM timescaledb_information.dimensions"
            " WHERE hypertable_schema = current_schema() AND hypertable_name = 'readings'"
        ).fetchone()
    assert row == (timedelta(hours=6),)


def test_open_store_auto_takes_timescaledb_when_preloaded(
    tsdb: str, opened: list[PostgresStore]
) -> None:
    store = open_store(fresh_schema(tsdb), policy=quiet_policy())
    assert isinstance(store, PostgresStore)
    opened.append(store)
    store.migrate()
    assert store.backend == "timescaledb"


def test_civicmesh_db_status_command(
    tsdb: str, opened: list[PostgresStore], capsys: pytest.CaptureFixture[str]
) -> None:
    from civicmesh.cli import main

    url = fresh_schema(tsdb)
    store = new_store(url, opened, policy=DEFAULT_STORAGE_POLICY)
    store.migrate()
    assert main(["db", "status", "--database-url", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("store path: timescaledb")
    assert "job " in out and "retention on readings (drop_after=90 days)" in out
    assert PORTAL_BUG in out
    assert main(["db", "status", "--database-url", url, "--json"]) == 0
    assert '"backend": "timescaledb"' in capsys.readouterr().out


def test_civicmesh_db_status_on_sqlite(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from civicmesh.cli import main

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = open_store(url)
    store.migrate()
    store.close()
    assert main(["db", "status", "--database-url", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("store path: sqlite") and "ledger: 0 batches" in out
