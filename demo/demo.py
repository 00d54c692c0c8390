"""``civicmesh demo``: the whole pipeline in one process, on embedded defaults.

Simulated city -> edge agents (outbox, signed batches) -> MQTT -> gateway (verify,
countersign) -> MQTT -> ingest (verify, exactly-once write) -> store -> API.

The broker is an embedded amqtt broker on a free port unless ``--mqtt-url`` names one;
the store is a single SQLite file unless ``--database-url`` names PostgreSQL. A simulated
week is backfilled as fast as the pipeline takes it, then the devices stream live until
``--duration`` runs out or Ctrl-C. Shutdown flushes every outbox and waits for ingest
to catch up; whatever could not be delivered stays in the durable outboxes on disk.

Demo keys are derived from the seed so a run is reproducible; never do that in the field
(``civicmesh edge keygen`` makes a random key).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from analytics import app as analytics_app
from analytics.apiauth import ROLES, TokenFile
from analytics.app import ApiService, Services
from analytics.dashboard.auth import UserFile
from analytics.reports.service import to_record
from analytics.settings import AnalyticsSettings
from analytics.store.base import Store
from civicmesh.config import load_settings
from civicmesh.identity import Ed25519Signer
from civicmesh.mqtt import MqttLink
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry
from civicmesh.timeutil import now_ms
from edge import app as edge_app
from edge.agent import EdgeAgent, SystemClock
from edge.settings import EdgeSettings
from firmware_sim.city import SimulatedCity
from gateway import app as gateway_app
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
# The embedded broker keeps nothing over a restart: re-send what has no receipt soon.
DEMO_RESEND_AFTER_S = 20.0
# The rules of docs/alerts.md's example config, without a contact point.
DEMO_ALERT_RULES = [
    {"id": "aqi-usg-2h", "kind": "aqi_category", "level": "Unhealthy for Sensitive Groups",
     "for_minutes": 120},
    {"id": "pm25-who-hours", "kind": "who_exceedance", "metric": "pm25", "period_hours": 24,
     "min_hours": 8, "severity": "info"},
    {"id": "device-offline", "kind": "device_offline", "after_minutes": 15},
    {"id": "fault-flags", "kind": "fault_flags", "window_minutes": 60, "min_readings": 10},
    {"id": "quarantine-burst", "kind": "quarantine_burst", "window_minutes": 15,
     "min_records": 5, "severity": "critical"},
]  # fmt: skip


def _seed(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"civicmesh-demo/{seed}/{name}".encode()).digest()


def demo_signer(seed: int, name: str) -> Ed25519Signer:
    """Reproducible demo identity (the seed is public: demo only)."""
    return Ed25519Signer.from_seed(
        hashlib.sha256(f"civicmesh-demo/{seed}/{name}".encode()).digest()
    )


@dataclass
class DemoDevice:
    name: str
    zone: str
    signer: Ed25519Signer
    agent: EdgeAgent


class Demo:
    """Configuration of the components' own builds (``analytics.app``, ``gateway.app``,
    ``edge.app``): embedded broker and store, simulated drivers, demo keys, users and
    tokens. Each piece is started in order and stopped in reverse."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.state = Path(args.state_dir).resolve()
        self.pilot_zone = ""
        self.start_ms = self.end_ms = 0

    # ------------------------------------------------------------- pieces

    @contextmanager
    def broker(self) -> Iterator[str]:
        if self.args.mqtt_url:
            yield self.args.mqtt_url
            return
        from analytics.broker import EmbeddedBroker

        broker = EmbeddedBroker(host="127.0.0.1", port=0)
        broker.start()
        try:
            yield broker.url
        finally:
            broker.stop()

    def city(self) -> SimulatedCity:
        return SimulatedCity.generate(
            self.args.seed, devices=self.args.devices, zones=self.args.zones
        )

    def write_registry(self, city: SimulatedCity, gateway: Ed25519Signer) -> Path:
        registry = Registry.empty().with_gateway(
            GatewayRecord(gateway.key_id, gateway.verify_key().to_text())
        )
        registered = now_ms() - int(self.args.days * DAY_MS) - DAY_MS
        for device in city.devices:
            signer = demo_signer(self.args.seed, device.name)
            registry = registry.with_device(
                DeviceRecord(
                    device_id=signer.key_id,
                    public_key=signer.verify_key().to_text(),
                    zone=device.zone,
                    lat=device.lat,
                    lon=device.lon,
                    kind=device.kind,
                    registered_at_ms=registered,
                )
            )
        path = self.state / "registry.json"
        registry.save(path)
        return path

    # ------------------------------------------------------------- configuration

    def central_settings(self, mqtt_url: str, database_url: str) -> AnalyticsSettings:
        """The central service as production runs it (tokens, limits, window), on the
        demo's broker, store and state dir."""
        return load_settings(
            AnalyticsSettings,
            None,
            {
                "database_url": database_url,
                "registry_file": str(self.state / "registry.json"),
                # Its own client id and group: on a shared broker (--mqtt-url) the demo's
                # persistent session must never take a share of a real ingest's messages.
                "mqtt": {"url": mqtt_url, "client_id": "civicmesh-demo-ingest"},
                "ingest": {"shared_group": "civicmesh-demo", "worker_id": "demo"},
                "api": {"tokens_file": str(self.state / "api-tokens.json")},
                # the demo writes yesterday's city report itself, once, after the backfill
                "reports": {"schedule": False},
                "dashboard": {
                    "users_file": str(self.state / "dashboard-users.json"),
                    "zones_geojson": str(self.state / "zones.geojson"),
                },
                # alert rules, recorded in the state dir and listed at /api/v1/alerts (no
                # contact point: a config's [[alerts.contact_points]] gets them delivered)
                "alerts": {
                    "state_file": str(self.state / "alerts.db"),
                    "interval_s": 30,
                    "rules": DEMO_ALERT_RULES,
                },
                # the public audit log: a checkpoint every 5 s, the gateway as witness
                "audit": {
                    "log_key": str(self.audit_keys()[0]),
                    "interval_s": 5,
                    "witnesses": [self.audit_witness().key.to_vkey()],
                    "quorum": 1,
                    "mirror_dir": str(self.state / "audit-mirror"),
                },
            },
        )

    def audit_keys(self) -> tuple[Path, Path]:
        """The demo log's key file and its vkey (deterministic from the seed: demo only)."""
        from civicmesh.audit.note import NoteSigner

        key, vkey = self.state / "audit-log.key", self.state / "audit-log.vkey"
        if not key.exists():
            signer = NoteSigner("civicmesh.demo/log", _seed(self.args.seed, "audit-log"))
            signer.save(key)
            vkey.write_text(signer.key.to_vkey() + "\n")
        return key, vkey

    def audit_witness(self) -> Any:
        from civicmesh.audit.note import ALG_COSIGNATURE_V1, NoteSigner

        signer = NoteSigner(
            "civicmesh.demo/gateway", _seed(self.args.seed, "audit-witness"), ALG_COSIGNATURE_V1
        )
        (self.state / "audit-witness.vkey").write_text(signer.key.to_vkey() + "\n")
        return signer

    def start_witness(self, stack: ExitStack, mqtt_url: str, url: str) -> None:
        """The gateway operator's witness: cosigns each checkpoint it can check."""
        from civicmesh.audit.daemon import WitnessDaemon
        from civicmesh.audit.note import NoteKey
        from civicmesh.audit.witness import Witness

        log_key = NoteKey.from_vkey(self.audit_keys()[1].read_text())
        link = MqttLink(mqtt_url, "civicmesh-demo-witness")
        stack.callback(link.close)
        witness = Witness(self.audit_witness(), log_key, self.state / "audit-witness.json")
        daemon = WitnessDaemon(witness, link, f"{url}/api/v1/audit")
        daemon.start()  # subscribes first: the retained checkpoint finds its handler
        stack.callback(daemon.stop)
        link.connect()

    def announce_audit(self, api: ApiService, url: str, timeout: float = 20.0) -> None:
        """The latest witnessed checkpoint and the command that verifies it."""
        if api.audit is None:
            return
        batches = api.store.counts().batches
        deadline = time.monotonic() + timeout
        current = api.audit.publisher.current()
        while time.monotonic() < deadline and not self.stop.is_set():
            current = api.audit.publisher.current()
            if current is not None and current.size >= batches and current.cosigned_by:
                break
            time.sleep(0.5)
        if current is None:
            print("civicmesh demo: audit log: no checkpoint yet", flush=True)
            return
        command = (
            f"civicmesh audit verify {url}/api/v1/audit --log-key {self.audit_keys()[1]} "
            f"--witness {self.state / 'audit-witness.vkey'} "
            f"--registry {self.state / 'registry.json'} "
            f"--state {self.state / 'audit-verify.json'}"
        )
        names = ", ".join(current.cosigned_by) or "no witness yet"
        print(
            f"civicmesh demo: audit log: checkpoint of {current.size} batches, cosigned by "
            f"{names}; verify it: {command}",
            flush=True,
        )

    def gateway_settings(self, mqtt_url: str) -> GatewaySettings:
        """Device side and upstream share the demo's broker."""
        return load_settings(
            GatewaySettings,
            None,
            {
                "key_file": str(self.state / "gateway.key"),
                "registry_file": str(self.state / "registry.json"),
                "state_dir": str(self.state / "gateway"),
                "device_mqtt": {"url": mqtt_url, "client_id": "civicmesh-demo-gw-dev"},
                "upstream_mqtt": {"url": mqtt_url, "client_id": "civicmesh-demo-gw-up"},
                "resend_after_s": DEMO_RESEND_AFTER_S,
            },
        )

    def edge_settings(
        self, mqtt_url: str, device: Any, start_ms: int, release: tuple[Path, str] | None
    ) -> EdgeSettings:
        """One simulated device; the pilot zone's devices run the released model."""
        return load_settings(
            EdgeSettings,
            None,
            {
                "key_file": str(self.state / "devices" / f"{device.name}.key"),
                "state_dir": str(self.state / "devices" / device.name),
                "mqtt": {"url": mqtt_url},
                "driver": {
                    "name": "sim",
                    "options": dict(device.driver_options, start_ms=start_ms),
                },
                "resend_after_s": DEMO_RESEND_AFTER_S,
                "models": {
                    "enabled": release is not None and device.zone == self.pilot_zone,
                    "group": "pilot",
                    "sensor_types": ["sim"],
                    "release_keys": [release[1]] if release else [],
                    "install": [str(release[0])] if release else [],
                },
            },
        )

    def demo_credentials(self) -> tuple[str, dict[str, str]]:
        """Demo users of the dashboard and API tokens, one per role (printed by the demo)."""
        password = self.args.dashboard_password or secrets.token_urlsafe(9)
        users = UserFile(self.state / "dashboard-users.json")
        tokens = TokenFile(self.state / "api-tokens.json")
        issued = {}
        for role in ROLES:
            users.add(role, role, password)
            issued[role] = tokens.add(f"demo-{role}", role)
        return password, issued

    # ------------------------------------------------------------- run

    def prepare(self) -> tuple[SimulatedCity, str, dict[str, str]]:
        """A fresh state dir (unless --keep-state) with the registry, zone shapes, demo
        users and tokens; returns the city, the users' password and the tokens."""
        if self.state.exists() and not self.args.keep_state:
            shutil.rmtree(self.state)
        self.state.mkdir(parents=True, exist_ok=True)
        city = self.city()
        self.pilot_zone = sorted(d.zone for d in city.devices)[0]
        self.write_registry(city, demo_signer(self.args.seed, "gateway"))
        (self.state / "zones.geojson").write_text(json.dumps(city.zones_geojson()))
        password, tokens = self.demo_credentials()
        return city, password, tokens

    def api_port(self) -> int:
        """The port asked for, or, when it is taken, a free one (said in one line)."""
        host, port = self.args.host, self.args.port
        if port == 0:
            return 0
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
                return int(port)
            except OSError:
                pass
        with socket.socket() as probe:
            probe.bind((host, 0))
            free = int(probe.getsockname()[1])
        print(f"civicmesh demo: port {port} is taken; using {free} (choose one with --port)",
              flush=True)  # fmt: skip
        return free

    def run(self) -> int:
        lock = self.lock_state_dir()
        if lock is None:
            return 1
        with lock:
            return self.run_locked()

    def lock_state_dir(self) -> TextIO | None:
        """An exclusive lock beside the state dir, taken before anything in it is wiped:
        a second demo on the same state dir must not delete a running demo's store,
        outboxes and credentials (it did). None, after one line, when it is held."""
        self.state.parent.mkdir(parents=True, exist_ok=True)
        path = self.state.parent / f".{self.state.name}.lock"
        handle = path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            print(
                f"civicmesh demo: error: another demo is running with state dir {self.state} "
                "(stop it first, or give this one its own --state-dir)",
                flush=True,
            )
            return None
        return handle

    def run_locked(self) -> int:
        args = self.args
        port = self.api_port()
        city, password, tokens = self.prepare()
        database_url = args.database_url or f"sqlite:///{self.state / 'civicmesh.db'}"
        gateway_signer = demo_signer(args.seed, "gateway")
        with ExitStack() as stack:
            mqtt_url = stack.enter_context(self.broker())
            print(f"civicmesh demo: broker {mqtt_url}, store {_redact(database_url)}", flush=True)
            central = analytics_app.build(self.central_settings(mqtt_url, database_url))
            assert central is not None and central.ingest and central.api  # no stop event
            stack.enter_context(central)
            gateway = gateway_app.build(self.gateway_settings(mqtt_url), signer=gateway_signer)
            stack.callback(gateway.stop)
            gateway.start()
            url = stack.enter_context(
                analytics_app.serve_in_thread(central.api.app, args.host, port)
            )
            self.print_sign_in(url, password, tokens)
            self.start_witness(stack, mqtt_url, url)
            devices = self.devices(stack, mqtt_url, city)
            self._install_signal_handlers()
            self.backfill(central, devices, len(city.zones))
            self.write_report(central.api)
            self.announce_audit(central.api, url)
            print(f"civicmesh demo: ready: API at {url}/docs  (Ctrl-C to stop)", flush=True)
            self.stream_live(devices)
            self.shut_down(central.ingest.store, devices)
        return 0

    def devices(self, stack: ExitStack, mqtt_url: str, city: Any) -> list[DemoDevice]:
        """One agent per simulated device, built by the edge's own root, sharing one
        MQTT connection."""
        link = MqttLink(mqtt_url, "civicmesh-demo-edge")
        link.connect()
        stack.callback(link.close)
        self.end_ms = now_ms()
        self.start_ms = self.end_ms - int(self.args.days * DAY_MS)
        release = None if self.args.no_models else pilot_release(self.state, self.args.seed)
        devices = []
        for device in city.devices:
            signer = demo_signer(self.args.seed, device.name)
            settings = self.edge_settings(mqtt_url, device, self.start_ms, release)
            node = edge_app.build(settings, signer=signer, link=link, clock=SystemClock())
            stack.callback(node.close)
            devices.append(DemoDevice(device.name, device.zone, signer, node.agent))
        if release is not None:
            pilots = [d for d in devices if d.agent.model_version]
            print(
                f"civicmesh demo: {len(pilots)} devices in zone {self.pilot_zone} run "
                f"{pilots[0].agent.model_version if pilots else 'no model'} "
                "(signed release, verified on each device)",
                flush=True,
            )
        return devices

    def backfill(self, central: Services, devices: list[DemoDevice], zones: int) -> None:
        assert central.ingest is not None
        print(
            f"civicmesh demo: {len(devices)} devices in {zones} zones; "
            f"backfilling {self.args.days:g} simulated days ...",
            flush=True,
        )
        began = time.monotonic()
        for device in devices:
            if self.stop.is_set():
                break
            device.agent.backfill(self.start_ms, self.end_ms)
        produced = wait_for_ingest(central.ingest.store, devices, timeout=120)
        central.ingest.upkeep.flush()  # the report below reads the rollups, not the readings
        for device in devices:
            device.agent.publish_health()  # what the dashboard shows as outbox backlog
        print(
            f"civicmesh demo: backfill done in {time.monotonic() - began:.1f} s, "
            f"{produced} readings stored",
            flush=True,
        )

    def write_report(self, api: ApiService) -> None:
        """Yesterday's city report, written by the language model from the fact sheet (or
        by the fixed templates, and said so, when the model is missing or wrong)."""
        report = api.reports.report("daily", None)
        api.store.save_report(to_record(report))
        source = report.narrative.source
        if report.narrative.fallback_reason:
            source += f" ({report.narrative.fallback_reason})"
        print(f"civicmesh demo: {report.text}\n  [narrative: {source}]", flush=True)

    def print_sign_in(self, url: str, password: str, tokens: dict[str, str]) -> None:
        """Printed as soon as the API listens: the dashboard fills in while the backfill
        streams, so nobody waits for the backfill and the report to learn how to sign in."""
        print(
            "civicmesh demo: API tokens (Authorization: Bearer ...): "
            + ", ".join(f"{role} {token}" for role, token in tokens.items()),
            flush=True,
        )
        print(
            f"civicmesh demo: ask: curl -s -X POST {url}/api/v1/ask "
            f"-H 'authorization: Bearer {tokens['viewer']}' -H 'content-type: "
            'application/json\' -d \'{"question": "How was NO2 across the city yesterday?"}\'',
            flush=True,
        )
        print(
            f"civicmesh demo: alerts: curl -s {url}/api/v1/alerts "
            f"-H 'authorization: Bearer {tokens['operator']}'",
            flush=True,
        )
        print(
            f"civicmesh demo: dashboard at {url}/dashboard/ (sign in as admin, operator or "
            f"viewer, password {password})",
            flush=True,
        )

    def stream_live(self, devices: list[DemoDevice]) -> None:
        interval, duration = self.args.live_interval, self.args.duration
        deadline = None if duration is None else time.monotonic() + duration
        while not self.stop.is_set() and (deadline is None or time.monotonic() < deadline):
            now = now_ms()
            for device in devices:
                device.agent.collect(now)
                device.agent.seal_all()
                device.agent.flush(timeout=10)
                device.agent.publish_health()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.stop.wait(interval if left is None else min(interval, left))

    def shut_down(self, store: Store, devices: list[DemoDevice]) -> None:
        print("civicmesh demo: shutting down, flushing outboxes ...", flush=True)
        for device in devices:
            device.agent.seal_all()
            device.agent.flush(timeout=10)
        stored = wait_for_ingest(store, devices, timeout=60)
        backlog = sum(d.agent.health()["outbox"]["sealed_batches"] for d in devices)
        counts = store.counts()
        print(
            f"civicmesh demo: stopped. {stored} readings in {counts.batches} batches stored, "
            f"{counts.quarantined} quarantined, {backlog} batches still in outboxes",
            flush=True,
        )

    def _install_signal_handlers(self) -> None:
        def handle(signum: int, frame: object) -> None:
            self.stop.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handle)
            signal.signal(signal.SIGTERM, handle)


