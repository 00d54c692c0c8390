"""Edge agent: windowing, durable outbox, publishing against a real broker, outages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from civicmesh import topics
from civicmesh.config import load_settings
from civicmesh.custody import ResendPlan
from civicmesh.drivers import SampleBlock
from civicmesh.identity import Ed25519Signer
from civicmesh.metrics import Quality
from civicmesh.mqtt import Message, MqttLink
from civicmesh.protocol import (
    GENESIS_HASH,
    Reading,
    Receipt,
    encode_receipt,
    message_digest,
    open_batch,
)
from edge.agent import EdgeAgent
from edge.outbox import Outbox
from edge.settings import EdgeSettings
from edge.windowing import Windower

T0 = 1_767_225_600_000  # 2026-01-01T00:00Z, a multiple of every window used here


class RampDriver:
    """Deterministic test driver: pm25 = sample index, one sample every 20 s."""

    metrics = ("pm25",)
    sample_interval_ms = 20_000

    def __init__(self, start_ms: int = T0) -> None:
        self.cursor = start_ms

    def read(self, until_ms: int) -> list[SampleBlock]:
        times = np.arange(self.cursor, until_ms, self.sample_interval_ms, dtype=np.int64)
        if len(times) == 0:
            return []
        self.cursor = int(times[-1]) + self.sample_interval_ms
        return [SampleBlock("pm25", times, ((times - T0) // self.sample_interval_ms).astype(float))]

    def close(self) -> None:
        pass


def settings_for(tmp_path: Path, url: str = "mqtt://127.0.0.1:1") -> EdgeSettings:
    return load_settings(
        EdgeSettings,
        None,
        {
            "key_file": str(tmp_path / "k"),
            "state_dir": str(tmp_path / "state"),
            "mqtt": {"url": url},
            "driver": {"name": "test"},
            "batch_max_readings": 7,
        },
    )


def test_windows_are_means_and_independent_of_chunking() -> None:
    one = Windower(60_000, 3).feed(RampDriver().read(T0 + 600_000), T0 + 600_000)
    driver, windower, many = RampDriver(), Windower(60_000, 3), []
    for until in [*range(T0 + 7_000, T0 + 600_000, 13_000), T0 + 600_000]:
        many += windower.feed(driver.read(until), until)
    assert one == many
    assert [r.value for r in one[:3]] == [1.0, 4.0, 7.0]  # mean of 0,1,2 / 3,4,5 / 6,7,8
    assert all(r.ts_ms % 60_000 == 0 for r in one)
    assert len(one) == 10


def test_partial_and_out_of_range_windows_are_flagged() -> None:
    block = SampleBlock("relativehumidity", [T0, T0 + 20_000, T0 + 60_000], [50.0, 52.0, 140.0])
    readings = Windower(60_000, 3).feed([block], T0 + 120_000)
    assert readings[0] == Reading(T0, "relativehumidity", 51.0, int(Quality.PARTIAL_WINDOW))
    assert readings[1].quality == int(Quality.PARTIAL_WINDOW | Quality.OUT_OF_RANGE)


def test_impossible_combinations_are_flagged_on_both_readings() -> None:
    blocks = [
        SampleBlock("pm25", [T0, T0 + 60_000], [30.0, 5.0]),
        SampleBlock("pm10", [T0, T0 + 60_000], [12.0, 9.0]),  # first window: PM2.5 > PM10
        SampleBlock("vehicle_count", [T0, T0 + 60_000], [0.0, 4.0]),
        # a speed from travel times with no vehicle counted: real traffic data does this
        SampleBlock("mean_speed", [T0, T0 + 60_000], [40.0, 38.0]),
    ]
    readings = Windower(60_000, 1).feed(blocks, T0 + 120_000)
    flagged = {(r.ts_ms, r.metric) for r in readings if r.quality & Quality.IMPLAUSIBLE}
    assert flagged == {(T0, "pm25"), (T0, "pm10")}


def test_outbox_seals_a_hash_chain_and_survives_reopen(tmp_path: Path) -> None:
    signer = Ed25519Signer.from_seed(b"e" * 32)
    outbox = Outbox(tmp_path / "o.db")
    outbox.add([Reading(T0 + i * 60_000, "no2", float(i)) for i in range(20)])
    first = outbox.seal(signer, 8)
    assert first is not None and first.seq == 1 and first.payload.prev_hash == GENESIS_HASH
    outbox.close()
    outbox = Outbox(tmp_path / "o.db")
    second = outbox.seal(signer, 8)
    third = outbox.seal(signer, 8)
    assert outbox.seal(signer, 8) is None
    assert second is not None and third is not None
    assert second.payload.prev_hash == first.hash and third.payload.prev_hash == second.hash
    assert [len(b.payload.readings) for b in (first, second, third)] == [8, 8, 4]
    assert [seq for seq, _ in outbox.unsent()] == [1, 2, 3]
    assert outbox.unsent()[0][1] == first.message  # re-sent byte for byte
    outbox.close()
    without_gateway = Outbox(tmp_path / "o.db", await_receipts=False)
    without_gateway.mark_sent([1, 2])  # the PUBACK alone releases them
    assert without_gateway.stats().sealed_batches == 1 and without_gateway.stats().last_seq == 3
    without_gateway.close()


def test_outbox_releases_on_receipt_and_resends_what_has_none(tmp_path: Path) -> None:
    signer = Ed25519Signer.from_seed(b"g" * 32)
    outbox = Outbox(tmp_path / "o.db")
    outbox.add([Reading(T0 + i * 60_000, "no2", float(i)) for i in range(3)])
    batches = [outbox.seal(signer, 1) for _ in range(3)]
    messages = [b.message for b in batches if b is not None]
    assert [m for _, m in outbox.unsent()] == messages

    before = time.time_ns() // 10**6
    outbox.mark_sent([1, 2, 3])  # PUBACK: published, still kept
    after = time.time_ns() // 10**6
    assert outbox.unsent() == []
    assert outbox.unsent(plan=ResendPlan(before, 0, 0)) == []
    stats = outbox.stats()
    assert (stats.sealed_batches, stats.unpublished_batches) == (3, 0)

    removed, newest = outbox.confirm([message_digest(messages[1])])
    assert removed == 1 and newest is not None and before <= newest <= after
    assert outbox.confirm([message_digest(b"not one of ours")]) == (0, None)
    assert outbox.confirm([message_digest(messages[1])]) == (0, None)  # harmless twice
    # What the plan names is published again: the same bytes, in seq order.
    assert outbox.unsent(plan=ResendPlan(after + 1, 0, 0)) == [(1, messages[0]), (3, messages[2])]
    assert outbox.unsent(plan=ResendPlan(0, 1, after + 1)) == [(1, messages[0])]  # a probe
    outbox.close()
    reopened = Outbox(tmp_path / "o.db")
    assert reopened.stats().sealed_batches == 2
    assert reopened.confirm([message_digest(m) for m in messages])[0] == 2
    assert reopened.stats().sealed_batches == 0 and reopened.stats().last_seq == 3
    reopened.close()


def test_outbox_migration_keys_batches_sealed_before_receipts(tmp_path: Path) -> None:
    from civicmesh.sqlite_state import open_state
    from edge.outbox import MIGRATIONS

    old = open_state(tmp_path / "o.db", MIGRATIONS[:1])  # an outbox of the first release
    old.execute("INSERT INTO sealed (seq, hash, message, sealed_ms) VALUES (1, x'00', x'abcd', 0)")
    old.close()
    outbox = Outbox(tmp_path / "o.db")
    assert outbox.unsent() == [(1, b"\xab\xcd")]
    assert outbox.confirm([message_digest(b"\xab\xcd")]) == (1, None)
    outbox.close()


def test_outbox_bound_drops_oldest_unsealed_and_counts(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", max_readings=5)
    dropped = outbox.add([Reading(T0 + i * 60_000, "co", float(i)) for i in range(8)])
    assert dropped == 3 and outbox.stats().dropped_total == 3
    batch = outbox.seal(Ed25519Signer.from_seed(b"f" * 32), 100)
    assert batch is not None and [r.value for r in batch.payload.readings] == [3, 4, 5, 6, 7]


CRASH_SCRIPT = """
import sys, pathlib
from civicmesh.identity import Ed25519Signer
from civicmesh.protocol import Reading
from edge.outbox import Outbox
outbox = Outbox(pathlib.Path(sys.argv[1]))
signer = Ed25519Signer.from_seed(b"c" * 32)
i = 0
while True:
    rows = [(i * 10 + k) for k in range(10)]
    outbox.add([Reading(1767225600000 + n * 1000, "pm10", float(n)) for n in rows])
    outbox.seal(signer, 25)
    i += 1
    if i == 20:
        print("ready", flush=True)
