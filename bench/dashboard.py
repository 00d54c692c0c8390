"""First paint of the dashboard overview on demo-sized data, in Debian's Chromium.

The store holds what ``civicmesh demo`` backfills (20 devices in 4 zones, 7 days, one
reading per metric a minute), written as signed batches and rolled up. Each load is a
fresh page, signed in. The baseline, measured in the same run and browser, is a page
of the same server that draws nothing: the difference is the overview's own cost.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

LOADS = 7
PASSWORD = "bench-password-1"


def run(devices: int = 20, days: int = 7, step_ms: int = 60_000) -> dict[str, Any]:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from analytics.api import create_app
    from analytics.dashboard.auth import SessionSigner, UserFile
    from analytics.dashboard.routes import Dashboard, seed_zone_shapes
    from analytics.reports.service import ReportService, generate_due
    from analytics.store import open_store
    from civicmesh.simhistory import fill_store
    from civicmesh.timeutil import now_ms
    from firmware_sim.city import SimulatedCity
    from tests.support.net import free_port, wait_for_port

    with tempfile.TemporaryDirectory(prefix="civicmesh-bench-dash-") as tmp_name:
        tmp = Path(tmp_name)
        store = open_store(f"sqlite:///{tmp / 'demo.db'}")
        store.migrate()
        city = SimulatedCity.generate(7, devices=devices, zones=4)
        end = now_ms()
        began = time.perf_counter()
        readings = fill_store(store, city, end - days * 86_400_000, end, step_ms=step_ms)
        fill_s = time.perf_counter() - began
        (tmp / "zones.geojson").write_text(__import__("json").dumps(city.zones_geojson()))
        seed_zone_shapes(store, tmp / "zones.geojson")
        users = UserFile(tmp / "users.json")
        users.add("viewer", "viewer", PASSWORD)
        reports = ReportService(store, None, timezone="UTC", window_s=step_ms // 1000)
        generate_due(reports)
        dashboard = Dashboard(store, reports, users, SessionSigner(None), window_s=step_ms // 1000)
        app = create_app(store, reports=reports, dashboard=dashboard)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for_port(port, 20)
        base = f"http://127.0.0.1:{port}"
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
            server.should_exit = True
            thread.join(10)
            store.close()
    return {
        "readings": readings,
        "fill_s": round(fill_s, 1),
        "first_paint_ms_median": statistics.median(paint),
        "overview_ready_ms_median": statistics.median(ready),
        "baseline_ms_median": statistics.median(blank),
        "loads": LOADS,
    }
