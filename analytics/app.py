"""The composition root of the central service: settings in, running services out.

``civicmesh ingest run``, ``civicmesh api run``, the demo and the benchmarks all build
the central side here, so there is one wiring: the same store, the same report service,
the same API with its tokens, rate limits, body limit and reading window.

    services = build(settings, roles=("ingest", "api"))
    with services:            # starts ingest, upkeep and the report schedule
        ...                   # serve services.api (uvicorn) until told to stop
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from analytics.reports.llm import LlmBackend, LlmError
from analytics.reports.service import ReportScheduler, ReportService
from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import Store, StoreError
from civicmesh.errors import ConfigError, MqttError
from civicmesh.mqtt import MqttLink
from civicmesh.registry import RegistryFile

if TYPE_CHECKING:  # the ingest-only install path never imports the web stack
    from fastapi import FastAPI

    from analytics.audit import AuditLoop
    from analytics.ingest import IngestWorker
    from analytics.upkeep import StoreUpkeep

log = logging.getLogger(__name__)

Role = Literal["ingest", "api"]
ROLES: tuple[Role, ...] = ("ingest", "api")
RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0


def refuse_unsafe(settings: AnalyticsSettings, *, serving_api: bool) -> None:
    """Raise ConfigError when production settings still carry development defaults."""
    problems = settings.production_problems(serving_api=serving_api)
    if problems:
        raise ConfigError(
            "environment is production, but: "
            + "; ".join(problems)
            + " (see the README's runbook; environment=development for a trial)"
        )


def open_llm(settings: AnalyticsSettings) -> LlmBackend | None:
    """The configured model, or None (deterministic text, said so in every answer) when it
    cannot be loaded: a missing model must not stop the service."""
    try:
        return settings.reports.open_llm()
    except LlmError as exc:
        log.warning("no language model (%s): answers use the deterministic narrative", exc)
        return None


def service_for(settings: AnalyticsSettings, store: Store) -> ReportService:
    """The report service the settings describe, over ``store``."""
    r = settings.reports
    return ReportService(
        store,
        open_llm(settings),
        timezone=r.timezone,
        window_s=r.window_s,
        intent_mode=r.intent_mode,
    )


def migrated_store(
    settings: AnalyticsSettings, stop: threading.Event | None = None, *, configure: bool = True
) -> Store | None:
    """Open, migrate and configure the store; with ``stop``, wait (with backoff) while the
    database is down and return None if stopped first, else raise StoreError."""
    delay = RETRY_MIN_S
    while stop is None or not stop.is_set():
        store = open_store(
            settings.database_url,
            timescaledb=settings.storage.timescaledb,
            policy=settings.storage.policy(),
        )
        try:
            applied = store.migrate()
            if configure:
                store.configure(settings.storage.policy())
        except StoreError as exc:
            store.close()
            if stop is None:
                raise
            log.warning("store not ready (%s); retrying in %.1f s", exc, delay)
            stop.wait(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            continue
        if applied:
            log.info("migrations applied: %s", ", ".join(applied))
        return store
    return None


def ingest_link(settings: AnalyticsSettings, worker_id: str) -> MqttLink:
    """Persistent session and manual acknowledgement: nothing is acknowledged before the
    store committed it, and what arrives while the worker is away waits at the broker."""
    return MqttLink(
        settings.mqtt.url,
        settings.mqtt_client_id(worker_id),
        persistent=True,
        manual_ack=True,
        protocol=settings.mqtt.protocol,
        **settings.mqtt.tls_args(),
    )


def create_api(
    settings: AnalyticsSettings,
    store: Store,
    reports: ReportService,
    *,
    stats_provider: Callable[[], dict[str, object]] | None = None,
) -> FastAPI:
    """The HTTP API with the security, limits and window of ``settings``."""
    from analytics.api import create_app
    from analytics.apiauth import ApiSecurity, RateLimiter, TokenFile
    from analytics.dashboard.routes import from_settings as dashboard_from_settings

    registry = RegistryFile(settings.registry_file) if settings.registry_file.exists() else None
    api = settings.api
    return create_app(
        store,
        registry=registry,
        stats_provider=stats_provider,
        window_s=settings.reports.window_s,
        reports=reports,
        dashboard=dashboard_from_settings(settings, store, reports),
        security=ApiSecurity(
            TokenFile(api.tokens_file) if api.tokens_file else None,
            RateLimiter(api.rate_per_s, api.rate_burst),
        ),
        max_body_bytes=api.max_body_bytes,
        cors_origins=tuple(api.cors_origins),
        alerts_state_file=settings.alerts.state_file if settings.alerts.rules else None,
        alerts_public_url=settings.alerts.public_url,
    )


@dataclass
class IngestService:
    """One ingest worker with its own store connection, link and store upkeep."""

    store: Store
    link: MqttLink
    worker: IngestWorker
    upkeep: StoreUpkeep

    def start(self, stop: threading.Event | None = None) -> None:
        """Start upkeep and the worker; with ``stop``, retry while the broker is down."""
        self.upkeep.start()
        delay = RETRY_MIN_S
        while True:
            try:
                self.worker.start()  # subscribes first, then connects: nothing queued is missed
                return
            except MqttError as exc:
                if stop is None:
                    raise
                log.warning("broker not reachable (%s); retrying in %.1f s", exc, delay)
                if stop.wait(delay):
                    return
                delay = min(delay * 2, RETRY_MAX_S)

    def stop(self) -> None:
        self.worker.stop()
        self.upkeep.stop()
        self.link.close()


@dataclass
class ApiService:
    """The API application, its report service, the report schedule and the audit loop
    (checkpoints, cosignatures; when ``[audit] log_key`` is set), on their own store
    connection (the API's endpoints run in a thread pool)."""

    settings: AnalyticsSettings
    store: Store
    reports: ReportService
    app: FastAPI
    scheduler: ReportScheduler | None
    audit: AuditLoop | None = None

    def start(self) -> None:
        from analytics.audit import start_audit

        if self.scheduler is not None:
            self.scheduler.start()
        self.audit = start_audit(self.settings, self.store, self.app)

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.audit is not None:
            self.audit.stop()


@dataclass
class Services:
    """What :func:`build` made. A context manager: entering starts what runs in the
    background, leaving stops it and closes every store, in reverse order."""

    settings: AnalyticsSettings
    ingest: IngestService | None = None
    api: ApiService | None = None
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    def start(self, stop: threading.Event | None = None) -> None:
        # stop() is registered first: each is safe on a piece that never started
        if self.ingest is not None:
            self._stack.callback(self.ingest.stop)
            self.ingest.start(stop)
        if self.api is not None:
            self._stack.callback(self.api.stop)
            self.api.start()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Services:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def build(
    settings: AnalyticsSettings,
    *,
    roles: Collection[str] = ROLES,
    stop: threading.Event | None = None,
    worker_id: str | None = None,
) -> Services | None:
    """Build the central services of ``roles`` from ``settings`` (nothing is started).

    Each role gets its own migrated store connection. With ``stop``, waits while the
    database is down and returns None when stopped first.
    """
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; known: {', '.join(ROLES)}")
    services = Services(settings)
    try:
        if "ingest" in roles:
            store = migrated_store(settings, stop)
            if store is None:
                return None
            services._stack.callback(store.close)
            services.ingest = _ingest(settings, store, worker_id or settings.ingest.worker_id)
        if "api" in roles:
            store = migrated_store(settings, stop, configure=False)
            if store is None:
                services.close()
                return None
            services._stack.callback(store.close)
            services.api = _api(settings, store, services.ingest)
    except BaseException:
        services.close()
        raise
    return services


def _ingest(settings: AnalyticsSettings, store: Store, worker_id: str) -> IngestService:
    from analytics.alerts.engine import build_engine
    from analytics.ingest import IngestWorker
    from analytics.upkeep import StoreUpkeep

    alerts = build_engine(settings.alerts)  # None without rules
    link = ingest_link(settings, worker_id)
    registry = RegistryFile(settings.registry_file)
    worker = IngestWorker(settings, store, registry, link, worker_id)
    upkeep = StoreUpkeep(store, settings.storage, alerts, settings.alerts.interval_s)
    return IngestService(store, link, worker, upkeep)


def _api(settings: AnalyticsSettings, store: Store, ingest: IngestService | None) -> ApiService:
    reports = service_for(settings, store)
    app = create_api(
        settings, store, reports, stats_provider=ingest.worker.stats if ingest else None
    )
    scheduler = None
    if settings.reports.schedule:
        r = settings.reports
        scheduler = ReportScheduler(reports, r.schedule_interval_s, r.schedule_delay_s)
    return ApiService(settings, store, reports, app, scheduler)


@contextmanager
def serve_in_thread(app: FastAPI, host: str, port: int) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread; yields its URL (``port`` 0: any
    free one). ``civicmesh api run`` serves in the foreground instead."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ConfigError(f"API server did not start on {host}:{port} (port in use?)")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1] if port == 0 else port
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
