"""First paint of the dashboard overview on demo-sized data, in Debian's Chromium.

The store holds what ``civicmesh demo`` backfills (20 devices in 4 zones, 7 days, one
reading per metric a minute), written as signed batches and rolled up. Each load is a
fresh page, signed in. The baseline, measured in the same run and browser, is a page
of the same server that draws nothing: the difference is the overview's own cost.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

LOADS = 7
PASSWORD = "bench-password-1"


def run(devices: int = 20, days: int = 7, step_ms: int = 60_000) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from analytics.app import build, serve_in_thread
    from analytics.dashboard.auth import UserFile
    from analytics.reports.service import generate_due
    from analytics.settings import AnalyticsSettings
    from analytics.store import open_store
    from civicmesh.config import load_settings
    from civicmesh.timeutil import now_ms
    from demo.history import fill_store
    from firmware_sim.city import SimulatedCity

    with tempfile.TemporaryDirectory(prefix="civicmesh-bench-dash-") as tmp_name:
        tmp = Path(tmp_name)
        store = open_store(f"sqlite:///{tmp / 'demo.db'}")
        store.migrate()
        city = SimulatedCity.generate(7, devices=devices, zones=4)
        end = now_ms()
        began = time.perf_counter()
        readings = fill_store(store, city, end - days * 86_400_000, end, step_ms=step_ms)
        fill_s = time.perf_counter() - began
        store.close()
        (tmp / "zones.geojson").write_text(json.dumps(city.zones_geojson()))
        UserFile(tmp / "users.json").add("viewer", "viewer", PASSWORD)
        # the API as `civicmesh api run` builds it; no language model (the overview
        # draws numbers, not prose), no tokens (the dashboard signs in with a session)
        settings = load_settings(
            AnalyticsSettings,
            None,
            {
                "database_url": f"sqlite:///{tmp / 'demo.db'}",
                "registry_file": str(tmp / "registry.json"),
                "reports": {"llm_backend": "none", "window_s": step_ms // 1000, "schedule": False},
                "dashboard": {
                    "users_file": str(tmp / "users.json"),
                    "zones_geojson": str(tmp / "zones.geojson"),
                },
            },
        )
        services = build(settings, roles=("api",))
        assert services is not None and services.api is not None
        generate_due(services.api.reports)
        serving = ExitStack()
        serving.enter_context(services)
        base = serving.enter_context(serve_in_thread(services.api.app, "127.0.0.1", 0))
        paint, ready, blank = [], [], []
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                    args=[
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--no-first-run",
                    ],
                )
                context = browser.new_context(viewport={"width": 1024, "height": 768})
                context.request.post(
                    f"{base}/dashboard/auth/login",
                    data={"username": "viewer", "password": PASSWORD},
                )
                for _ in range(LOADS):
                    page = context.new_page()
                    page.goto(f"{base}/dashboard/static/app.css")  # the baseline: no drawing
                    blank.append(page.evaluate("performance.now()"))
                    page.close()
                    page = context.new_page()
                    page.goto(f"{base}/dashboard/#/overview")
                    page.locator("path.zone").first.wait_for()
                    ready.append(page.evaluate("performance.now()"))
                    paint.append(
                        page.evaluate(
                            "performance.getEntriesByName('first-contentful-paint')[0]?.startTime"
                        )
                    )
                    page.close()
                browser.close()
        finally:
            serving.close()
    return {
        "readings": readings,
        "fill_s": round(fill_s, 1),
        "first_paint_ms_median": statistics.median(paint),
        "overview_ready_ms_median": statistics.median(ready),
        "baseline_ms_median": statistics.median(blank),
        "loads": LOADS,
    }
