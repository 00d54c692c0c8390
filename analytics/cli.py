"""``civicmesh ingest run``, ``civicmesh api run`` and ``civicmesh db migrate``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import Store, StoreError
from analytics.store.cli import add_db_status
from civicmesh.config import load_settings
from civicmesh.errors import ConfigError, MqttError
from civicmesh.mqtt import MqttLink
from civicmesh.registry import RegistryFile

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
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


def _refuse_unsafe(settings: AnalyticsSettings, *, serving_api: bool) -> None:
    problems = settings.production_problems(serving_api=serving_api)
    if problems:
        raise ConfigError(
            "environment is production, but: "
            + "; ".join(problems)
            + " (see the README's runbook; environment=development for a trial)"
        )


def _stop_event() -> threading.Event:
    """Set on SIGINT or SIGTERM."""
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def _migrated_store(settings: AnalyticsSettings, stop: threading.Event) -> Store | None:
    """Open, migrate and configure the store, waiting (with backoff) while the database
    is down."""
    delay = RETRY_MIN_S
    while not stop.is_set():
        store = open_store(
            settings.database_url,
            timescaledb=settings.storage.timescaledb,
            policy=settings.storage.policy(),
        )
        try:
            applied = store.migrate()
            store.configure(settings.storage.policy())
        except StoreError as exc:
            store.close()
            log.warning("store not ready (%s); retrying in %.1f s", exc, delay)
            stop.wait(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            continue
        if applied:
            log.info("migrations applied: %s", ", ".join(applied))
        return store
    return None


def _ingest_run(args: argparse.Namespace) -> int:
    from analytics.ingest import IngestWorker
    from analytics.upkeep import StoreUpkeep

    settings = _settings(args)
    _refuse_unsafe(settings, serving_api=False)
    stop = _stop_event()
    store = _migrated_store(settings, stop)
    if store is None:
        return 0
    worker_id = settings.ingest.worker_id
    link = MqttLink(
        settings.mqtt.url,
        settings.mqtt_client_id(worker_id),
        persistent=True,
        manual_ack=True,
        protocol=settings.mqtt.protocol,
        **settings.mqtt.tls_args(),
    )
    registry = RegistryFile(settings.registry_file)
    worker = IngestWorker(settings, store, registry, link, worker_id)
    upkeep = StoreUpkeep(store, settings.storage)
    upkeep.start()
    if args.metrics_port:
        from prometheus_client import start_http_server

        from analytics.metrics_export import metrics_registry

        start_http_server(args.metrics_port, "127.0.0.1", metrics_registry(worker.stats))
        log.info("Prometheus metrics at http://127.0.0.1:%d/metrics", args.metrics_port)
    try:
        delay = RETRY_MIN_S
        while not stop.is_set():
            try:
                worker.start()  # subscribes first, then connects: nothing queued is missed
                break
            except MqttError as exc:
                log.warning("broker not reachable (%s); retrying in %.1f s", exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        while not stop.wait(STATS_EVERY_S):
            log.info("ingest stats: %s", worker.stats())
    finally:
        worker.stop()
        upkeep.stop()
        link.close()
        store.close()
        log.info("ingest worker %s stopped: %s", worker_id, worker.stats())
    return 0


def _api_run(args: argparse.Namespace) -> int:
    import uvicorn

    from analytics.api import create_app
    from analytics.apiauth import ApiSecurity, RateLimiter, TokenFile
    from analytics.audit import AuditLoop, start_audit
    from analytics.dashboard.routes import from_settings as dashboard_from_settings
    from analytics.reports.cli import service_for
    from analytics.reports.service import ReportScheduler

    settings = _settings(args)
    _refuse_unsafe(settings, serving_api=True)
    store = open_store(
        settings.database_url,
        timescaledb=settings.storage.timescaledb,
        policy=settings.storage.policy(),
    )
    scheduler: ReportScheduler | None = None
    audit_loop: AuditLoop | None = None
    try:
        store.migrate()
        registry = RegistryFile(settings.registry_file) if settings.registry_file.exists() else None
        reports = service_for(settings, store)
        scheduler = None
        if settings.reports.schedule:
            scheduler = ReportScheduler(
                reports, settings.reports.schedule_interval_s, settings.reports.schedule_delay_s
            )
            scheduler.start()
        app = create_app(
            store,
            registry=registry,
            window_s=settings.reports.window_s,
            reports=reports,
            dashboard=dashboard_from_settings(settings, store, reports),
            security=ApiSecurity(
                TokenFile(settings.api.tokens_file) if settings.api.tokens_file else None,
                RateLimiter(settings.api.rate_per_s, settings.api.rate_burst),
            ),
            max_body_bytes=settings.api.max_body_bytes,
            cors_origins=tuple(settings.api.cors_origins),
        )
        audit_loop = start_audit(settings, store, app)  # checkpoints, cosignatures (issue 21)
        tls: dict[str, Any] = {}
        if settings.api.tls_cert is not None and settings.api.tls_key is not None:
            tls = {
                "ssl_certfile": str(settings.api.tls_cert),
                "ssl_keyfile": str(settings.api.tls_key),
            }
        uvicorn.run(app, host=settings.api.host, port=settings.api.port, log_level="info", **tls)
    finally:
        if scheduler is not None:
            scheduler.stop()
        if audit_loop is not None:
            audit_loop.stop()
        store.close()
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
