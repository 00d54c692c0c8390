"""Rollups (1 min / 1 h / 1 day) on both stores: exactly the raw aggregates, kept current
by refresh after every kind of write (live, late, duplicate), zone and city series,
automatic resolution, completeness, retention and partitions made ahead."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import pytest

from analytics.store.base import (
    Resolution,
    RetentionPolicy,
    SeriesPoint,
    Store,
    StoreError,
    choose_resolution,
)
from analytics.store.postgres import PostgresStore, partition_name, partition_start
from civicmesh.protocol import Reading
from tests.test_store import (  # the store fixtures and the sealed-batch helper
    DAY,
    DEVICE_A,
    DEVICE_B,
    DEVICE_C,
    MIN,
    T0,
    Backend,
    backend,
    device,
    fresh_schema,
    pg_session_database,
    sealed,
    sql_backend,
    tsdb_session_database,
)

# fixtures used from tests.test_store
__all__ = ["backend", "pg_session_database", "sql_backend", "tsdb_session_database"]

HOUR = 60 * MIN
START = T0 - T0 % DAY  # a UTC midnight


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    opened = backend.open()
    opened.migrate()
    opened.upsert_devices(
        [device(DEVICE_A, "harbour"), device(DEVICE_B, "harbour"), device(DEVICE_C, "old-town")]
    )
    yield opened
    opened.close()


def readings(seed: int, start: int, hours: int, every_ms: int = MIN) -> list[Reading]:
    rng = random.Random(seed)
    out = []
    for t in range(start, start + hours * HOUR, every_ms):
        out.append(Reading(t, "pm25", round(rng.uniform(2, 80), 2)))
        out.append(Reading(t, "no2", round(rng.uniform(5, 120), 2)))
    return out


def write_in_batches(store: Store, signer: object, rows: list[Reading], first_seq: int = 1) -> int:
    seq = first_seq
    for i in range(0, len(rows), 500):
        store.write_batches([sealed(signer, seq, rows[i : i + 500])])  # type: ignore[arg-type]
        seq += 1
    return seq


def close(a: list[SeriesPoint], b: list[SeriesPoint]) -> bool:
    return len(a) == len(b) and all(
        (x.bucket_ms, x.count) == (y.bucket_ms, y.count)
        and math.isclose(x.mean, y.mean, rel_tol=1e-9)
        and (x.min, x.max) == (y.min, y.max)
        for x, y in zip(a, b, strict=True)
    )


def test_rollups_equal_raw_aggregates_at_every_level(store: Store) -> None:
    write_in_batches(store, DEVICE_A, readings(1, START, 50))
    write_in_batches(store, DEVICE_B, readings(2, START + 3 * HOUR, 30, every_ms=2 * MIN))
    write_in_batches(store, DEVICE_C, readings(3, START, 26))
    assert store.refresh_rollups() == 3
    assert store.refresh_rollups() == 0  # nothing new
    end = START + 3 * DAY
    for resolution in (Resolution.MINUTE, Resolution.HOUR, Resolution.DAY):
        for scope in ({}, {"zone": "harbour"}, {"device_id": DEVICE_C.key_id}):
            for metric in ("pm25", "no2"):
                from_rollup = store.rollup_series(metric, START, end, resolution, **scope)
                from_raw = store.series(metric, START, end, resolution.seconds, **scope)
                assert from_rollup, (resolution, scope, metric)
                assert close(from_rollup, from_raw), (resolution, scope, metric)


def test_late_and_duplicate_batches_keep_rollups_exact(store: Store) -> None:
    live = readings(4, START + 10 * HOUR, 2)
    next_seq = write_in_batches(store, DEVICE_A, live)
    store.refresh_rollups()
    # A late batch for an hour already rolled up, and a redelivered one.
    late = [Reading(START + 10 * HOUR + 30 * MIN + 1_000, "pm25", 999.0)]
    store.write_batches([sealed(DEVICE_A, next_seq, late)])
    store.write_batches([sealed(DEVICE_A, 1, live[:500])])  # duplicate: changes nothing
    assert store.refresh_rollups() == 1
    for resolution in (Resolution.MINUTE, Resolution.HOUR, Resolution.DAY):
        got = store.rollup_series("pm25", START, START + DAY, resolution)
        assert close(got, store.series("pm25", START, START + DAY, resolution.seconds))
        assert max(p.max for p in got) == 999.0


def test_auto_resolution_picks_the_finest_that_fits() -> None:
    assert choose_resolution(0, 6 * HOUR, 500) is Resolution.MINUTE
    assert choose_resolution(0, 30 * DAY, 1000) is Resolution.HOUR
    assert choose_resolution(0, 30 * DAY, 100) is Resolution.DAY
    assert choose_resolution(0, 5000 * DAY, 100) is Resolution.DAY
    with pytest.raises(ValueError, match="auto"):
        Resolution.parse("5m")


def test_auto_series_reads_the_chosen_rollup(store: Store) -> None:
    write_in_batches(store, DEVICE_A, readings(5, START, 48))
    store.refresh_rollups()
    resolution, points = store.auto_series("no2", START, START + 2 * DAY, 100)
    assert resolution is Resolution.HOUR and len(points) == 48
    resolution, points = store.auto_series("no2", START, START + 2 * DAY, 10)
    assert resolution is Resolution.DAY and len(points) == 2
    assert sum(p.count for p in points) == 48 * 60


def test_completeness_counts_received_against_expected(store: Store) -> None:
    full = readings(6, START, 24)
    write_in_batches(store, DEVICE_A, full)
    half = [r for r in readings(7, START, 24) if (r.ts_ms // MIN) % 2 == 0]
    write_in_batches(store, DEVICE_B, half)
    store.refresh_rollups()
    by_device = {c.device_id: c for c in store.completeness(START, START + DAY, 60)}
    assert by_device[DEVICE_A.key_id].ratio == 1.0
    assert by_device[DEVICE_A.key_id].expected == 2 * 1440
    assert by_device[DEVICE_B.key_id].ratio == pytest.approx(0.5)
    assert by_device[DEVICE_C.key_id].received == 0  # silent: no metrics, nothing expected
    harbour = store.completeness(START, START + DAY, 60, zone="harbour")
    assert {c.device_id for c in harbour} == {DEVICE_A.key_id, DEVICE_B.key_id}


def test_retention_drops_old_raw_data_and_rollups(store: Store, backend: Backend) -> None:
    old = readings(8, START - 30 * DAY, 2)
    recent = readings(9, START, 2)
    seq = write_in_batches(store, DEVICE_A, old)
    write_in_batches(store, DEVICE_A, recent, first_seq=seq)
    store.refresh_rollups()
    policy = RetentionPolicy(raw_days=14, rollup_1m_days=7, rollup_1h_days=20)
    dropped = store.apply_retention(START + DAY, policy)
    assert dropped["rollup_1m"] == 2 * 120 and dropped["rollup_1h"] == 2 * 2
    assert "rollup_1d" not in dropped  # kept forever
    assert store.readings(DEVICE_A.key_id, START - 31 * DAY, START - 20 * DAY) == []
    assert len(store.readings(DEVICE_A.key_id, START, START + DAY)) == len(recent)
    assert store.rollup_series("pm25", START - 31 * DAY, START + DAY, Resolution.DAY)
    if backend.name == "sqlite":
        assert dropped["readings"] == 2 * 2 * 60
    else:  # whole weekly partitions (plain) or daily chunks (TimescaleDB)
        assert set(dropped) == {"readings_partitions", "rollup_1m", "rollup_1h"}
        assert dropped["readings_partitions"] >= 1
    if backend.name == "postgresql":
        assert partition_name(partition_start(START - 30 * DAY)) not in store.partitions()  # type: ignore[attr-defined]


@pytest.mark.integration
def test_plain_path_creates_partitions_ahead(pg_session_database: str) -> None:
    store = PostgresStore(fresh_schema(pg_session_database), timescaledb="off")
    store.migrate()
    store.ensure_partitions_ahead(START, weeks=2)
    names = store.partitions()
    for week in range(3):
        assert partition_name(partition_start(START + week * 7 * DAY)) in names
    store.close()


def test_upkeep_thread_keeps_rollups_current(store: Store) -> None:
    import time

    from analytics.settings import StorageSettings
    from analytics.upkeep import StoreUpkeep

    forever = StorageSettings(  # the test data lie in 2023: no retention here
        rollup_refresh_s=0.05,
        raw_retention_days=None,
        rollup_1m_retention_days=None,
        rollup_1h_retention_days=None,
    )
    upkeep = StoreUpkeep(store, forever)
    upkeep.start()
    try:
        write_in_batches(store, DEVICE_A, readings(10, START, 1))
        deadline = time.monotonic() + 10
        while not store.rollup_series("pm25", START, START + HOUR, Resolution.HOUR):
            assert time.monotonic() < deadline, "rollup not refreshed by the upkeep thread"
            time.sleep(0.05)
        assert upkeep.stats()["rollup_ranges_refreshed"] >= 1
    finally:
        upkeep.stop()


def test_upkeep_flush_brings_rollups_up_to_date_at_once(store: Store) -> None:
    from analytics.settings import StorageSettings
    from analytics.upkeep import StoreUpkeep

    upkeep = StoreUpkeep(store, StorageSettings(rollup_refresh_s=3600))  # thread not started
    write_in_batches(store, DEVICE_A, readings(10, START, 1))
    assert not store.rollup_series("pm25", START, START + HOUR, Resolution.HOUR)  # lagging
    assert upkeep.flush() >= 1
    assert store.rollup_series("pm25", START, START + HOUR, Resolution.HOUR)
    assert upkeep.flush() == 0  # nothing left dirty
    assert upkeep.stats()["rollup_ranges_refreshed"] >= 1


@pytest.mark.integration
def test_server_without_timescaledb_takes_the_plain_path(pg_session_database: str) -> None:
    # The shared server on 5432 has no TimescaleDB: auto takes the plain path, require
    # refuses and says what to install.
    auto = PostgresStore(fresh_schema(pg_session_database))
    auto.migrate()
    assert (auto.backend, auto.timescale) == ("postgresql", False)
    auto.close()
    required = PostgresStore(fresh_schema(pg_session_database), timescaledb="require")
    with pytest.raises(StoreError, match="not installed on this server"):
        required.migrate()
    required.close()


def test_timescaledb_migration_splits_into_idempotent_statements() -> None:
    from analytics.store.schema import NO_TRANSACTION, load_migrations
    from analytics.store.schema import split_statements as _statements

    initial, rollups, *_later = load_migrations("timescaledb")
    assert NO_TRANSACTION not in initial.sql and NO_TRANSACTION in rollups.sql
    statements = _statements(rollups.sql)
    assert len(statements) == 12
    assert all(s.endswith(";") and not s.startswith("--") for s in statements)
    creates = [s for s in statements if s.startswith("CREATE")]
    assert all("IF NOT EXISTS" in s for s in creates)  # a cut-short run can be repeated
    assert sum("timescaledb.continuous" in s for s in statements) == 3
    assert sum("add_continuous_aggregate_policy" in s for s in statements) == 3


def test_zone_and_city_aggregates_from_rollups_equal_raw(store: Store) -> None:
    write_in_batches(store, DEVICE_A, readings(11, START, 5))
    write_in_batches(store, DEVICE_B, readings(12, START, 5))
    write_in_batches(store, DEVICE_C, readings(13, START, 5))
    store.refresh_rollups()
    raw = store.zone_aggregates(START, START + DAY, Resolution.RAW)
    assert sorted((a.zone or "", a.metric) for a in raw) == sorted(
        (zone, metric) for zone in ("", "harbour", "old-town") for metric in ("pm25", "no2")
    )
    assert raw[0].zone is None  # the city first
    city_pm25 = next(a for a in raw if a.zone is None and a.metric == "pm25")
    assert city_pm25.count == 3 * 5 * 60
    for resolution in (Resolution.MINUTE, Resolution.HOUR, Resolution.DAY):
        rolled = store.zone_aggregates(START, START + DAY, resolution)
        assert [(a.zone, a.metric, a.count, a.min, a.max) for a in rolled] == [
            (a.zone, a.metric, a.count, a.min, a.max) for a in raw
        ]
        assert all(
            math.isclose(x.mean, y.mean, rel_tol=1e-9) for x, y in zip(rolled, raw, strict=True)
        )


# ----------------------------------------------------------- late data past a retention


def _pm25_counts(store: Store, hour: int) -> tuple[int, int, int]:
    """(raw readings, hourly count, daily count) of DEVICE_A's pm25 around ``hour``."""
    raw = len(store.readings(DEVICE_A.key_id, hour, hour + HOUR, "pm25"))
    day = hour - hour % DAY
    hourly = store.rollup_series(
        "pm25", hour, hour + HOUR, Resolution.HOUR, device_id=DEVICE_A.key_id
    )
    daily = store.rollup_series("pm25", day, day + DAY, Resolution.DAY, device_id=DEVICE_A.key_id)
    return raw, sum(p.count for p in hourly), sum(p.count for p in daily)


