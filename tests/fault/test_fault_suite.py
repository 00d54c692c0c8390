"""The permanent fault suite: real processes, real Mosquitto, the embedded SQLite store.

Three edge agents (``civicmesh edge run``), a gateway (``civicmesh gateway run``) and
ingest (``civicmesh ingest run``) run as their own processes. The edge agents and the
gateway boot while the broker is down; then, at random points (seeded: set
``CIVICMESH_FAULT_SEED`` to replay a run), agents, the gateway and ingest are killed
with SIGKILL and started again, and the broker is killed or stopped and started again
(every victim at least twice); then the broker stays away for a while as one agent,
whose outbox is capped at the smallest bound, re-reads a day of history (a long outage
against a disk cap).

Afterwards, per device, with L its last sealed seq:
- lost: seqs in 1..L neither stored, nor still in its outbox or the gateway buffer,
  beyond those the outbox counted as dropped by its overflow policy: must be 0;
- duplicated: a seq or a (time, metric) reading stored twice: must be 0;
- chain breaks: consecutive stored seqs whose prev_hash does not name the one before: 0;
- the readings of the uncapped devices cover every window without a hole;
- disk bounded: the capped outbox never held more than its bound (plus one batch).

The figures are printed in the terminal summary ("fault suite figures").
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import MosquittoProcess

from civicmesh.identity import Ed25519Signer
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.slow]

WINDOW_S = 5
SAMPLE_MS = 1000
CAPPED_MAX_READINGS = 1000  # the smallest bound the settings allow
BATCH_MAX = 200
ROUNDS = int(os.environ.get("CIVICMESH_FAULT_ROUNDS", "16"))


def signer(name: str) -> Ed25519Signer:
    return Ed25519Signer.from_seed(hashlib.sha256(f"fault/{name}".encode()).digest())


class Service:
    """One civicmesh process; ``kill`` is SIGKILL, ``stop`` SIGTERM."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "civicmesh.cli", *self.argv],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return "(not started)"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\") + '"'