"""


def test_outbox_consistent_after_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    outbox = Outbox(path)
    keys = {
        Ed25519Signer.from_seed(b"c" * 32).key_id: Ed25519Signer.from_seed(b"c" * 32).verify_key()
    }
    values: list[float] = []
    prev = GENESIS_HASH
    for seq, message in outbox.unsent(100_000):
        batch = open_batch(message, keys.get)
        assert batch.seq == seq and batch.payload.prev_hash == prev
        prev = batch.hash
        values += [r.value for r in batch.payload.readings]
    pending = outbox.seal(Ed25519Signer.from_seed(b"c" * 32), 10**6)
    if pending is not None:
        assert pending.payload.prev_hash == prev
        values += [r.value for r in pending.payload.readings]
    # Nothing lost, nothing duplicated: values are exactly 0..n-1 in order.
    assert values == [float(i) for i in range(len(values))]
    assert len(values) >= 200


@pytest.mark.integration
def test_agent_buffers_through_an_outage_and_drains_in_order(
    tmp_path: Path, mosquitto: object
) -> None:
    broker = mosquitto
    signer = Ed25519Signer.from_seed(os.urandom(32))
    received: list[Message] = []
    # Plays the gateway: keeps what arrives and answers with a receipt. Persistent, so
    # the broker keeps its subscription (and queue) across the restart.
    listener = MqttLink(broker.url, f"listener-{signer.key_id}", persistent=True)  # type: ignore[attr-defined]

    def gateway(message: Message) -> None:
        received.append(message)
        receipt = Receipt("gateway-test", (message_digest(message.payload),))
        listener.publish(topics.device_receipt(signer.key_id), encode_receipt(receipt), qos=0)

    listener.connect()
    listener.subscribe(topics.device_up(signer.key_id), gateway)
    link = MqttLink(broker.url, f"agent-{signer.key_id}")  # type: ignore[attr-defined]
    link.connect()
    agent = EdgeAgent(settings_for(tmp_path, broker.url), signer, RampDriver(), link)  # type: ignore[attr-defined]
    try:
        agent.collect(T0 + 30 * 60_000)
        agent.seal_all()
        assert agent.flush() == 5  # 30 readings in batches of 7
        deadline = time.monotonic() + 10
        while agent.health()["outbox"]["sealed_batches"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.health()["outbox"]["sealed_batches"] == 0, "receipts release the batches"

        broker.stop()  # type: ignore[attr-defined]
        agent.collect(T0 + 60 * 60_000)
        agent.seal_all()
        assert agent.flush(timeout=1) == 0
        assert agent.outbox.stats().sealed_batches == 5  # kept, not lost

        broker.start()  # type: ignore[attr-defined]
        assert link.wait_connected(30) and listener.wait_connected(30)
        deadline = time.monotonic() + 30
        while agent.outbox.stats().sealed_batches and time.monotonic() < deadline:
            agent.flush()
            time.sleep(0.2)
        assert agent.outbox.stats().sealed_batches == 0
        keys = {signer.key_id: signer.verify_key()}
        deadline = time.monotonic() + 10
        while len({m.payload for m in received}) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        batches = {open_batch(m.payload, keys.get).seq: m for m in received}
        assert sorted(batches) == list(range(1, 11))
        values = [
            r.value
            for seq in sorted(batches)
            for r in open_batch(batches[seq].payload, keys.get).payload.readings
        ]
        assert values == [1.0 + 3 * i for i in range(60)]
    finally:
        link.close()
        listener.close()
        agent.close()


def test_run_loop_stops_cleanly(tmp_path: Path) -> None:
    # Start five minutes ago so the first collect is small.
    driver = RampDriver(start_ms=(time.time_ns() // 10**6 // 60_000 - 5) * 60_000)
    agent = EdgeAgent(settings_for(tmp_path), Ed25519Signer.from_seed(b"r" * 32), driver, None)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    time.sleep(0.2)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    agent.close()


def test_edge_rotate_keeps_the_device_id_and_the_registry_takes_the_new_key(
    tmp_path: Path,
) -> None:
    import json as _json
    import subprocess
    import sys

    from civicmesh.identity import load_device_signer
    from civicmesh.registry import DeviceRecord, Registry

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "civicmesh.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    key = tmp_path / "device.key"
    request = _json.loads(cli("edge", "provision", "--key", str(key)).stdout)
    registry = tmp_path / "registry.json"
    Registry.empty().with_device(
        DeviceRecord(request["device_id"], request["public_key"], "harbour")
    ).save(registry)
    announcement = cli("edge", "rotate", "--key", str(key)).stdout.strip()
    cli("registry", "rotate-key", "--file", str(registry), "--announcement", announcement)
    after = _json.loads(cli("edge", "provision", "--key", str(key)).stdout)
    assert after["device_id"] == request["device_id"]  # the id stays
    assert after["public_key"] != request["public_key"]  # the key changed
    record = Registry.load(registry).devices[request["device_id"]]
    assert record.public_key == after["public_key"] and record.previous_key == request["public_key"]
    assert load_device_signer(key).key_id == request["device_id"]
    assert (tmp_path / "device.key.old").exists()