def pilot_release(state: Path, seed: int) -> tuple[Path, str] | None:
    """The fault model as a signed release file, and the release key's public half.

    Trained once on a slice of the real data sets (about 10 s) and cached beside the
    state dir, keyed by the training code, so later demos start at once.
    """
    try:
        from civicmesh.protocol import encode_model_release
        from training.cli import manifest_for
        from training.errors import TrainingError
        from training.pipeline import build
    except ImportError as exc:
        print(f"civicmesh demo: no edge models ({exc}; install civicmesh[train])")
        return None
    code = hashlib.sha256()
    for package in ("edge", "training"):
        for path in sorted((Path(__file__).parents[1] / package).glob("*.py")):
            code.update(path.read_bytes())
    cache = state.parent / "models-cache" / code.hexdigest()[:12]
    try:
        if not (cache / "fault" / "card.json").exists():
            print("civicmesh demo: training the edge fault model (once) ...", flush=True)
            build("fault", cache, seed=0, small=True)
        manifest, artifact = manifest_for(cache / "fault", "1.0.0", ["pilot"], "0.1.0")
    except TrainingError as exc:
        print(f"civicmesh demo: no edge models ({exc})", flush=True)
        return None
    key = demo_signer(seed, "model-release")
    path = state / "fault-1.0.0.release"
    path.write_bytes(encode_model_release(key, manifest, artifact))
    return path, key.verify_key().to_text()


def wait_for_ingest(store: Store, devices: list[DemoDevice], timeout: float) -> int:
    """Wait until the store holds every batch the agents have sealed and every outbox
    has its receipts (flushing meanwhile, so what a receipt never named is re-sent)."""
    deadline = time.monotonic() + timeout
    expected = {d.signer.key_id: d.agent.health()["outbox"]["last_seq"] for d in devices}
    while time.monotonic() < deadline:
        status = {s.device_id: s.last_seq for s in store.devices()}
        stored = all((status.get(dev) or 0) >= (seq or 0) for dev, seq in expected.items())
        if stored and not any(d.agent.health()["outbox"]["sealed_batches"] for d in devices):
            break
        for device in devices:
            device.agent.flush(timeout=10)
        time.sleep(0.25)
    else:
        log.warning("ingest has not caught up after %.0f s; data stays queued", timeout)
    return int(store.counts().readings)


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def run_demo(args: argparse.Namespace) -> int:
    """``civicmesh demo`` (the options are in :mod:`demo.cli`)."""
    return Demo(args).run()