def write_toml(path: Path, top: dict[str, Any], sections: dict[str, dict[str, Any]]) -> Path:
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def outbox_state(path: Path) -> dict[str, Any]:
    """What an outbox holds, read beside the running agent (WAL allows a reader)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        seq, dropped, batches = db.execute(
            "SELECT seq, dropped_total, dropped_batches FROM head"
        ).fetchone()
        sealed = [row[0] for row in db.execute("SELECT seq FROM sealed ORDER BY seq")]
        (pending,) = db.execute("SELECT count(*) FROM pending").fetchone()
        (sealed_readings,) = db.execute("SELECT coalesce(sum(readings), 0) FROM sealed").fetchone()
    return {
        "last_seq": seq,
        "dropped_total": dropped,
        "dropped_batches": batches,
        "sealed": sealed,
        "readings": pending + sealed_readings,
    }


def buffer_unconfirmed(path: Path) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    if not path.exists():
        return out
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        for device, seq in db.execute(
            "SELECT device_id, seq FROM outgoing WHERE confirmed_ms IS NULL AND device_id "
            "IS NOT NULL"
        ):
            out.setdefault(device, set()).add(seq)
    return out


def stored_seqs(store_path: Path, device_id: str) -> list[int]:
    if not store_path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=30) as db:
            return [
                row[0]
                for row in db.execute(
                    "SELECT seq FROM batches WHERE device_id = ? ORDER BY seq", (device_id,)
                )
            ]
    except sqlite3.OperationalError:
        return []  # not migrated yet


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.broker = MosquittoProcess(workdir=tmp_path / "mosquitto")
        self.gw = signer("gateway")
        self.devices = {name: signer(name) for name in ("edge0", "edge1", "edge2")}
        registry = Registry.empty().with_gateway(
            GatewayRecord(self.gw.key_id, self.gw.verify_key().to_text())
        )
        for dev in self.devices.values():
            registry = registry.with_device(
                DeviceRecord(dev.key_id, dev.verify_key().to_text(), "z1", 45.0, 7.0)
            )
        self.registry_path = tmp_path / "registry.json"
        registry.save(self.registry_path)
        self.store_path = tmp_path / "store.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CIVICMESH_")}
        url = self.broker.url
        self.gw.save(tmp_path / "gw.key")
        gw_config = write_toml(
            tmp_path / "gateway.toml",
            {
                "key_file": str(tmp_path / "gw.key"),
                "registry_file": str(self.registry_path),
                "state_dir": str(tmp_path / "gw"),
                "resend_after_s": 2.0,
                "gap_hold_s": 2.0,
            },
            {"device_mqtt": {"url": url}, "upstream_mqtt": {"url": url}},
        )
        self.services: dict[str, Service] = {
            "gateway": Service(
                "gateway", ["gateway", "run", "--config", str(gw_config)], env, tmp_path / "gw.log"
            ),
        }
        now = int(time.time() * 1000)
        for index, (name, dev) in enumerate(self.devices.items()):
            dev.save(tmp_path / f"{name}.key")
            capped = name == "edge2"
            # The capped agent starts a day back: a day of readings to take offline.
            start = now - (86_400_000 if capped else 1_800_000)
            config = write_toml(
                tmp_path / f"{name}.toml",
                {
                    "key_file": str(tmp_path / f"{name}.key"),
                    "state_dir": str(tmp_path / name),
                    "window_s": WINDOW_S,
                    "batch_max_readings": BATCH_MAX,
                    "publish_interval_s": 0.5,
                    "resend_after_s": 2.0,
                    "health_interval_s": 5.0,
                    "outbox_max_readings": CAPPED_MAX_READINGS if capped else 500_000,
                },
                {
                    "mqtt": {"url": url},
                    "driver": {"name": "sim"},
                    "driver.options": {
                        "seed": 100 + index,
                        "kind": "air",
                        "sample_interval_ms": SAMPLE_MS,
                        "start_ms": start - start % (WINDOW_S * 1000),
                    },
                },
            )
            self.services[name] = Service(
                name, ["edge", "run", "--config", str(config)], env, tmp_path / f"{name}.log"
            )
        ingest_env = {
            **env,
            "CIVICMESH_DATABASE_URL": f"sqlite:///{self.store_path}",
            "CIVICMESH_REGISTRY_FILE": str(self.registry_path),
            "CIVICMESH_MQTT__URL": url,
            "CIVICMESH_STORAGE__RAW_RETENTION_DAYS": "36500",
            "CIVICMESH_STORAGE__ROLLUP_1M_RETENTION_DAYS": "36500",
            "CIVICMESH_STORAGE__ROLLUP_1H_RETENTION_DAYS": "36500",
        }
        self.services["ingest"] = Service(
            "ingest",
            ["-v", "ingest", "run", "--worker-id", "fault"],
            ingest_env,
            tmp_path / "ingest.log",
        )

    def outbox(self, name: str) -> Path:
        return self.tmp / name / "outbox.db"

    def close(self) -> None:
        for service in self.services.values():
            service.kill()
        self.broker.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    try:
        yield rig
    finally:
        rig.close()


def wait_for(predicate: Any, timeout: float, what: str, rig: Rig) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.name}\n{s.tail()}" for s in rig.services.values())
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s\n{logs}")
        time.sleep(0.25)


def test_kill_9_broker_faults_boot_offline_and_a_capped_outage(
    rig: Rig, fault_figures: list[dict[str, Any]]
) -> None:
    began = time.monotonic()
    seed = int(os.environ.get("CIVICMESH_FAULT_SEED", "16"))
    rng = random.Random(seed)
    kills = broker_restarts = 0
    max_capped = 0

    def sample_cap() -> None:
        nonlocal max_capped
        try:
            held = outbox_state(rig.outbox("edge2"))["readings"]
        except sqlite3.Error:
            return  # not created (or migrated) yet
        max_capped = max(max_capped, held)

    # Boot offline: the gateway and the agents start with no broker at all.
    for name in ("gateway", "edge0", "edge1", "edge2"):
        rig.services[name].start()

    def sealed_offline() -> bool:
        sample_cap()
        try:
            return all(outbox_state(rig.outbox(n))["last_seq"] > 0 for n in rig.devices)
        except sqlite3.Error:
            return False

    # Every agent seals offline (the capped one its day of history, down to its bound).
    wait_for(sealed_offline, 90, "sealing offline", rig)
    time.sleep(2)
    sample_cap()
    for name in ("gateway", "edge0", "edge1", "edge2"):
        assert rig.services[name].alive, f"{name} exited offline:\n{rig.services[name].tail()}"
    rig.broker.start()
    rig.services["ingest"].start()
    wait_for(
        lambda: all(stored_seqs(rig.store_path, d.key_id) for d in rig.devices.values()),
        90,
        "a first batch of every device stored after booting offline",
        rig,
    )

    # Kill -9 at random points, and broker faults.
    # Every victim at least twice (the broker once killed, once stopped), the rest random.
    victims = ["edge0", "edge1", "edge2", "gateway", "ingest", "broker"]
    schedule = victims * 2 + [rng.choice(victims) for _ in range(max(0, ROUNDS - 12))]
    rng.shuffle(schedule)
    for victim in schedule:
        time.sleep(rng.uniform(0.3, 2.5))
        sample_cap()
        if victim == "broker":
            if broker_restarts % 2 == 0:
                rig.broker.kill()
            else:
                rig.broker.stop()
            time.sleep(rng.uniform(0.5, 2.0))
            rig.broker.start()
            broker_restarts += 1
        else:
            rig.services[victim].kill()
            kills += 1
            time.sleep(rng.uniform(0.0, 1.5))
            rig.services[victim].start()

    # A long outage against the cap: the broker away while the capped agent, restarted,
    # reads its day of history again (its high-water mark keeps what it queued).
    rig.broker.stop()
    broker_restarts += 1
    rig.services["edge2"].kill()
    kills += 1
    rig.services["edge2"].start()
    for _ in range(16):
        time.sleep(0.5)
        sample_cap()
    rig.broker.start()

    # Drain: everything sealed until now reaches the store.
    marks = {name: outbox_state(rig.outbox(name))["last_seq"] for name in rig.devices}

    def drained() -> bool:
        sample_cap()
        for name, dev in rig.devices.items():
            state = outbox_state(rig.outbox(name))
            if any(seq <= marks[name] for seq in state["sealed"]):
                return False
            stored = stored_seqs(rig.store_path, dev.key_id)
            if not stored or stored[-1] < marks[name]:
                return False
        return True

    wait_for(drained, 120, f"draining every outbox into the store (marks {marks})", rig)
    for name in rig.devices:
        rig.services[name].stop()
    time.sleep(3)  # the last receipts
    rig.services["gateway"].stop()
    time.sleep(2)
    rig.services["ingest"].stop()
    sample_cap()

    # Invariants.
    from analytics.store import open_store

    store = open_store(f"sqlite:///{rig.store_path}")
    in_buffer = buffer_unconfirmed(rig.tmp / "gw" / "buffer.db")
    lost = duplicated = chain_breaks = batches = readings = 0
    dropped_batches = dropped_readings = 0
    problems: list[str] = []
    try:
        for name, dev in rig.devices.items():
            state = outbox_state(rig.outbox(name))
            ledger = store.ledger(dev.key_id, limit=1_000_000)
            seqs = [entry.seq for entry in ledger]
            batches += len(set(seqs))
            duplicated += len(seqs) - len(set(seqs))
            held = set(seqs) | set(state["sealed"]) | in_buffer.get(dev.key_id, set())
            missing = set(range(1, state["last_seq"] + 1)) - held
            if len(missing) > state["dropped_batches"]:
                lost += len(missing) - state["dropped_batches"]
                problems.append(f"{name}: missing seqs {sorted(missing)[:10]}")
            dropped_batches += state["dropped_batches"]
            dropped_readings += state["dropped_total"]
            for before, after in itertools.pairwise(ledger):
                if after.seq == before.seq + 1 and after.prev_hash != before.payload_hash:
                    chain_breaks += 1
                    problems.append(f"{name}: seq {after.seq} does not link")
            if ledger and ledger[0].seq == 1 and any(ledger[0].prev_hash):
                chain_breaks += 1
            stored = store.readings(dev.key_id, 0, 2**62)
            readings += len(stored)
            keys = [(r.ts_ms, r.metric) for r in stored]
            duplicated += len(keys) - len(set(keys))
            if name != "edge2" and stored:
                by_metric: dict[str, list[int]] = {}
                for ts, metric in sorted(set(keys)):
                    by_metric.setdefault(metric, []).append(ts)
                step = WINDOW_S * 1000
                for metric, times in by_metric.items():
                    holes = (times[-1] - times[0]) // step + 1 - len(times)
                    if holes:
                        lost += holes
                        problems.append(f"{name}: {holes} {metric} windows missing")
    finally:
        store.close()
    figures = {
        "run": f"seed={seed}",
        "kills": kills,
        "broker_restarts": broker_restarts,
        "batches": batches,
        "readings": readings,
        "lost": lost,
        "duplicated": duplicated,
        "chain_breaks": chain_breaks,
        "dropped_batches": dropped_batches,
        "dropped_readings": dropped_readings,
        "max_capped_outbox_readings": f"{max_capped}/{CAPPED_MAX_READINGS}",
        "seconds": round(time.monotonic() - began),
    }
    fault_figures.append(figures)
    assert not problems, problems
    assert lost == 0 and duplicated == 0 and chain_breaks == 0, figures
    assert dropped_readings > 0, "the capped agent had more than its bound to keep"
    assert 0 < max_capped <= CAPPED_MAX_READINGS + BATCH_MAX, figures
