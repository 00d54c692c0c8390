"""Alerts (issue 25): rules on the real store, signed webhooks to a real local receiver.

Scenarios, written from the issue before the engine was tuned to them:
- a PM episode keeps a zone at "Unhealthy for Sensitive Groups" past the rule's minimum
  duration: exactly one alert, none before the duration, no duplicate on re-evaluation
  or after a restart, one resolve when the air clears;
- a receiver that answers 500 and then 200 gets the same signed delivery twice;
- a device that stops reporting raises an offline alert, resolves when it is back, and a
  relapse inside the cooldown opens nothing;
- fault-flagged readings and quarantine bursts raise their alerts;
- a failing contact point is counted and given up on, never raised;
- bad configuration names its key; ``GET /api/v1/alerts`` needs an operator and shows
  the evidence; the store upkeep thread runs the rules.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from support import free_port

from analytics.alerts.config import AlertSettings
from analytics.alerts.delivery import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
    verify,
)
from analytics.alerts.engine import AlertEngine, build_engine
from analytics.api import create_app
from analytics.apiauth import ApiSecurity, RateLimiter, TokenFile
from analytics.settings import AnalyticsSettings, StorageSettings
from analytics.store import open_store
from analytics.store.base import Store
from analytics.upkeep import StoreUpkeep
from civicmesh.config import load_settings
from civicmesh.errors import ConfigError
from civicmesh.metrics import Quality
from civicmesh.protocol import Reading
from civicmesh.quarantine import QuarantineRecord
from tests.test_store import DEVICE_A, DEVICE_B, DEVICE_C, T0, device, sealed

MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
T = T0 - T0 % HOUR + 12 * HOUR  # an hour boundary: "now" of the scenarios
SECRET = b"alerts-test-secret-0123456789abcdef"
USG = "Unhealthy for Sensitive Groups"


# --------------------------------------------------------------------------- receiver


class Receiver:
    """A webhook receiver on 127.0.0.1 that checks every signature, as docs/alerts.md
    tells a receiver to; answers with ``statuses`` in turn, then 200."""

    def __init__(
        self, key: bytes, statuses: tuple[int, ...] = (), *, hold_first: bool = False
    ) -> None:
        self.key = key
        self.statuses = list(statuses)
        self.hold = threading.Event() if hold_first else None  # set: answer the held one
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                valid = verify(
                    receiver.key,
                    body,
                    self.headers.get(TIMESTAMP_HEADER, ""),
                    self.headers.get(SIGNATURE_HEADER, ""),
                )
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    first = not receiver.requests
                    receiver.requests.append(
                        {
                            "valid": valid,
                            "body": body,
                            "json": json.loads(body),
                            "delivery": self.headers.get(DELIVERY_HEADER),
                            "event": self.headers.get(EVENT_HEADER),
                            "status": status,
                            "path": self.path,
                        }
                    )
                if first and receiver.hold is not None:
                    receiver.hold.wait(30)  # the sender is killed while it waits here
                    return
                self.send_response(status if valid else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def got(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def poll(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the deadline")
        time.sleep(0.02)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The embedded store and plain PostgreSQL: the rules read only the Store interface."""
    if request.param == "postgresql":
        opened = open_store(request.getfixturevalue("pg_database"), timescaledb="off")
    else:
        opened = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    opened.migrate()
    opened.upsert_devices(
        [device(DEVICE_A, "harbour"), device(DEVICE_B, "harbour"), device(DEVICE_C, "old-town")]
    )
    yield opened
    opened.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(SECRET)
    yield r
    r.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook.secret"
    path.write_bytes(SECRET + b"\n")
    return path


def settings(tmp_path: Path, url: str, secret_file: Path, *rules: dict[str, Any],
             **point: Any) -> AlertSettings:  # fmt: skip
    return AlertSettings.model_validate(
        {
            "state_file": str(tmp_path / "alerts.db"),
            "public_url": "https://air.example.org",
            "rules": list(rules),
            "contact_points": [
                {
                    "name": "city-ops",
                    "url": url,
                    "secret_file": str(secret_file),
                    "retry_initial_s": 0.05,
                    "retry_max_s": 0.2,
                    **point,
                }
            ],
        }
    )