def test_late_data_past_the_minute_retention_never_shrinks_hour_and_day(
    store: Store, backend: Backend
) -> None:
    # Defect: the hour was rebuilt from the 1-minute level, which retention had emptied
    # there, so one late reading turned an hour of 12 into an hour of 1.
    hour = START - 45 * DAY + 10 * HOUR
    seq = write_in_batches(store, DEVICE_A, readings(31, hour, 1, every_ms=5 * MIN))
    # Live data too, as in production: on TimescaleDB it keeps the aggregates' watermark
    # up, so what retention dropped below it is not filled in again in real time.
    write_in_batches(store, DEVICE_B, readings(35, START - HOUR, 1))
    store.refresh_rollups()
    assert _pm25_counts(store, hour) == (12, 12, 12)
    store.apply_retention(START, RetentionPolicy(raw_days=60, rollup_1m_days=30))
    assert not store.rollup_series("pm25", hour, hour + HOUR, Resolution.MINUTE)
    store.write_batches([sealed(DEVICE_A, seq, [Reading(hour + 2 * MIN, "pm25", 50.0)])])
    assert store.refresh_rollups() == 1
    raw, hourly, daily = _pm25_counts(store, hour)
    assert raw == 13
    if backend.name == "timescaledb":
        # A continuous aggregate is refreshed from the level below only: the hour is kept
        # as it was (the refresh logs that late data past the retention is not rolled up).
        assert (hourly, daily) == (12, 12)
    else:  # rebuilt from the readings, which still hold the whole hour
        assert (hourly, daily) == (13, 13)


