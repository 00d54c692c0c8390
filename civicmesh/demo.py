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
import hashlib
import json
import logging
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from civicmesh.identity import Ed25519Signer
from civicmesh.mqtt import MqttLink
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry, RegistryFile
from civicmesh.timeutil import now_ms

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
# The embedded broker keeps nothing over a restart: re-send what has no receipt soon.
DEMO_RESEND_AFTER_S = 20.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on embedded defaults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--devices", type=int, default=20, help="simulated devices (default 20)")
    demo.add_argument("--zones", type=int, default=4, help="city zones (default 4)")
    demo.add_argument("--seed", type=int, default=7, help="simulation seed (default 7)")
    demo.add_argument(
        "--dashboard-password",
        help="password of the demo's admin, operator and viewer users (default: random)",
    )
    demo.add_argument("--days", type=float, default=7.0, help="days to backfill (default 7)")
    demo.add_argument(
        "--duration", type=float, default=None, help="seconds to stream live after the backfill"
    )
    demo.add_argument("--mqtt-url", help="use this MQTT broker instead of the embedded one")
    demo.add_argument("--database-url", help="postgresql://... instead of the embedded store")
    demo.add_argument("--host", default="127.0.0.1", help="API bind address (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8080, help="API port (default 8080; 0 = any)")
    demo.add_argument(
        "--state-dir", type=Path, default=Path("var/demo"), help="where outboxes and keys live"
    )
    demo.add_argument(
        "--keep-state", action="store_true", help="reuse the state dir instead of starting fresh"
    )
    demo.add_argument(
        "--live-interval", type=float, default=5.0, help="seconds between live publishes"
    )
    demo.add_argument(
        "--no-models",
        action="store_true",
        help="no edge models (default: the first zone's devices run the fault model, "
        "trained once on a slice of the real data and installed as a signed release)",
    )
    demo.set_defaults(func=run_demo)


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
    agent: Any  # edge.agent.EdgeAgent


class Demo:
    """Wires the components together; each piece is started in order and stopped in reverse."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.state = Path(args.state_dir).resolve()

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

    def city(self) -> Any:
        from firmware_sim.city import SimulatedCity

        return SimulatedCity.generate(
            self.args.seed, devices=self.args.devices, zones=self.args.zones
        )

    def write_registry(self, city: Any, gateway: Ed25519Signer) -> Path:
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

    # ------------------------------------------------------------- run

    def run(self) -> int:
        args = self.args
        if self.state.exists() and not args.keep_state:
            shutil.rmtree(self.state)
        self.state.mkdir(parents=True, exist_ok=True)
        database_url = args.database_url or f"sqlite:///{self.state / 'civicmesh.db'}"

        from analytics.api import create_app
        from analytics.dashboard.auth import UserFile
        from analytics.dashboard.routes import from_settings as dashboard_from_settings
        from analytics.ingest import IngestWorker
        from analytics.reports.cli import service_for
        from analytics.reports.service import to_record
        from analytics.settings import AnalyticsSettings
        from analytics.store import open_store
        from analytics.upkeep import StoreUpkeep
        from civicmesh.config import load_settings
        from civicmesh.drivers import load_driver
        from edge.agent import EdgeAgent, SystemClock
        from edge.settings import EdgeSettings
        from gateway.relay import Gateway
        from gateway.settings import GatewaySettings

        city = self.city()
        gateway_signer = demo_signer(args.seed, "gateway")
        registry_path = self.write_registry(city, gateway_signer)
        registry = RegistryFile(registry_path)

        with ExitStack() as stack:
            mqtt_url = stack.enter_context(self.broker())
            print(f"civicmesh demo: broker {mqtt_url}, store {_redact(database_url)}", flush=True)

            store = open_store(database_url)
            stack.callback(store.close)
            applied = store.migrate()
            if applied:
                log.info("migrations applied: %s", ", ".join(applied))

            # Ingest: persistent session + manual ack, so nothing is acknowledged before commit.
            analytics_settings = load_settings(
                AnalyticsSettings,
                None,
                {
                    "database_url": database_url,
                    "registry_file": str(registry_path),
                    "mqtt": {"url": mqtt_url},
                    # Its own group: on a shared broker (--mqtt-url) the demo's persistent
                    # session must never take a share of a real ingest's messages.
                    "ingest": {"shared_group": "civicmesh-demo"},
                    "dashboard": {
                        "users_file": str(self.state / "dashboard-users.json"),
                        "zones_geojson": str(self.state / "zones.geojson"),
                    },
                },
            )
            (self.state / "zones.geojson").write_text(json.dumps(city.zones_geojson()))
            password = args.dashboard_password or secrets.token_urlsafe(9)
            users = UserFile(self.state / "dashboard-users.json")
            for role in ("admin", "operator", "viewer"):
                users.add(role, role, password)
            ingest_link = MqttLink(
                mqtt_url, "civicmesh-demo-ingest", persistent=True, manual_ack=True
            )
            ingest_link.connect()
            stack.callback(ingest_link.close)
            ingest = IngestWorker(analytics_settings, store, registry, ingest_link, "demo")
            ingest.start()
            stack.callback(ingest.stop)
            upkeep = StoreUpkeep(store, analytics_settings.storage)
            upkeep.start()
            stack.callback(upkeep.stop)

            # Gateway: verifies and countersigns; device side and upstream share the broker.
            gateway_settings = load_settings(
                GatewaySettings,
                None,
                {
                    "key_file": str(self.state / "gateway.key"),
                    "registry_file": str(registry_path),
                    "state_dir": str(self.state / "gateway"),
                    "device_mqtt": {"url": mqtt_url},
                    "upstream_mqtt": {"url": mqtt_url},
                    "resend_after_s": DEMO_RESEND_AFTER_S,
                },
            )
            gw_device_link = MqttLink(
                mqtt_url, "civicmesh-demo-gw-dev", persistent=True, manual_ack=True
            )
            gw_device_link.connect()
            stack.callback(gw_device_link.close)
            gw_up_link = MqttLink(mqtt_url, "civicmesh-demo-gw-up")
            gw_up_link.connect()
            stack.callback(gw_up_link.close)
            gateway = Gateway(
                gateway_settings, gateway_signer, registry, gw_device_link, gw_up_link
            )
            gateway.start()
            stack.callback(gateway.stop)

            # API on a background uvicorn server.
            api_store = open_store(database_url)
            stack.callback(api_store.close)
            reports = service_for(analytics_settings, api_store)
            app = create_app(
                api_store,
                registry=registry,
                stats_provider=ingest.stats,
                reports=reports,
                dashboard=dashboard_from_settings(analytics_settings, api_store, reports),
            )
            url = stack.enter_context(_serve(app, args.host, args.port))

            # Edge: one agent per simulated device, sharing one MQTT connection.
            edge_link = MqttLink(mqtt_url, "civicmesh-demo-edge")
            edge_link.connect()
            stack.callback(edge_link.close)
            end = now_ms()
            start = end - int(args.days * DAY_MS)
            pilot_zone = sorted(d.zone for d in city.devices)[0]
            release = None if args.no_models else self._pilot_release()
            devices = []
            for device in city.devices:
                signer = demo_signer(args.seed, device.name)
                options = dict(device.driver_options, start_ms=start)
                settings = load_settings(
                    EdgeSettings,
                    None,
                    {
                        "key_file": str(self.state / "devices" / f"{device.name}.key"),
                        "state_dir": str(self.state / "devices" / device.name),
                        "mqtt": {"url": mqtt_url},
                        "driver": {"name": "sim", "options": options},
                        "resend_after_s": DEMO_RESEND_AFTER_S,
                        "models": {
                            "enabled": release is not None and device.zone == pilot_zone,
                            "group": "pilot",
                            "sensor_types": ["sim"],
                            "release_keys": [release[1]] if release else [],
                            "install": [str(release[0])] if release else [],
                        },
                    },
                )
                agent = EdgeAgent(
                    settings, signer, load_driver("sim", options), edge_link, SystemClock()
                )
                devices.append(DemoDevice(device.name, device.zone, signer, agent))

            if release is not None:
                pilots = [d for d in devices if d.agent.model_version]
                print(
                    f"civicmesh demo: {len(pilots)} devices in zone {pilot_zone} run "
                    f"{pilots[0].agent.model_version if pilots else 'no model'} "
                    "(signed release, verified on each device)",
                    flush=True,
                )
            self._install_signal_handlers()
            print(
                f"civicmesh demo: {len(devices)} devices in {len(city.zones)} zones; "
                f"backfilling {args.days:g} simulated days ...",
                flush=True,
            )
            began = time.monotonic()
            for device in devices:
                if self.stop.is_set():
                    break
                device.agent.backfill(start, end)
            produced = self._wait_for_ingest(store, devices, timeout=120)
            upkeep.flush()  # the report below reads the rollups, not the readings
            for device in devices:
                device.agent.publish_health()  # what the dashboard shows as outbox backlog
            print(
                f"civicmesh demo: backfill done in {time.monotonic() - began:.1f} s, "
                f"{produced} readings stored",
                flush=True,
            )
            # Yesterday's city report, written by the language model from the fact sheet
            # (or by the fixed templates, and said so, when the model is missing or wrong).
            report = reports.report("daily", None)
            api_store.save_report(to_record(report))
            source = report.narrative.source
            if report.narrative.fallback_reason:
                source += f" ({report.narrative.fallback_reason})"
            print(f"civicmesh demo: {report.text}\n  [narrative: {source}]", flush=True)
            print(
                f"civicmesh demo: ask: curl -s -X POST {url}/api/v1/ask -H 'content-type: "
                'application/json\' -d \'{"question": "How was NO2 across the city yesterday?"}\'',
                flush=True,
            )
            print(
                f"civicmesh demo: dashboard at {url}/dashboard/ (sign in as admin, operator or "
                f"viewer, password {password})",
                flush=True,
            )
            print(f"civicmesh demo: API at {url}/docs  (Ctrl-C to stop)", flush=True)

            deadline = None if args.duration is None else time.monotonic() + args.duration
            while not self.stop.is_set() and (deadline is None or time.monotonic() < deadline):
                now = now_ms()
                for device in devices:
                    device.agent.collect(now)
                    device.agent.seal_all()
                    device.agent.flush(timeout=10)
                    device.agent.publish_health()
                self.stop.wait(
                    args.live_interval
                    if deadline is None
                    else min(args.live_interval, max(0.0, deadline - time.monotonic()))
                )

            print("civicmesh demo: shutting down, flushing outboxes ...", flush=True)
            for device in devices:
                device.agent.seal_all()
                device.agent.flush(timeout=10)
            stored = self._wait_for_ingest(store, devices, timeout=60)
            backlog = sum(d.agent.health()["outbox"]["sealed_batches"] for d in devices)
            counts = store.counts()
            print(
                f"civicmesh demo: stopped. {stored} readings in {counts.batches} batches stored, "
                f"{counts.quarantined} quarantined, {backlog} batches still in outboxes",
                flush=True,
            )
        return 0

    def _pilot_release(self) -> tuple[Path, str] | None:
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
        cache = self.state.parent / "models-cache" / code.hexdigest()[:12]
        try:
            if not (cache / "fault" / "card.json").exists():
                print("civicmesh demo: training the edge fault model (once) ...", flush=True)
                build("fault", cache, seed=0, small=True)
            manifest, artifact = manifest_for(cache / "fault", "1.0.0", ["pilot"], "0.1.0")
        except TrainingError as exc:
            print(f"civicmesh demo: no edge models ({exc})", flush=True)
            return None
        key = demo_signer(self.args.seed, "model-release")
        path = self.state / "fault-1.0.0.release"
        path.write_bytes(encode_model_release(key, manifest, artifact))
        return path, key.verify_key().to_text()

    def _wait_for_ingest(self, store: Any, devices: list[DemoDevice], timeout: float) -> int:
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

    def _install_signal_handlers(self) -> None:
        def handle(signum: int, frame: object) -> None:
            self.stop.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handle)
            signal.signal(signal.SIGTERM, handle)


@contextmanager
def _serve(app: Any, host: str, port: int) -> Iterator[str]:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"API server did not start on {host}:{port} (port in use?)")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1] if port == 0 else port
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def run_demo(args: argparse.Namespace) -> int:
    return Demo(args).run()
