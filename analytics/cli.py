"""``civicmesh ingest run``, ``civicmesh api run`` and ``civicmesh db migrate``.

The commands parse options into settings; :mod:`analytics.app` builds the services.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from analytics.app import build, refuse_unsafe
from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.cli import add_db_status
from civicmesh.config import load_settings
from civicmesh.systemd import Watchdog, notify

log = logging.getLogger(__name__)

STATS_EVERY_S = 60.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``ingest``, ``api`` and ``db`` command groups."""
    ingest = sub.add_parser("ingest", help="central ingest worker (MQTT -> store)")
    ingest_cmds = ingest.add_subparsers(dest="ingest_command", metavar="ACTION", required=True)
    run = ingest_cmds.add_parser("run", help="verify and store batches until SIGINT/SIGTERM")
    _common(run)
    run.add_argument("--mqtt-url", help="broker URL (overrides mqtt.url)")
    run.add_argument("--worker-id", help="stable worker name (overrides ingest.worker_id)")
    run.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics (off by default)",
    )
    run.set_defaults(func=_ingest_run)

    api = sub.add_parser("api", help="HTTP API of the central service")
    api_cmds = api.add_subparsers(dest="api_command", metavar="ACTION", required=True)
    serve = api_cmds.add_parser("run", help="serve the API with uvicorn")
    _common(serve)
    serve.add_argument("--host", help="listen address (overrides api.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides api.port)")
    serve.set_defaults(func=_api_run)
    token = api_cmds.add_parser("add-token", help="make an API token (printed once)")
    token.add_argument("--file", type=Path, required=True, help="tokens file (api.tokens_file)")
    token.add_argument("--name", required=True, help="who or what uses it")
    token.add_argument("--role", choices=("viewer", "operator", "admin"), default="viewer")
    token.set_defaults(func=_add_token)
    revoke = api_cmds.add_parser("revoke-token", help="revoke a token by name")
    revoke.add_argument("--file", type=Path, required=True)
    revoke.add_argument("--name", required=True)
    revoke.set_defaults(func=_revoke_token)

    db = sub.add_parser("db", help="central store maintenance")
    db_cmds = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    migrate = db_cmds.add_parser("migrate", help="apply pending store migrations")
    _common(migrate)
    migrate.add_argument(
        "--dry-run", action="store_true", help="list what would change; change nothing"
    )
    migrate.set_defaults(func=_db_migrate)
    from analytics.backup import add_commands

    add_commands(db_cmds, _common, _settings)
    add_db_status(db_cmds, _common, _settings)
    from analytics.daemons import add_upkeep

    add_upkeep(db_cmds, _common, _settings)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (optional)")
    parser.add_argument("--database-url", help="store URL (overrides database_url)")


def _settings(args: argparse.Namespace) -> AnalyticsSettings:
    overrides: dict[str, Any] = {}
    if args.database_url:
        overrides["database_url"] = args.database_url
    if getattr(args, "mqtt_url", None):
        overrides["mqtt"] = {"url": args.mqtt_url}
    if getattr(args, "worker_id", None):
        overrides["ingest"] = {"worker_id": args.worker_id}
    api: dict[str, Any] = {}
    if getattr(args, "host", None):
        api["host"] = args.host
    if getattr(args, "port", None) is not None:
        api["port"] = args.port
    if api:
        overrides["api"] = api
    return load_settings(AnalyticsSettings, args.config, overrides)


def _stop_event() -> threading.Event:
    """Set on SIGINT or SIGTERM."""
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def _ingest_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    refuse_unsafe(settings, serving_api=False)
    stop = _stop_event()
    services = build(settings, roles=("ingest",), stop=stop)
    if services is None or services.ingest is None:
        return 0
    ingest = services.ingest
    if args.metrics_port:
        from prometheus_client import start_http_server

        from analytics.metrics_export import metrics_registry

        start_http_server(args.metrics_port, "127.0.0.1", metrics_registry(ingest.worker.stats))
        log.info("Prometheus metrics at http://127.0.0.1:%d/metrics", args.metrics_port)
    try:
        services.start(stop)
        notify("READY=1")
        watchdog = Watchdog()
        next_stats = time.monotonic() + STATS_EVERY_S
        while not stop.wait(2.0):
            watchdog.tick()
            if time.monotonic() >= next_stats:
                next_stats += STATS_EVERY_S
                log.info("ingest stats: %s", ingest.worker.stats())
    finally:
        services.close()
        log.info("ingest worker %s stopped: %s", ingest.worker.worker_id, ingest.worker.stats())
    return 0


def _api_run(args: argparse.Namespace) -> int:
    from analytics.daemons import serve_api

    settings = _settings(args)
    refuse_unsafe(settings, serving_api=True)
    services = build(settings, roles=("api",))
    if services is None or services.api is None:  # only a stop event makes build() give up
        return 1
    tls: dict[str, Any] = {}
    if settings.api.tls_cert is not None and settings.api.tls_key is not None:
        tls = {"ssl_certfile": str(settings.api.tls_cert), "ssl_keyfile": str(settings.api.tls_key)}
    with services:
        serve_api(services.api.app, settings.api.host, settings.api.port, **tls)
    return 0


def _add_token(args: argparse.Namespace) -> int:
    from analytics.apiauth import TokenFile

    token = TokenFile(args.file).add(args.name, args.role)
    print(token)
    print(f"(token of {args.name}, role {args.role}: shown once, kept as a hash)", file=sys.stderr)
    return 0


def _revoke_token(args: argparse.Namespace) -> int:
    from analytics.apiauth import TokenFile

    if not TokenFile(args.file).revoke(args.name):
        print(f"no token named {args.name!r}", file=sys.stderr)
        return 1
    return 0


def _db_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.dry_run:
        from analytics.backup import pending_migrations

        backend, pending = pending_migrations(settings)
        for name, summary in pending:
            print(f"would apply {name}: {summary}" if summary else f"would apply {name}")
        print(f"store path: {backend}; {len(pending)} migration(s) pending")
        return 0
    store = open_store(
        settings.database_url,
        timescaledb=settings.storage.timescaledb,
        policy=settings.storage.policy(),
    )
    try:
        applied = store.migrate()
        store.configure(settings.storage.policy())
        print(f"store path: {store.backend}")
    finally:
        store.close()
    print("applied: " + ", ".join(applied) if applied else "store is up to date")
    return 0
