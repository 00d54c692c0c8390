"""``civicmesh import``: archives through sign -> verify -> ledger -> store.

Fixtures are made here, at test time: a multi-station wide CSV with year/month/day/hour
columns in local time (CO in µg/m³), an OpenAQ-style long CSV with NO2 in ppb, and a
mapping file. The store is the real embedded one; the kill test runs the real command in
a subprocess and SIGKILLs it mid-import.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from analytics.importer.errors import ArchiveError
from analytics.importer.run import chunks
from analytics.importer.units import Reference, converter
from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import RetentionPolicy
from civicmesh.cli import main
from civicmesh.config import load_settings
from civicmesh.errors import RegistryError
from civicmesh.identity import Ed25519Signer
from civicmesh.metrics import BY_NAME
from civicmesh.protocol import MAX_SPAN_MS, Reading, open_batch, open_envelope
from civicmesh.registry import IMPORT_KIND, DeviceRecord, Registry
from tests.test_store import fresh_schema, pg_session_database, sealed

__all__ = ["pg_session_database"]  # the fixture, used by store_url

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3_600_000
DAY = 24 * HOUR

MAPPING = """
format = "wide"
timezone = "Europe/Madrid"
zone = "centro"
owner = "Ayuntamiento (test archive)"
station_column = "estacion"
ignore = ["notes"]

[csv]
delimiter = ";"

[time]
year = "ano"
month = "mes"
day = "dia"
hour = "hora"

[columns]
"CO" = { metric = "co", unit = "ug/m3" }
"NO2" = { metric = "no2", unit = "ug/m3" }
"PM10" = { metric = "pm10", unit = "ug/m3" }

[stations.28079004]
id = "plaza-espana"
name = "Plaza de España"
lat = 40.4238
lon = -3.7122

