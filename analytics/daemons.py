"""``civicmesh reports schedule`` and ``civicmesh db upkeep``: the report scheduler and
the store upkeep as services of their own (``deploy/systemd/civicmesh-reports.service``,
``civicmesh-upkeep.service``), so a site runs one scheduler however many API processes
it has, and its rollups stay fresh while the ingest workers are down. Both speak
systemd's notify protocol: READY once the store is migrated, WATCHDOG while their
thread is alive."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import Store, StoreError
from civicmesh.systemd import Watchdog, notify

log = logging.getLogger(__name__)

SettingsOf = Callable[[argparse.Namespace], AnalyticsSettings]


def _stop_event() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def _store(settings: AnalyticsSettings, stop: threading.Event) -> Store | None:
    """The migrated store, waiting (with backoff) while the database is down."""
    delay = 0.5
    while not stop.is_set():
        store = open_store(settings.database_url, timescaledb=settings.storage.timescaledb)
        try:
            store.migrate()
            return store
        except StoreError as exc:
            store.close()
            log.warning("store not ready (%s); retrying in %.1f s", exc, delay)
            stop.wait(delay)
            delay = min(delay * 2, 10.0)
    return None


def _serve(thread_alive: Callable[[], bool], stop: threading.Event) -> None:
    notify("READY=1")
    watchdog = Watchdog()
    while not stop.wait(2.0):
        if thread_alive():  # a dead worker thread stops the ticks: systemd restarts us
            watchdog.tick()


def run_upkeep(settings: AnalyticsSettings, stop: threading.Event) -> int:
    from analytics.alerts.engine import build_engine
    from analytics.upkeep import StoreUpkeep

    store = _store(settings, stop)
    if store is None:
        return 0
    try:
        store.configure(settings.storage.policy())
        alerts = build_engine(settings.alerts)  # None without rules
        upkeep = StoreUpkeep(store, settings.storage, alerts, settings.alerts.interval_s)
        upkeep.start()
        print(f"store upkeep running on {store.backend}", flush=True)
        try:
            _serve(upkeep._thread.is_alive, stop)
        finally:
            upkeep.stop()
            log.info("upkeep stopped: %s", upkeep.stats())
    finally:
        store.close()
    return 0


def run_scheduler(settings: AnalyticsSettings, stop: threading.Event) -> int:
    from analytics.app import service_for
    from analytics.reports.service import ReportScheduler

    store = _store(settings, stop)
    if store is None:
        return 0
    try:
        r = settings.reports
        scheduler = ReportScheduler(
            service_for(settings, store), r.schedule_interval_s, r.schedule_delay_s
        )
        scheduler.start()
        print(f"report scheduler running (every {r.schedule_interval_s:.0f} s)", flush=True)
        try:
            _serve(scheduler.is_alive, stop)
        finally:
            scheduler.stop()
            scheduler.join(timeout=30)
            log.info("report scheduler stopped: %d reports written", scheduler.written)
    finally:
        store.close()
    return 0


def add_upkeep(db_cmds: argparse._SubParsersAction[argparse.ArgumentParser], common: Any,
               settings_of: SettingsOf) -> None:  # fmt: skip
    cmd = db_cmds.add_parser("upkeep", help="run store upkeep (rollups, partitions, retention)")
    common(cmd)
    cmd.set_defaults(func=lambda a: run_upkeep(settings_of(a), _stop_event()))


def add_schedule(report_cmds: argparse._SubParsersAction[argparse.ArgumentParser],
                 common: Any, settings_of: SettingsOf) -> None:  # fmt: skip
    cmd = report_cmds.add_parser("schedule", help="write reports as their periods end (service)")
    common(cmd)
    cmd.set_defaults(func=lambda a: run_scheduler(settings_of(a), _stop_event()))


def serve_api(app: Any, host: str, port: int, **options: Any) -> None:
    """Run ``app`` with uvicorn (HTTPS with ``ssl_certfile``/``ssl_keyfile``), telling
    systemd READY once it listens and feeding the watchdog while its event loop answers
    (a hung loop stops the ticks, and systemd restarts the API)."""
    import asyncio

    import uvicorn

    loop_box: list[asyncio.AbstractEventLoop] = []

    class NotifyingServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            loop_box.append(asyncio.get_running_loop())
            await super().startup(sockets=sockets)

    # Keep-alive clients must not hold a stop past the unit's TimeoutStopSec (30 s).
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10, **options
    )
    server = NotifyingServer(config)
    done = threading.Event()

    def feed() -> None:
        while not done.wait(0.2):
            if server.started:
                break
        if done.is_set():
            return
        notify("READY=1")
        watchdog = Watchdog()
        while not done.wait(2.0):
            try:
                asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop_box[0]).result(10)
            except (TimeoutError, RuntimeError):
                log.warning("the API's event loop did not answer within 10 s")
                continue
            watchdog.tick()

    feeder = threading.Thread(target=feed, name="api-watchdog", daemon=True)
    feeder.start()
    try:
        server.run()
    finally:
        done.set()