def test_late_data_past_the_raw_retention_keeps_hour_and_day(
    store: Store, backend: Backend
) -> None:
    hour = START - 80 * DAY + 10 * HOUR
    seq = write_in_batches(store, DEVICE_A, readings(32, hour, 1, every_ms=5 * MIN))
    write_in_batches(store, DEVICE_B, readings(36, START - HOUR, 1))  # live data, as above
    store.refresh_rollups()
    store.apply_retention(START, RetentionPolicy(raw_days=60, rollup_1m_days=30))
    assert _pm25_counts(store, hour) == (0, 12, 12)  # raw and 1 min gone, hour and day kept
    store.write_batches([sealed(DEVICE_A, seq, [Reading(hour + 2 * MIN, "pm25", 50.0)])])
    store.refresh_rollups()
    # No level holds that hour whole any more: the correct buckets stay as they were.
    assert _pm25_counts(store, hour) == (1, 12, 12)


def test_refresh_and_retention_report_the_same_shapes_on_every_backend(
    store: Store, backend: Backend
) -> None:
    write_in_batches(store, DEVICE_A, readings(33, START - 40 * DAY, 1))
    write_in_batches(store, DEVICE_B, readings(34, START, 1))
    assert store.refresh_rollups() == 2  # one range per device written, on every path
    dropped = store.apply_retention(
        START + DAY, RetentionPolicy(raw_days=30, rollup_1m_days=20, rollup_1h_days=25)
    )
    raw_key = "readings" if backend.name == "sqlite" else "readings_partitions"
    assert set(dropped) == {raw_key, "rollup_1m", "rollup_1h"}
    assert dropped[raw_key] >= 1 and dropped["rollup_1m"] == 2 * 60
    assert dropped["rollup_1h"] == 2
