"""The adversarial suite (issue 16): >= 10,000 generated hostile messages over every topic
the gateway and the central ingest listen on, against real processes.

A private Mosquitto, a gateway process (``civicmesh gateway run``) and an ingest process
(``civicmesh ingest run``) on a SQLite store. A seeded generator (``CIVICMESH_ADVERSARIAL_SEED``)
sends garbage, truncated and bit-flipped batches and envelopes, wrong CBOR types,
bignums, NaN, huge values and strings, bad times, replays, unknown and revoked keys,
forged countersignatures, wrong topics, equivocation (two batches with one seq), forged
and poisoned quarantine records and bad health reports, while a good device keeps
sending. Asserted: both processes stay up; every good batch lands, and lands *during*
the attack (checked after each slice); every bad QoS 1 message leaves a quarantine
record with a reason (matched by the SHA-256 of its bytes, or by device and seq for a
reading-level reject); nothing bad frames the good device; no bad health report is
stored (QoS 0 reports are dropped, counted by the processes). The figures are printed.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cbor2
import pytest

from analytics.store import open_store
from analytics.store.base import Store
from civicmesh import topics
from civicmesh.identity import Ed25519Signer
from civicmesh.mqtt import MqttLink
from civicmesh.protocol import (
    GENESIS_HASH,
    Reading,
    _cose_sign1,
    make_payload,
    seal_batch,
    wrap_envelope,
)
from civicmesh.quarantine import QuarantineRecord
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry
from civicmesh.timeutil import now_ms

pytestmark = [pytest.mark.adversarial, pytest.mark.integration, pytest.mark.slow]

MESSAGES = int(os.environ.get("CIVICMESH_ADVERSARIAL_MESSAGES", "10000"))
SEED = int(os.environ.get("CIVICMESH_ADVERSARIAL_SEED", "16"))
SLICE = 1000  # the good device must have landed everything after each slice
GOOD_EVERY = 50  # one good batch per this many hostile messages
MIN = 60_000


def key(tag: str) -> Ed25519Signer:
    return Ed25519Signer.from_seed(hashlib.sha256(f"adversarial/{tag}".encode()).digest())


@dataclass
class Expect:
    """What a hostile message must leave behind."""

    cls: str
    sha: str | None = None  # a quarantine record of exactly these bytes
    device_seq: tuple[str, int] | None = None  # or a record naming this device and seq


@dataclass
class Attack:
    """The keys, chains and bookkeeping of one run."""

    rng: random.Random
    gateway: Ed25519Signer = field(default_factory=lambda: key("gateway"))
    good: Ed25519Signer = field(default_factory=lambda: key("good"))
    mallory: Ed25519Signer = field(
        default_factory=lambda: key("mallory")
    )  # valid chain, bad readings
    broken: Ed25519Signer = field(default_factory=lambda: key("broken"))  # undecodable payloads
    revoked: Ed25519Signer = field(default_factory=lambda: key("revoked"))
    stranger: Ed25519Signer = field(default_factory=lambda: key("stranger"))
    rogue_gateway: Ed25519Signer = field(default_factory=lambda: key("rogue-gateway"))
    t0: int = field(default_factory=lambda: (now_ms() // MIN) * MIN - 600 * MIN)
    heads: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    good_messages: list[bytes] = field(default_factory=list)
    sent: Counter[str] = field(default_factory=Counter)
    expects: list[Expect] = field(default_factory=list)

    # ------------------------------------------------------------ sealing

    def next_batch(self, device: Ed25519Signer, rows: list[Reading] | None = None) -> Any:
        seq, prev = self.heads.get(device.key_id, (0, GENESIS_HASH))
        seq += 1
        ts = self.t0 + seq * MIN
        readings = rows if rows is not None else [Reading(ts, "pm25", 10.0 + seq % 7, 0)]
        batch = seal_batch(device, make_payload(device.key_id, seq, prev, ts + 100, readings, "m1"))
        self.heads[device.key_id] = (seq, batch.hash)
        return batch

    def raw(self, device: Ed25519Signer, body: dict[int, Any]) -> bytes:
        base: dict[int, Any] = {
            1: 1, 2: device.key_id, 3: 1, 4: GENESIS_HASH, 5: self.t0, 6: self.t0,
            7: [[0, 1, 1.0, 0]], 8: "",
        }  # fmt: skip
        message, _ = _cose_sign1(device, cbor2.dumps({**base, **body}, canonical=True))
        return message

    def envelope(self, device_message: bytes, gateway: Ed25519Signer | None = None) -> bytes:
        return wrap_envelope(gateway or self.gateway, device_message, now_ms()).message

    def record(self, **changes: Any) -> QuarantineRecord:
        base = QuarantineRecord.of(
            reason="chain.gap",
            detail="forged",
            source=f"gw:{self.gateway.key_id}",
            topic=topics.device_up(self.good.key_id),
            received_at_ms=now_ms(),
            payload=self.rng.randbytes(16),
            device_id=self.good.key_id,
            seq=1,
        )
        return replace(base, **changes)


def _inner(envelope: bytes) -> bytes:
    from civicmesh.protocol import open_envelope

    return open_envelope(envelope, lambda _gateway_id: key("gateway").verify_key()).device_message


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


Message = tuple[str, bytes, str, int]  # topic, payload, class, qos


def hostile(attack: Attack) -> Callable[[], Message]:
    """A generator of one hostile message at a time, drawn from every class."""
    a, rng = attack, attack.rng
    dev_up = topics.device_up
    gw_topic = topics.gateway_up(a.gateway.key_id)
    q_topic = topics.quarantine("gw", a.gateway.key_id)

    def some_good() -> bytes:
        return rng.choice(a.good_messages)

    def mallory_batch(bad: str) -> tuple[bytes, int]:
        seq = a.heads.get(a.mallory.key_id, (0, b""))[0] + 1
        ts = a.t0 + seq * MIN
        value = {"nan": math.nan, "inf": math.inf, "huge": 1e300}.get(bad, 5.0)
        if bad == "future":
            ts = now_ms() + 30 * 24 * 3600 * 1000
        if bad == "before_registration":
            ts = a.t0 - 400 * 24 * 3600 * 1000
        batch = a.next_batch(a.mallory, [Reading(ts, "pm25", value, 0)])
        return batch.message, batch.seq

    def msg_garbage() -> Message:
        return dev_up(a.good.key_id), rng.randbytes(rng.randint(0, 2048)), "garbage", 1

    def msg_truncated() -> Message:
        good = some_good()
        return dev_up(a.good.key_id), good[: rng.randrange(1, len(good))], "truncated", 1

    def msg_bitflip() -> Message:
        return dev_up(a.good.key_id), _mutate(rng, some_good()), "bit-flipped", 1

    def msg_wrong_type() -> Message:
        thing = rng.choice([[1, 2, 3], {"a": 1}, 42, "text", None, True, 1.5, b"\x00" * 8])
        return dev_up(a.broken.key_id), cbor2.dumps(thing), "wrong-type", 1

    def msg_bad_fields() -> Message:
        body = rng.choice(
            [
                {7: [[0, 1, 2**1100, 0]]},  # bignum value
                {7: [[0, 1, -(2**70), 0]]},
                {3: 2**70},  # bignum seq
                {1: True},  # protocol version True
                {1: 1.0},
                {8: "x" * rng.randint(65, 20_000)},  # huge model version
                {2: "not-an-id" * 50},
                {5: 10**15},  # sealed at year 33658
                {6: -5},
                {7: [[0, 999, 1.0, 0]]},  # unknown metric
                {7: [["zero", 1, 1.0, 0]]},
                {7: [[0, 1, "NaN", 0]]},
                {7: "readings"},
                {4: b"\x00" * 5},
            ]
        )
        return dev_up(a.broken.key_id), a.raw(a.broken, body), "bad-fields", 1

    def msg_huge() -> Message:
        return dev_up(a.good.key_id), rng.randbytes(600 * 1024), "huge", 1

    def msg_replay() -> Message:
        return dev_up(a.good.key_id), some_good(), "replay", 1

    def msg_unknown_key() -> Message:
        batch = seal_batch(
            a.stranger, make_payload(a.stranger.key_id, 1, GENESIS_HASH, a.t0, [], "m1")
        )
        return dev_up(a.stranger.key_id), batch.message, "unknown-key", 1

    def msg_revoked() -> Message:
        batch = a.next_batch(a.revoked)
        return dev_up(a.revoked.key_id), batch.message, "revoked-key", 1

    def msg_wrong_topic() -> Message:
        return dev_up(a.mallory.key_id), some_good(), "wrong-topic", 1

    def msg_equivocation() -> Message:
        seq = a.heads[a.mallory.key_id][0]
        other = make_payload(
            a.mallory.key_id, seq, a.heads.get("mallory-prev", (0, GENESIS_HASH))[1],
            a.t0 + seq * MIN + 7, [Reading(a.t0 + seq * MIN, "pm25", 99.0, 0)], "m1",
        )  # fmt: skip
        return dev_up(a.mallory.key_id), seal_batch(a.mallory, other).message, "equivocation", 1

    def msg_bad_readings() -> Message:
        kind = rng.choice(["nan", "inf", "huge", "future", "before_registration"])
        a.heads["mallory-prev"] = a.heads[a.mallory.key_id]  # what the new head links to
        message, _ = mallory_batch(kind)
        return dev_up(a.mallory.key_id), message, f"readings-{kind}", 1

    def msg_forged_envelope() -> Message:
        gw = rng.choice([a.rogue_gateway, a.stranger])
        topic = rng.choice([gw_topic, topics.gateway_up(gw.key_id)])
        return topic, a.envelope(some_good(), gw), "forged-countersignature", 1

    def msg_envelope_garbage() -> Message:
        choice = rng.randrange(3)
        if choice == 0:
            return gw_topic, rng.randbytes(rng.randint(0, 4096)), "envelope-garbage", 1
        env = a.envelope(some_good())
        if choice == 1:
            return gw_topic, env[: rng.randrange(1, len(env))], "envelope-truncated", 1
        return gw_topic, _mutate(rng, env), "envelope-bit-flipped", 1

    def msg_envelope_replay() -> Message:
        return gw_topic, a.envelope(some_good()), "envelope-replay", 1

    def msg_quarantine() -> Message:
        choice = rng.randrange(7)
        if choice == 0:  # forged: another key signs our gateway's name on a good device
            return q_topic, a.record().to_wire(a.rogue_gateway), "quarantine-forged", 1
        if choice == 1:
            return q_topic, a.record().to_json(), "quarantine-unsigned", 1
        if choice == 2:
            big = a.record(payload_size=2**31 + rng.randrange(2**20))
            return q_topic, big.to_wire(a.gateway), "quarantine-bignum", 1
        if choice == 3:
            text = a.record(detail="\udc80 lone surrogate", received_at_ms=10**15)
            return q_topic, text.to_wire(a.gateway), "quarantine-bad-values", 1
        if choice == 4:
            detail = a.record(detail="d" * 2_000_000)
            return q_topic, detail.to_wire(a.gateway), "quarantine-huge", 1
        if choice == 5:
            return q_topic, rng.randbytes(rng.randint(0, 512)), "quarantine-garbage", 1
        return (
            topics.quarantine("gw", a.rogue_gateway.key_id),
            a.record(source=f"gw:{a.rogue_gateway.key_id}").to_wire(a.rogue_gateway),
            "quarantine-unknown-gateway",
            1,
        )

    def msg_health() -> Message:
        if rng.random() < 0.5:
            topic = topics.device_health(rng.choice([a.good, a.mallory, a.stranger]).key_id)
            body = {"device_id": a.good.key_id, "time_ms": rng.choice([10**15, -1, 2**70, "x"])}
            body["outbox"] = rng.choice([{"sealed_batches": 2**40}, "none", None])
        else:
            topic = topics.gateway_health(a.gateway.key_id)
            body = {
                "device_id": a.good.key_id, "gateway_id": a.gateway.key_id,
                "received_at_ms": rng.choice([10**15, 0, math.nan]), "reported_ms": 10**15,
                "outbox_batches": 2**40, "outbox_readings": -1,
                "model_version": "\x00" * 10, "agent_version": "a" * 500,
            }  # fmt: skip
        import json

        payload = rng.choice([json.dumps(body).encode(), rng.randbytes(64), b"[" * 3000])
        return topic, payload, "health", 0

    makers: list[tuple[Callable[[], Message], int]] = [
        (msg_garbage, 8), (msg_truncated, 8), (msg_bitflip, 10), (msg_wrong_type, 5),
        (msg_bad_fields, 10), (msg_huge, 1), (msg_replay, 6), (msg_unknown_key, 4),
        (msg_revoked, 4), (msg_wrong_topic, 4), (msg_equivocation, 4), (msg_bad_readings, 6),
        (msg_forged_envelope, 6), (msg_envelope_garbage, 8), (msg_envelope_replay, 4),
        (msg_quarantine, 10), (msg_health, 6),
    ]  # fmt: skip
    funcs = [m for m, _ in makers]
    weights = [w for _, w in makers]

    def draw() -> Message:
        return rng.choices(funcs, weights)[0]()

    return draw


# --------------------------------------------------------------------- processes


@dataclass
class Processes:
    ingest: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    logs: Path

    def alive(self) -> bool:
        return self.ingest.poll() is None and self.gateway.poll() is None

    def log_tail(self) -> str:
        return "".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in self.logs.iterdir()
        )


@pytest.fixture
def attack() -> Attack:
    return Attack(random.Random(SEED))


@pytest.fixture
def site(tmp_path: Path, mosquitto: Any, attack: Attack) -> Iterator[tuple[Processes, str, Store]]:
    a = attack
    registry = Registry.empty().with_gateway(
        GatewayRecord(a.gateway.key_id, a.gateway.verify_key().to_text())
    )
    registered_at = a.t0 - 30 * 24 * 3600 * 1000
    for dev in (a.good, a.mallory, a.broken, a.revoked):
        registry = registry.with_device(
            DeviceRecord(dev.key_id, dev.verify_key().to_text(), zone="harbour")
        )
    registry = registry.with_device(replace(registry.devices[a.revoked.key_id], status="revoked"))
    for record in list(registry.devices.values()):
        registry = registry.with_device(replace(record, registered_at_ms=registered_at))
    registry_path = tmp_path / "registry.json"
    registry.save(registry_path)
    a.gateway.save(tmp_path / "gateway.key")
    url = f"mqtt://127.0.0.1:{mosquitto.port}"
    store_url = f"sqlite:///{tmp_path / 'central.db'}"
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {
        **os.environ,
        "CIVICMESH_DATABASE_URL": store_url,
        "CIVICMESH_REGISTRY_FILE": str(registry_path),
        "CIVICMESH_MQTT__URL": url,
        "CIVICMESH_GATEWAY_KEY_FILE": str(tmp_path / "gateway.key"),
        "CIVICMESH_GATEWAY_REGISTRY_FILE": str(registry_path),
        "CIVICMESH_GATEWAY_STATE_DIR": str(tmp_path / "gw"),
        "CIVICMESH_GATEWAY_DEVICE_MQTT__URL": url,
        "CIVICMESH_GATEWAY_UPSTREAM_MQTT__URL": url,
    }
    migrated = open_store(store_url)
    migrated.migrate()
    migrated.close()
    cli = [sys.executable, "-m", "civicmesh.cli"]
    with (logs / "ingest.log").open("wb") as i_log, (logs / "gateway.log").open("wb") as g_log:
        ingest = subprocess.Popen(
            [*cli, "ingest", "run", "--worker-id", "adversarial"], env=env, stdout=i_log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        gateway = subprocess.Popen(
            [*cli, "gateway", "run"], env=env, stdout=g_log, stderr=subprocess.STDOUT
        )
    procs = Processes(ingest, gateway, logs)
    store = open_store(store_url)
    try:
        yield procs, url, store
    finally:
        for proc in (ingest, gateway):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        store.close()


def _good_landed(store: Store, attack: Attack) -> int:
    return len(store.ledger(attack.good.key_id, limit=100_000))


def _wait(condition: Callable[[], bool], timeout: float, what: str, procs: Processes) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert procs.alive(), f"a process died while waiting for {what}\n{procs.log_tail()}"
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{procs.log_tail()}")
        time.sleep(0.2)


def test_hostile_traffic_on_every_topic(
    site: tuple[Processes, str, Store], attack: Attack, capsys: pytest.CaptureFixture[str]
) -> None:
    procs, url, store = site
    a = attack
    publisher = MqttLink(url, "adversary", max_inflight=1000)
    publisher.connect()
    _wait(lambda: publisher.is_connected, 10, "the publisher", procs)

    def send_good() -> None:
        batch = a.next_batch(a.good)
        a.good_messages.append(batch.message)
        publisher.publish(topics.device_up(a.good.key_id), batch.message)
        a.sent["good"] += 1

    # The good device and mallory start their chains before the attack; the processes
    # are ready once the first good batch is stored.
    deadline = time.monotonic() + 60
    while _good_landed(store, a) == 0:
        assert procs.alive(), procs.log_tail()
        assert time.monotonic() < deadline, f"nothing landed\n{procs.log_tail()}"
        if not a.good_messages or a.rng.random() < 0.2:
            send_good()
        time.sleep(0.5)
    a.heads["mallory-prev"] = (0, GENESIS_HASH)
    first = a.next_batch(a.mallory)
    publisher.publish(topics.device_up(a.mallory.key_id), first.message)
    draw = hostile(a)
    started = time.monotonic()
    landed_during: list[int] = []
    pending: list[tuple[str, bytes]] = []
    for n in range(1, MESSAGES + 1):
        topic, payload, cls, qos = draw()
        a.sent[cls] += 1
        if qos == 0:
            publisher.publish(topic, payload, qos=0)
        else:
            pending.append((topic, payload))
            sha = hashlib.sha256(payload).hexdigest()
            if cls.startswith("readings-"):
                seq = a.heads[a.mallory.key_id][0]
                a.expects.append(Expect(cls, device_seq=(a.mallory.key_id, seq)))
            elif cls == "envelope-replay":
                # A valid envelope again: the store's replay record names it, or (when it
                # beat the gateway's own envelope) the one it beat does.
                inner = a.good_messages.index(_inner(payload)) + 1
                a.expects.append(Expect(cls, sha=sha, device_seq=(a.good.key_id, inner)))
            else:
                a.expects.append(Expect(cls, sha=sha))
        if n % GOOD_EVERY == 0 or len(pending) >= 200:
            acked = publisher.publish_many(pending, timeout=60)
            assert acked == len(pending), "the broker took every message"
            pending = []
        if n % GOOD_EVERY == 0:
            send_good()
        if n % SLICE == 0:
            expected = a.sent["good"]
            _wait(
                lambda expected=expected: _good_landed(store, a) >= expected,
                120,
                "good batches",
                procs,
            )
            landed_during.append(_good_landed(store, a))
    if pending:
        assert publisher.publish_many(pending, timeout=60) == len(pending)
    attack_s = time.monotonic() - started

    def records() -> list[QuarantineRecord]:
        return store.quarantined(10_000_000)

    def missing() -> list[Expect]:
        kept = records()
        shas = {r.payload_sha256 for r in kept}
        pairs = {(r.device_id, r.seq) for r in kept}
        return [e for e in a.expects if e.sha not in shas and e.device_seq not in pairs]

    deadline = time.monotonic() + 240
    while left := missing():
        assert procs.alive(), procs.log_tail()
        if time.monotonic() > deadline:
            pytest.fail(f"no quarantine record for: {Counter(e.cls for e in left)}")
        time.sleep(1.0)
    publisher.close()
    kept = records()
    assert all(r.reason for r in kept)
    # The good device: every batch stored once, in order, never framed.
    ledger = store.ledger(a.good.key_id, limit=100_000)
    assert [e.seq for e in ledger] == list(range(1, a.sent["good"] + 1))
    # Nothing forged frames it: no quarantine record that a gateway or ingest did not
    # make itself names the good device; records of its own bytes re-sent by the attacker
    # (bit-flipped, on a wrong topic) name it but do not count against it in reports.
    framing = [
        r for r in kept
        if r.device_id == a.good.key_id and r.reason.startswith("quarantine.")
    ]  # fmt: skip
    assert not framing, f"the good device was framed: {framing[:3]}"
    counted = store.quarantine_counts(0, now_ms() + 3_600_000).get(a.good.key_id)
    assert counted is None, f"reports count {counted} quarantined batches against it"
    assert not [
        r for r in kept if r.device_id == a.good.key_id and r.source.startswith("gw:")
        and r.source != f"gw:{a.gateway.key_id}"
    ], "no record in another gateway's name"  # fmt: skip
    # No bad health report was stored.
    for report in store.device_health():
        assert report.outbox_batches < 2**31 and report.reported_ms < 4_102_444_800_000
    assert procs.alive(), procs.log_tail()
    hostile_total = sum(n for cls, n in a.sent.items() if cls != "good")
    assert hostile_total >= MESSAGES
    by_reason = Counter(r.reason for r in kept)
    with capsys.disabled():
        print(f"\nadversarial suite (seed {SEED}): {hostile_total} hostile messages in "
              f"{attack_s:.1f} s, {a.sent['good']} good batches sent, "
              f"{len(ledger)} landed (after each {SLICE}-message slice: "
              f"{landed_during})")  # fmt: skip
        print("  messages by class: " + ", ".join(f"{c} {n}" for c, n in sorted(a.sent.items())))
        print("  quarantined by reason: "
              + ", ".join(f"{r} {n}" for r, n in sorted(by_reason.items())))  # fmt: skip
        print(f"  health reports (QoS 0) sent: {a.sent['health']}, stored: "
              f"{len(store.device_health())} (only sane ones can be)")  # fmt: skip
        print(f"  processes up throughout: ingest pid {procs.ingest.pid}, gateway pid "
              f"{procs.gateway.pid}")  # fmt: skip