class Writer:
    """Writes one device's readings in sealed batches, as ingest does, and refreshes the
    rollups (what the service's upkeep does between evaluations)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.seq: dict[str, int] = {}

    def write(self, signer: Any, start: int, end: int, metric: str, value: float,
              quality: int = 0, every: int = MIN) -> None:  # fmt: skip
        rows = [Reading(t, metric, value, quality) for t in range(start, end, every)]
        for i in range(0, len(rows), 500):
            seq = self.seq.get(signer.key_id, 0) + 1
            self.seq[signer.key_id] = seq
            self.store.write_batches([sealed(signer, seq, rows[i : i + 500])])
        self.store.refresh_rollups()


def engine_of(config: AlertSettings) -> AlertEngine:
    engine = build_engine(config)
    assert engine is not None
    engine.start()
    return engine


def settled(engine: AlertEngine) -> bool:
    counts = engine.log.delivery_counts()
    return counts.pending == 0


AQI_RULE = {
    "id": "pm-usg-2h",
    "kind": "aqi_category",
    "level": USG,
    "for_minutes": 120,
    "severity": "warning",
}


# ----------------------------------------------------------------------------- tests


def test_aqi_episode_fires_once_after_duration_and_resolves_once(
    store: Store, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    config = settings(tmp_path, receiver.url, secret_file, AQI_RULE)
    w = Writer(store)
    w.write(DEVICE_A, T - 6 * HOUR, T - 3 * HOUR, "pm25", 5.0)  # clean air
    engine = engine_of(config)
    try:
        assert engine.evaluate(store, T - 3 * HOUR).opened == ()
        # the episode: 80 µg/m³ from T-3h; 90 minutes in, the rule waits
        w.write(DEVICE_A, T - 3 * HOUR, T - 90 * MIN, "pm25", 80.0)
        assert engine.evaluate(store, T - 90 * MIN).opened == ()
        # 130 minutes in: past the 2 hours
        w.write(DEVICE_A, T - 90 * MIN, T - 50 * MIN, "pm25", 80.0)
        first = engine.evaluate(store, T - 50 * MIN)
        assert first.opened == ("pm-usg-2h/zone:harbour",)
        # the same condition again: no duplicate
        w.write(DEVICE_A, T - 50 * MIN, T - 40 * MIN, "pm25", 80.0)
        assert engine.evaluate(store, T - 45 * MIN).opened == ()
        assert engine.evaluate(store, T - 40 * MIN).opened == ()
        poll(lambda: len(receiver.got()) >= 1 and settled(engine))
    finally:
        engine.close()
    # a restart on the same state file neither loses nor repeats the alert
    engine = engine_of(config)
    try:
        assert [a.subject for a in engine.log.open_alerts()] == ["zone:harbour"]
        assert engine.evaluate(store, T - 40 * MIN).opened == ()
        # the air clears; the NowCast falls below the level
        w.write(DEVICE_A, T - 40 * MIN, T + 3 * HOUR, "pm25", 2.0)
        cleared = engine.evaluate(store, T + 3 * HOUR)
        assert cleared.resolved == ("pm-usg-2h/zone:harbour",)
        assert engine.evaluate(store, T + 3 * HOUR + MIN).resolved == ()
        poll(lambda: len(receiver.got()) >= 2 and settled(engine))
    finally:
        engine.close()
    got = receiver.got()
    assert [(r["event"], r["valid"]) for r in got] == [("firing", True), ("resolved", True)]
    firing = got[0]["json"]
    assert firing["event"] == "firing"
    alert = firing["alert"]
    assert (alert["rule_id"], alert["subject"], alert["severity"]) == (
        "pm-usg-2h",
        "zone:harbour",
        "warning",
    )
    # at or above the level: the NowCast climbs past USG into Unhealthy as the episode goes on
    assert alert["evidence"]["category"] in (USG, "Unhealthy")
    assert alert["evidence"]["minutes_at_or_above"] == 130.0
    assert alert["since"].startswith("2023-11-15T") and alert["time_range"]["start"]
    assert alert["link"] == "https://air.example.org/dashboard/#/zone/harbour"
    hours = alert["evidence"]["hourly_aqi"]
    assert len(hours) == 3 and hours[0]["category"] == USG
    assert hours[0]["hour"] == "2023-11-15T07:00:00+00:00"
    assert all(h["category"] in (USG, "Unhealthy") for h in hours)
    resolved = got[1]["json"]["alert"]
    assert resolved["state"] == "resolved" and resolved["id"] == alert["id"]
    assert resolved["evidence"]["at_resolve"]["category"] in ("Good", "Moderate")


def test_signature_covers_timestamp_and_exact_body() -> None:
    body = b'{"event":"firing"}'
    now = 1_700_000_000
    good = sign(SECRET, now, body)
    # the recipe of docs/alerts.md, computed here independently of the sender's code
    expected = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert good == "sha256=" + expected
    assert verify(SECRET, body, str(now), good, now_s=now + 10)
    assert not verify(SECRET, body + b" ", str(now), good, now_s=now)  # body changed
    assert not verify(SECRET, body, str(now + 1), good, now_s=now)  # timestamp changed
    assert not verify(b"another-secret-0123456789", body, str(now), good, now_s=now)
    assert not verify(SECRET, body, str(now), good, now_s=now + 301)  # a replay, later
    assert not verify(SECRET, body, "soon", good, now_s=now)


def test_receiver_500_then_200_gets_the_same_delivery_retried(
    store: Store, secret_file: Path, tmp_path: Path
) -> None:
    flaky = Receiver(SECRET, statuses=(500,))
    rule = {"id": "offline", "kind": "device_offline", "after_minutes": 15}
    w = Writer(store)
    w.write(DEVICE_A, T - HOUR, T - 30 * MIN, "pm25", 5.0)
    engine = engine_of(settings(tmp_path, flaky.url, secret_file, rule))
    try:
        assert engine.evaluate(store, T).opened == (f"offline/device:{DEVICE_A.key_id}",)
        poll(lambda: len(flaky.got()) >= 2 and settled(engine))
        got = flaky.got()
        assert [r["status"] for r in got] == [500, 200]
        assert all(r["valid"] for r in got)
        assert got[0]["delivery"] == got[1]["delivery"]
        assert got[0]["body"] == got[1]["body"]  # the exact bytes, fixed when recorded
        (alert,) = engine.log.open_alerts()
        (delivery,) = engine.log.deliveries_of(alert.id)
        assert delivery["attempts"] == 2 and delivery["delivered_ms"] is not None
        assert engine.stats()["delivery.failed_attempts.city-ops"] == 1
    finally:
        engine.close()
        flaky.close()


def test_device_that_stops_is_offline_then_back_and_cooldown_holds(
    store: Store, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    rule = {"id": "offline", "kind": "device_offline", "after_minutes": 15, "cooldown_s": 3600}
    w = Writer(store)
    for signer in (DEVICE_A, DEVICE_B):
        w.write(signer, T - HOUR, T, "pm25", 5.0)
    engine = engine_of(settings(tmp_path, receiver.url, secret_file, rule))
    try:
        assert engine.evaluate(store, T).opened == ()
        w.write(DEVICE_B, T, T + 20 * MIN, "pm25", 5.0)  # A stops, B goes on
        assert engine.evaluate(store, T + 20 * MIN).opened == (f"offline/device:{DEVICE_A.key_id}",)
        assert engine.evaluate(store, T + 21 * MIN).opened == ()
        (alert,) = engine.log.open_alerts()
        assert alert.evidence["minutes_silent"] == 22.0  # newest reading at T - 1 min
        w.write(DEVICE_A, T + 21 * MIN, T + 25 * MIN, "pm25", 5.0)  # back
        assert engine.evaluate(store, T + 25 * MIN).resolved == (
            f"offline/device:{DEVICE_A.key_id}",
        )
        # silent again within the cooldown: no new alert (B goes on reporting)
        w.write(DEVICE_B, T + 20 * MIN, T + 90 * MIN, "pm25", 5.0)
        relapse = engine.evaluate(store, T + 50 * MIN)
        assert relapse.opened == () and relapse.suppressed == (f"offline/device:{DEVICE_A.key_id}",)
        # after the cooldown it opens again
        later = engine.evaluate(store, T + 25 * MIN + 3600_000)
        assert later.opened == (f"offline/device:{DEVICE_A.key_id}",)
        poll(lambda: len(receiver.got()) >= 3 and settled(engine))
        assert [r["event"] for r in receiver.got()] == ["firing", "resolved", "firing"]
    finally:
        engine.close()


def test_an_importer_identity_is_never_offline(
    store: Store, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    """Found by a new user: every imported station (`civicmesh import`, registry kind
    'import') opened a device-offline alert that never cleared."""
    store.upsert_devices([device(DEVICE_C, "old-town", kind="import")])
    rule = {"id": "offline", "kind": "device_offline", "after_minutes": 15}
    w = Writer(store)
    w.write(DEVICE_A, T - HOUR, T - 30 * MIN, "pm25", 5.0)  # a field device, silent 30 min
    w.write(DEVICE_C, T - 30 * DAY, T - 29 * DAY, "pm25", 5.0, every=HOUR)  # an archive
    engine = engine_of(settings(tmp_path, receiver.url, secret_file, rule))
    try:
        assert engine.evaluate(store, T).opened == (f"offline/device:{DEVICE_A.key_id}",)
    finally:
        engine.close()


def test_fault_flags_and_quarantine_bursts(
    store: Store, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    rules = (
        {"id": "faults", "kind": "fault_flags", "window_minutes": 60, "min_readings": 10,
         "severity": "critical"},
        {"id": "quarantine", "kind": "quarantine_burst", "window_minutes": 15, "min_records": 3},
    )  # fmt: skip
    w = Writer(store)
    w.write(DEVICE_A, T - 30 * MIN, T, "pm25", 5.0)
    w.write(DEVICE_C, T - 30 * MIN, T - 18 * MIN, "no2", 40.0, quality=int(Quality.STUCK))
    store.add_quarantine(
        [
            QuarantineRecord.of(
                reason="schema.invalid", detail="bad schema", source="gw:test",
                topic="civicmesh/v1/gw/x/up", received_at_ms=T - k * MIN, payload=b"x" * k,
                device_id=DEVICE_B.key_id, seq=k,
            )
            for k in range(1, 5)
        ]
    )  # fmt: skip
    engine = engine_of(settings(tmp_path, receiver.url, secret_file, *rules))
    try:
        result = engine.evaluate(store, T)
        assert sorted(result.opened) == [
            f"faults/device:{DEVICE_C.key_id}",
            f"quarantine/device:{DEVICE_B.key_id}",
        ]
        by_rule = {a.rule_id: a for a in engine.log.open_alerts()}
        assert by_rule["faults"].evidence["count"] == 12
        assert by_rule["faults"].severity == "critical"
        assert by_rule["quarantine"].evidence["count"] == 4
        # an hour on, the flags and the burst have left their windows
        assert sorted(engine.evaluate(store, T + HOUR).resolved) == sorted(result.opened)
        poll(lambda: len(receiver.got()) >= 4 and settled(engine))
        assert all(r["valid"] for r in receiver.got())
    finally:
        engine.close()


def test_failing_contact_point_is_counted_and_given_up(
    store: Store, secret_file: Path, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    rule = {"id": "offline", "kind": "device_offline", "after_minutes": 15}
    Writer(store).write(DEVICE_A, T - HOUR, T - 30 * MIN, "pm25", 5.0)
    engine = engine_of(settings(tmp_path, dead, secret_file, rule, max_attempts=3))
    try:
        started = time.monotonic()
        assert engine.evaluate(store, T).opened == (f"offline/device:{DEVICE_A.key_id}",)
        assert time.monotonic() - started < 5  # the evaluator never waits for delivery
        poll(lambda: engine.log.delivery_counts().gave_up == 1)
        stats = engine.stats()
        assert stats["delivery.failed_attempts.city-ops"] == 3
        assert stats["delivery.gave_up"] == 1
        assert engine.deliverer.is_alive()
        # the alert itself stays recorded and open
        assert len(engine.log.open_alerts()) == 1
    finally:
        engine.close()


def test_who_exceedance_hours_and_completeness(
    store: Store, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    rules = (
        {"id": "who-no2", "kind": "who_exceedance", "metric": "no2", "period_hours": 24,
         "min_hours": 4},
        {"id": "gaps", "kind": "completeness", "below": 0.8, "window_hours": 6},
    )  # fmt: skip
    w = Writer(store)
    w.write(DEVICE_A, T - 6 * HOUR, T, "no2", 10.0)  # below the 25 µg/m³ guideline
    w.write(DEVICE_C, T - 6 * HOUR, T - 5 * HOUR, "no2", 60.0)  # old-town: 5 hours above,
    w.write(DEVICE_C, T - 5 * HOUR, T, "no2", 60.0, every=4 * MIN)  # sending 1 in 4
    engine = engine_of(settings(tmp_path, receiver.url, secret_file, *rules))
    try:
        result = engine.evaluate(store, T)
        assert sorted(result.opened) == ["gaps/device:" + DEVICE_C.key_id, "who-no2/zone:old-town"]
        by_rule = {a.rule_id: a for a in engine.log.open_alerts()}
        assert by_rule["who-no2"].evidence["hours_above"] == 6
        assert by_rule["who-no2"].evidence["guideline"] == 25.0
        ratio = by_rule["gaps"].evidence["ratio"]
        assert ratio == pytest.approx((60 + 5 * 15) / 360, abs=1e-3)
        poll(lambda: len(receiver.got()) >= 2 and settled(engine))
    finally:
        engine.close()


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "central.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[alerts.rules]]\nid = "x"\nkind = "aqi_category"\nlevel = "Bad"\n', "alerts.rules.0"),
        ('[[alerts.rules]]\nid = "x"\nkind = "device_offline"\nafter_minute = 5\n',
         "unknown key 'alerts.rules.0.device_offline.after_minute'"),
        ('[[alerts.rules]]\nid = "x"\nkind = "nope"\n', "alerts.rules.0"),
        ('[[alerts.rules]]\nid = "x"\nkind = "device_offline"\ncontact_points = ["ops"]\n',
         "unknown contact points ops"),
        ('[alerts]\ninterval_s = 0\n', "alerts.interval_s"),
        ('[[alerts.contact_points]]\nname = "ops"\nurl = "ftp://x/y"\nsecret = "s"\n',
         "alerts.contact_points.0.url"),
        ('[[alerts.rules]]\nid = "x"\nkind = "who_exceedance"\nmetric = "pm25"\n'
         'min_hours = 30\n', "min_hours (30) cannot exceed period_hours (24)"),
    ],
)  # fmt: skip
def test_bad_config_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(AnalyticsSettings, write_config(tmp_path, toml))
    assert message in str(info.value)


def test_unreadable_or_short_secret_is_a_config_error(tmp_path: Path) -> None:
    base = {"state_file": str(tmp_path / "a.db"), "rules": [{"id": "x", "kind": "device_offline"}]}
    missing = {"name": "ops", "url": "http://127.0.0.1:9/h", "secret_file": str(tmp_path / "no")}
    with pytest.raises(ConfigError, match="'ops': cannot read secret_file"):
        build_engine(AlertSettings.model_validate({**base, "contact_points": [missing]}))
    short = {"name": "ops", "url": "http://127.0.0.1:9/h", "secret": "short"}
    with pytest.raises(ConfigError, match="shorter than 16 bytes"):
        build_engine(AlertSettings.model_validate({**base, "contact_points": [short]}))
    assert (
        build_engine(AlertSettings.model_validate({"state_file": str(tmp_path / "b.db")})) is None
    )


def test_alerts_api_needs_an_operator_and_shows_the_evidence(
    store: Store, secret_file: Path, tmp_path: Path
) -> None:
    rule = {"id": "offline", "kind": "device_offline", "after_minutes": 15}
    Writer(store).write(DEVICE_A, T - HOUR, T - 30 * MIN, "pm25", 5.0)
    config = settings(tmp_path, f"http://127.0.0.1:{free_port()}/h", secret_file, rule)
    engine = build_engine(config)
    assert engine is not None
    try:
        engine.evaluate(store, T)  # the deliverer is not started: the event stays queued
    finally:
        engine.close()
    tokens = TokenFile(tmp_path / "tokens.json")
    viewer, operator = tokens.add("v", "viewer"), tokens.add("o", "operator")
    app = create_app(
        store,
        security=ApiSecurity(tokens, RateLimiter(1000, 1000), RateLimiter(1000, 1000)),
        alerts_state_file=config.state_file,
        alerts_public_url=config.public_url,
    )
    with TestClient(app) as client:
        assert client.get("/api/v1/alerts").status_code == 401
        denied = client.get("/api/v1/alerts", headers={"authorization": f"Bearer {viewer}"})
        assert denied.status_code == 403
        response = client.get(
            "/api/v1/alerts?deliveries=true", headers={"authorization": f"Bearer {operator}"}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["configured"] is True
        (alert,) = body["open"]
        assert alert["subject"] == f"device:{DEVICE_A.key_id}"
        assert alert["evidence"]["minutes_silent"] == 31.0
        assert alert["evidence"]["last_reading"].startswith("2023-11-15T")
        assert alert["deliveries"] == [
            {"event": "firing", "contact_point": "city-ops", "attempts": 0,
             "delivered_ms": None, "gave_up_ms": None, "last_error": None}
        ]  # fmt: skip
        assert body["deliveries"] == {"pending": 1, "delivered": 0, "gave_up": 0}
        bad = client.get("/api/v1/alerts?limit=0", headers={"authorization": f"Bearer {operator}"})
        assert bad.status_code == 422
    unconfigured = TestClient(create_app(store))
    with unconfigured as client:
        assert client.get("/api/v1/alerts").json()["configured"] is False


def test_store_upkeep_runs_the_rules_and_delivers(
    store: Store, receiver: Receiver, secret_file: Path, tmp_path: Path
) -> None:
    """The wiring production and the demo use: the upkeep thread evaluates on the real
    clock (the readings are from 2023: the device is long offline)."""
    rule = {"id": "offline", "kind": "device_offline", "after_minutes": 15}
    Writer(store).write(DEVICE_A, T - HOUR, T, "pm25", 5.0)
    engine = build_engine(settings(tmp_path, receiver.url, secret_file, rule))
    upkeep = StoreUpkeep(store, StorageSettings(rollup_refresh_s=0.05), engine, 0.05)
    upkeep.start()
    try:
        poll(lambda: len(receiver.got()) >= 1)
        assert engine is not None
        poll(lambda: engine.stats().get("evaluations", 0) >= 3)
    finally:
        upkeep.stop()
    got = receiver.got()
    assert [(r["event"], r["valid"], r["path"]) for r in got] == [("firing", True, "/hook")]


SENDER = """
import sys, time
from analytics.alerts.config import AlertSettings
from analytics.alerts.engine import build_engine
engine = build_engine(AlertSettings.model_validate_json(sys.argv[1]))
engine.start()
print("started", flush=True)
time.sleep(60)
"""


def test_kill_9_mid_delivery_redelivers_and_records_once(secret_file: Path, tmp_path: Path) -> None:
    """A sender killed while its receiver holds the request: after a restart the same
    delivery (same id, same bytes) is sent again once its lease ran out, and the alert
    and its delivery stay recorded once (at least once delivered, exactly once recorded)."""
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    store.upsert_devices([device(DEVICE_A, "harbour")])
    held = Receiver(SECRET, hold_first=True)
    rule = {"id": "offline", "kind": "device_offline", "after_minutes": 15}
    config = settings(tmp_path, held.url, secret_file, rule, timeout_s=0.5)
    try:
        Writer(store).write(DEVICE_A, T - HOUR, T - 30 * MIN, "pm25", 5.0)
        recorder = build_engine(config)
        assert recorder is not None
        assert len(recorder.evaluate(store, T).opened) == 1  # recorded, not yet sent
        recorder.close()
        sender = subprocess.Popen(
            [sys.executable, "-c", SENDER, config.model_dump_json()],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        try:
            poll(lambda: len(held.got()) == 1)  # mid-delivery: the receiver holds it
        finally:
            sender.kill()  # SIGKILL: no clean-up of any kind
            sender.wait(timeout=10)
            assert sender.stdout is not None
            sender.stdout.close()
        restarted = engine_of(config)
        try:
            poll(lambda: len(held.got()) == 2 and settled(restarted))
            assert restarted.evaluate(store, T + MIN).opened == ()  # not opened again
            (alert,) = restarted.log.alerts()
            (delivery,) = restarted.log.deliveries_of(alert.id)
            assert delivery["delivered_ms"] is not None
        finally:
            restarted.close()
        first, second = held.got()
        assert first["delivery"] == second["delivery"] and first["body"] == second["body"]
        assert first["valid"] and second["valid"]
    finally:
        held.close()
        store.close()


def test_receiver_that_answers_garbage_is_a_failed_attempt(
    store: Store, secret_file: Path, tmp_path: Path
) -> None:
    """Not HTTP at all: counted and retried like a 500, the sender thread lives on."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)
    answered = []

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"garbage\r\n\r\n")
                answered.append(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    rule = {"id": "offline", "kind": "device_offline", "after_minutes": 15}
    Writer(store).write(DEVICE_A, T - HOUR, T - 30 * MIN, "pm25", 5.0)
    engine = engine_of(settings(tmp_path, url, secret_file, rule, max_attempts=2))
    try:
        engine.evaluate(store, T)
        poll(lambda: engine.log.delivery_counts().gave_up == 1)
        assert len(answered) == 2
        assert engine.stats()["delivery.failed_attempts.city-ops"] == 2
        assert engine.deliverer.is_alive()
        (alert,) = engine.log.open_alerts()
        (delivery,) = engine.log.deliveries_of(alert.id)
        assert "BadStatusLine" in delivery["last_error"] or "Remote" in delivery["last_error"]
    finally:
        engine.close()
        thread.join(timeout=10)
        listener.close()