[stations.28079008]
id = "escuelas-aguirre"
name = "Escuelas Aguirre"
zone = "retiro"
"""


def wide_fixture(
    path: Path, days: int, stations: tuple[str, ...] = ("28079004", "28079008")
) -> int:
    """Hourly rows from 2021-01-01 local time; returns the readings it holds."""
    lines = ["estacion;ano;mes;dia;hora;CO;NO2;PM10;notes"]
    n = 0
    start = datetime(2021, 1, 1)
    for s_i, station in enumerate(stations):
        for h in range(days * 24):
            t = datetime.fromtimestamp(start.timestamp() + h * 3600)
            co = 300 + (h % 24) * 10 + s_i
            no2 = 20 + (h % 7)
            pm10 = "" if h % 10 == 0 else f"{15 + h % 5}"
            n += 2 + (pm10 != "")
            lines.append(f"{station};{t.year};{t.month};{t.day};{t.hour};{co};{no2};{pm10};x")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return n


def run(*args: str | Path) -> int:
    return main([str(a) for a in args])


def store_rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def common(tmp: Path) -> list[str | Path]:
    return [
        "--database-url",
        f"sqlite:///{tmp / 'store.db'}",
        "--registry-file",
        tmp / "registry.json",
        "--state-dir",
        tmp / "import",
    ]


# ------------------------------------------------------------------------ wide CSV


def test_wide_csv_imports_signed_converted_and_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "madrid.csv"
    expected = wide_fixture(archive, days=10)
    mapping = tmp_path / "madrid.toml"
    mapping.write_text(MAPPING, encoding="utf-8")
    assert run("import", "--mapping", mapping, archive, *common(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"imported {expected:,} readings" in out
    assert "station plaza-espana (Plaza de España, zone centro at 40.42380,-3.71220)" in out
    assert "missing value" in out  # the empty PM10 cells, counted
    db = tmp_path / "store.db"
    assert store_rows(db, "SELECT count(*) FROM readings") == [(expected,)]

    # provenance: importer identities in the registry, back-dated, kind import
    registry = Registry.load(tmp_path / "registry.json")
    importers = [d for d in registry.devices.values() if d.kind == IMPORT_KIND]
    assert len(importers) == 2 and len(registry.gateways) == 1
    first_local = datetime(2021, 1, 1, tzinfo=UTC).timestamp() * 1000 - HOUR  # 00:00 CET
    for record in importers:
        assert record.registered_at_ms <= first_local < time.time() * 1000 - 365 * DAY
    assert {d.zone for d in importers} == {"centro", "retiro"}
    assert store_rows(db, "SELECT DISTINCT kind FROM devices") == [("import",)]

    # every ledger batch verifies with the registered keys, and is chained
    gateway = next(iter(registry.gateways.values()))
    for record in importers:
        rows = store_rows(
            db,
            "SELECT seq, prev_hash, payload_hash, gateway_message FROM batches "
            f"WHERE device_id = '{record.device_id}' ORDER BY seq",
        )
        prev = bytes(32)
        for seq, prev_hash, payload_hash, gateway_message in rows:
            envelope = open_envelope(bytes(gateway_message), lambda _i: gateway.verify_key())
            batch = open_batch(envelope.device_message, lambda _i, r=record: r.verify_key())
            assert batch.seq == seq and bytes(prev_hash) == prev and batch.hash == payload_hash
            prev = bytes(payload_hash)

    # CO: 300 µg/m³ at local midnight 2021-01-01 (23:00 UTC the day before) -> 0.3 mg/m³
    code_co = BY_NAME["co"].code
    plaza = next(d for d in importers if d.zone == "centro").device_id
    (value,) = store_rows(
        db,
        f"SELECT value FROM readings WHERE device_id = '{plaza}' AND metric = {code_co} "
        f"AND ts = {int(first_local)}",
    )[0]
    assert math.isclose(float(value), 0.3)  # type: ignore[arg-type]
    assert store_rows(db, "SELECT count(*) FROM rollup_1h")[0][0] > 0

    # again: nothing added
    assert run("import", "--mapping", mapping, archive, *common(tmp_path)) == 0
    assert "nothing new to import" in capsys.readouterr().out
    assert store_rows(db, "SELECT count(*) FROM readings") == [(expected,)]
    assert store_rows(db, "SELECT count(*) FROM quarantine") == [(0,)]

    # the same state against another store: refused, not silently re-imported
    other = ["--database-url", f"sqlite:///{tmp_path / 'other.db'}"]
    assert run("import", "--mapping", mapping, archive, *common(tmp_path), *other) == 1
    assert "is this the store it was imported into?" in capsys.readouterr().err


def test_dry_run_reports_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "madrid.csv"
    expected = wide_fixture(archive, days=3)
    mapping = tmp_path / "m.toml"
    mapping.write_text(MAPPING, encoding="utf-8")
    assert run("import", "--dry-run", "--mapping", mapping, archive, *common(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "2 station(s)" in out
    assert "metrics: co, no2, pm10" in out
    assert "period: 2020-12-31 23:00 .. 2021-01-03 22:00 (UTC)" in out
    assert f"readings to import: {expected:,}" in out
    assert "columns ignored: notes" in out
    assert "dry run: nothing was written" in out
    assert not (tmp_path / "registry.json").exists()
    assert not (tmp_path / "import").exists()


def test_wide_csv_without_mapping_needs_units_and_knows_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "kerbside-1.csv"
    good.write_text(
        "timestamp,pm25 (µg/m³),temperature [K]\n"
        "2022-05-01T10:00:00+02:00,12.5,293.15\n"
        "2022-05-01T11:00:00+02:00,bad,294.15\n",
        encoding="utf-8",
    )
    assert run("import", good, *common(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "station kerbside-1" in out and "1 not a number" in out
    rows = store_rows(
        tmp_path / "store.db", "SELECT ts, metric, value FROM readings ORDER BY ts, metric"
    )
    t0 = int(datetime(2022, 5, 1, 8, tzinfo=UTC).timestamp() * 1000)
    assert rows[0] == (t0, BY_NAME["pm25"].code, 12.5)
    assert rows[1][:2] == (t0, BY_NAME["temperature"].code)
    assert math.isclose(float(rows[1][2]), 20.0)  # type: ignore[arg-type]

    bare = tmp_path / "bare.csv"
    bare.write_text("timestamp,no2,so2x\n2022-05-01T10:00:00Z,1,2\n", encoding="utf-8")
    assert run("import", "--dry-run", bare, *common(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "unknown column(s) 'so2x'" in err and "Traceback" not in err
    bare.write_text("timestamp,no2\n2022-05-01T10:00:00Z,1\n", encoding="utf-8")
    assert run("import", "--dry-run", bare, *common(tmp_path)) == 1
    assert "name a metric but no unit" in capsys.readouterr().err
    semi = tmp_path / "semi.csv"
    semi.write_text("timestamp;no2 (ppb)\n2022-05-01T10:00:00Z;1\n", encoding="utf-8")
    assert run("import", "--dry-run", semi, *common(tmp_path)) == 1
    assert "put [csv] delimiter = ';'" in capsys.readouterr().err
    naive = tmp_path / "naive.csv"
    naive.write_text("timestamp,no2 (ppb)\n2022-05-01 10:00,1\n", encoding="utf-8")
    assert run("import", "--dry-run", naive, *common(tmp_path)) == 1
    assert "needs the reference conditions" in capsys.readouterr().err


def test_bad_mapping_file_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mapping = tmp_path / "m.toml"
    mapping.write_text('format = "wide"\n[columns]\nCO = { metric = "carbon", unit = "x" }\n')
    assert run("import", "--mapping", mapping, tmp_path / "x.csv", *common(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "columns.CO.metric" in err and "unknown metric 'carbon'" in err
    mapping.write_text('format = "wide"\ntimezone = "Mars/Olympus"\n')
    assert run("import", "--mapping", mapping, tmp_path / "x.csv", *common(tmp_path)) == 1
    assert "unknown time zone 'Mars/Olympus'" in capsys.readouterr().err


def test_a_misspelt_station_or_column_or_a_folder_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a new user: a typo in a [stations] key imported the archive again under a
    new identity; a typo in a [columns] key blamed a unit; a folder gave a traceback."""
    archive = tmp_path / "madrid.csv"
    wide_fixture(archive, days=1)
    mapping = tmp_path / "m.toml"
    mapping.write_text(MAPPING.replace("[stations.28079008]", "[stations.28079080]"))
    assert run("import", "--mapping", mapping, archive, "--dry-run", *common(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "'28079080' match no station" in err and "'28079008' have no entry" in err
    # a mapping naming a station this run does not read is fine (part of an archive)
    mapping.write_text(MAPPING + '\n[stations.28079099]\nid = "elsewhere"\n')
    assert run("import", "--mapping", mapping, archive, "--dry-run", *common(tmp_path)) == 0
    capsys.readouterr()
    mapping.write_text(MAPPING.replace('"NO2" = {', '"NO 2" = {'))
    assert run("import", "--mapping", mapping, archive, "--dry-run", *common(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "not in this header: 'NO 2' (the header has 'NO2')" in err
    assert run("import", "--mapping", mapping, tmp_path, *common(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "is a folder; give the archive's CSV files" in err and "Traceback" not in err


# --------------------------------------------------------------------- OpenAQ long


def test_openaq_long_csv_with_ppb_at_stated_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "openaq.csv"
    archive.write_text(
        "location,parameter,value,unit,datetime,latitude,longitude\n"
        "Ring Road,no2,10,ppb,2023-02-01T00:00:00+00:00,52.1,5.1\n"
        "Ring Road,pm25,8.5,µg/m³,2023-02-01T00:00:00+00:00,52.1,5.1\n"
        "Ring Road,so2,3,µg/m³,2023-02-01T00:00:00+00:00,52.1,5.1\n"
        "Ring Road,pm25,9.5,µg/m³,2023-02-01T01:00:00+00:00,52.1,5.1\n"
        "Park,co,0.5,ppm,2023-02-01T00:00:00+00:00,52.2,5.2\n"
        "Park,pm25,1,furlongs,2023-02-01T00:00:00+00:00,52.2,5.2\n",
        encoding="utf-8",
    )
    # without reference conditions, the ppb/ppm rows are refused with the reason
    assert run("import", "--dry-run", "--format", "openaq", archive, *common(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "needs the reference conditions" in out
    assert "parameter 'so2' is not a civicmesh metric" in out
    assert "unknown unit 'furlongs'" in out
    mapping = tmp_path / "oaq.toml"
    mapping.write_text(
        'format = "openaq"\n[conversion]\nreference_temperature_c = 25.0\n'
        "reference_pressure_hpa = 1013.25\n"
        '[stations."Ring Road"]\nname = "Ring Road (north)"\n',
        encoding="utf-8",
    )
    assert run("import", "--mapping", mapping, archive, *common(tmp_path)) == 0
    assert "imported 4 readings" in capsys.readouterr().out
    rows = dict(
        store_rows(
            tmp_path / "store.db", "SELECT metric, value FROM readings WHERE metric IN (3, 5)"
        )
    )
    assert math.isclose(float(rows[3]), 10 * 46.0055 / 24.465, rel_tol=1e-3)  # type: ignore[arg-type]
    assert math.isclose(float(rows[5]), 0.5 * 28.0101 / 24.465, rel_tol=1e-3)  # type: ignore[arg-type]
    registry = Registry.load(tmp_path / "registry.json")
    placed = {(d.lat, d.lon) for d in registry.devices.values()}
    assert placed == {(52.1, 5.1), (52.2, 5.2)}


# ------------------------------------------------------------------------ units


def test_units_convert_only_what_physics_fixes() -> None:
    ref = Reference(25.0, 1013.25)
    assert math.isclose(ref.molar_volume_l, 24.465, rel_tol=1e-4)
    to_mg = converter("co", "µg/m³", None, "t")
    assert to_mg is not None and math.isclose(to_mg(1500.0), 1.5)
    to_ug = converter("no2", "mg/m3", None, "t")
    assert to_ug is not None and math.isclose(to_ug(0.04), 40.0)
    assert converter("pm25", "ug/m3", None, "t") is None
    eu = converter("o3", "ppb", Reference(20.0, 1013.25), "t")
    assert eu is not None and math.isclose(eu(1.0), 47.9982 / 24.055, rel_tol=1e-3)
    with pytest.raises(ArchiveError, match="only for a gas of known molar mass"):
        converter("pm25", "ppb", ref, "t")
    with pytest.raises(ArchiveError, match="not a conversion physics fixes"):
        converter("pm25", "%", ref, "t")


def test_batches_split_at_a_week_gap_and_between_times() -> None:
    start = 1_600_000_000_000
    rows = [(start + i * HOUR, code, 1.0) for i in range(5) for code in (1, 2, 3)]
    rows += [(start + 15 * DAY, 1, 1.0)]  # two weeks off, then back
    parts = list(chunks(rows, size=4))
    assert [len(p) for p in parts] == [3, 3, 3, 3, 3, 1]  # never splits a time's readings
    for part in parts:
        assert part[-1][0] - part[0][0] <= MAX_SPAN_MS
    assert sum(len(p) for p in parts) == len(rows)


# --------------------------------------------------------------------- registry


def test_back_dated_valid_from_only_for_importers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry_file = tmp_path / "registry.json"
    key = Ed25519Signer.from_seed(bytes(32)).verify_key().to_text()
    base = ["registry", "add-device", "--file", registry_file, "--public-key", key, "--zone", "z"]
    assert run(*base, "--valid-from", "2004-03-01T00:00:00+00:00") == 1
    assert "only for importer identities" in capsys.readouterr().err
    assert run(*base, "--kind", "import", "--valid-from", "2004-03-01T00:00:00+00:00") == 0
    record = next(iter(Registry.load(registry_file).devices.values()))
    assert record.kind == IMPORT_KIND
    assert record.registered_at_ms == int(datetime(2004, 3, 1, tzinfo=UTC).timestamp() * 1000)
    field = Ed25519Signer.from_seed(b"\x01" * 32)
    registry = Registry.empty().with_device(
        DeviceRecord(field.key_id, field.verify_key().to_text(), "z", kind="air")
    )
    with pytest.raises(RegistryError, match="cannot become an importer"):
        registry.with_importer(
            DeviceRecord(field.key_id, field.verify_key().to_text(), "z", kind=IMPORT_KIND), 0
        )


# ------------------------------------------------------------------- kill and resume


def test_killed_import_resumes_to_exactly_one_clean_import(tmp_path: Path) -> None:
    archive = tmp_path / "big.csv"
    stations = ("28079004", "28079008", "28079011", "28079016")
    expected = wide_fixture(archive, days=200, stations=stations)
    mapping = tmp_path / "m.toml"
    mapping.write_text(MAPPING, encoding="utf-8")
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "civicmesh.cli", "import", "--mapping", str(mapping)]
    command += [str(archive), *map(str, common(killed))]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "import" / "stations.json"
    deadline = time.monotonic() + 60
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    db = killed / "store.db"
    partial = store_rows(db, "SELECT count(*) FROM readings")[0][0]
    assert 0 < partial < expected  # really killed mid-way  # type: ignore[operator]
    json.loads(state.read_text())  # the state file is whole (atomic replace)

    assert run("import", "--mapping", mapping, archive, *common(killed)) == 0
    clean = tmp_path / "clean"
    assert run("import", "--mapping", mapping, archive, *common(clean)) == 0
    # the fixture's 02:00 on 2021-03-28 does not exist in Madrid: skipped, 4 stations
    gap = store_rows(clean / "store.db", "SELECT count(*) FROM readings")[0][0]
    assert 0 < expected - gap <= 12  # type: ignore[operator]
    assert store_rows(db, "SELECT count(*) FROM readings") == [(gap,)]
    dupes = (
        "SELECT count(*) FROM (SELECT 1 FROM readings GROUP BY device_id, ts, metric "
        "HAVING count(*) > 1)"
    )
    assert store_rows(db, dupes) == [(0,)]
    assert store_rows(db, "SELECT count(*) FROM quarantine") == [(0,)]
    content = (
        "SELECT d.zone, d.lat, r.ts, r.metric, r.value FROM readings r "
        "JOIN devices d USING (device_id) ORDER BY 1, 2, 3, 4, 5"
    )
    assert store_rows(db, content) == store_rows(clean / "store.db", content)
    ledger = "SELECT count(DISTINCT device_id), sum(n_readings) FROM batches"
    assert store_rows(db, ledger) == store_rows(clean / "store.db", ledger) == [(4, gap)]


# -------------------------------------------------------------------- retention


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return fresh_schema(request.getfixturevalue("pg_session_database"))


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    if url.startswith("sqlite:///"):
        return store_rows(Path(url.removeprefix("sqlite:///")), sql)
    import psycopg

    with psycopg.connect(url) as conn:
        return [tuple(row) for row in conn.execute(sql.encode()).fetchall()]


def test_retention_keeps_imported_history_unless_asked(tmp_path: Path, store_url: str) -> None:
    archive = tmp_path / "a.csv"
    wide_fixture(archive, days=2, stations=("28079004",))
    mapping = tmp_path / "m.toml"
    mapping.write_text(MAPPING, encoding="utf-8")
    where = ["--registry-file", tmp_path / "registry.json", "--state-dir", tmp_path / "import"]
    assert run("import", "--mapping", mapping, archive, "--database-url", store_url, *where) == 0
    imported = query(store_url, "SELECT count(*) FROM readings")[0][0]
    field = Ed25519Signer.from_seed(b"\x02" * 32)
    store = open_store(store_url)
    try:
        store.upsert_devices(
            [DeviceRecord(field.key_id, field.verify_key().to_text(), "centro", kind="air")]
        )
        old = int(datetime(2021, 1, 1, 12, tzinfo=UTC).timestamp() * 1000)
        older = int(datetime(2020, 6, 1, 12, tzinfo=UTC).timestamp() * 1000)
        first = sealed(field, 1, [Reading(older, "no2", 20.0)])
        second = sealed(field, 2, [Reading(old, "no2", 30.0)], prev_hash=first.payload_hash)
        store.write_batches([first, second])
        store.refresh_rollups()
        policy = load_settings(AnalyticsSettings, None, {"storage": {}}).storage.retention()
        assert policy.raw_days == 90.0 and not policy.include_imported
        store.apply_retention(int(time.time() * 1000), policy)
        kinds = "SELECT d.kind, count(*) FROM {} r JOIN devices d USING (device_id) GROUP BY 1"
        assert dict(query(store_url, kinds.format("readings"))) == {"import": imported}
        assert set(dict(query(store_url, kinds.format("rollup_1h")))) == {"import"}
        # a station imported after retention ran still gets its rollups
        later = tmp_path / "b.csv"
        wide_fixture(later, days=1, stations=("28079008",))
        assert run("import", "--mapping", mapping, later, "--database-url", store_url, *where) == 0
        retiro = "SELECT count(*) FROM rollup_zone_1h WHERE zone = 'retiro'"
        hourly = (
            "SELECT count(*) FROM readings r JOIN devices d USING (device_id) WHERE zone = 'retiro'"
        )
        assert query(store_url, retiro) == query(store_url, hourly) == [(69,)]  # one per hour
        # asked: imported history goes too
        store.apply_retention(
            int(time.time() * 1000), RetentionPolicy(raw_days=90.0, include_imported=True)
        )
        assert query(store_url, "SELECT count(*) FROM readings") == [(0,)]
    finally:
        store.close()


def test_keep_forever_is_expressible_in_toml_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "central.toml"
    config.write_text(
        '[storage]\nraw_retention_days = "forever"\nrollup_1h_retention_days = 0\n',
        encoding="utf-8",
    )
    storage = load_settings(AnalyticsSettings, config).storage
    assert storage.raw_retention_days is None and storage.rollup_1h_retention_days is None
    monkeypatch.setenv("CIVICMESH_STORAGE__ROLLUP_1M_RETENTION_DAYS", "forever")
    monkeypatch.setenv("CIVICMESH_STORAGE__RAW_RETENTION_DAYS", "365")
    storage = load_settings(AnalyticsSettings, None).storage
    assert storage.rollup_1m_retention_days is None and storage.raw_retention_days == 365.0
    monkeypatch.setenv("CIVICMESH_STORAGE__RAW_RETENTION_DAYS", "a while")
    with pytest.raises(Exception, match="not a number of days"):
        load_settings(AnalyticsSettings, None)
