"""`civicmesh demo` brings up the API with a backfilled week; every zone has every metric."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from civicmesh.metrics import METRICS

pytestmark = pytest.mark.slow


class _PatientTransport(httpx.HTTPTransport):
    """Waits out the API's rate limit (the demo keeps production's) instead of failing."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(50):
            response = super().handle_request(request)
            if response.status_code != 429:
                return response
            response.close()
            time.sleep(float(response.headers.get("retry-after", "1")))
        return response


def test_demo_backfills_a_week_for_20_devices_in_4_zones(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "civicmesh.cli",
            "demo",
            "--devices",
            "20",
            "--zones",
            "4",
            "--days",
            "7",
            "--duration",
            "60",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path / "d"),
            "--dashboard-password",
            "demo-password-1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    proc_closers: list[Callable[[], None]] = []
    try:
        url = None
        tokens: dict[str, str] = {}
        deadline = time.monotonic() + 400
        for line in proc.stdout:
            if "API tokens" in line:
                tokens = dict(re.findall(r"(viewer|operator|admin) (cm_\S+?)(?:,|$)", line))
            match = re.search(r"API at (http://\S+)/docs", line)
            if match:
                url = match.group(1)
                break
            assert time.monotonic() < deadline, "demo did not come up in time"
        assert url, "demo exited before serving the API"
        assert set(tokens) == {"viewer", "operator", "admin"}, tokens
        # the demo's API is production's: no token, no admin call
        refused = httpx.post(f"{url}/api/v1/admin/devices", json={}, timeout=30)
        assert refused.status_code == 401, refused.text
        api = httpx.Client(
            base_url=f"{url}/api/v1",
            timeout=30,
            headers={"authorization": f"Bearer {tokens['viewer']}"},
            transport=_PatientTransport(),
        )
        proc_closers.append(api.close)
        zones = [z["zone"] for z in api.get("/zones").json()]
        assert len(zones) == 4
        assert len(api.get("/devices").json()) == 20
        end = datetime.now(UTC)
        for zone in zones:
            for metric in METRICS:
                response = api.get(
                    "/series",
                    params={
                        "metric": metric.name,
                        "zone": zone,
                        "start": (end - timedelta(days=7)).isoformat(),
                        "end": end.isoformat(),
                        "bucket": 86_400,
                    },
                )
                assert response.status_code == 200, response.text
                points = response.json()["points"]
                # A week of daily buckets (the edges may be partial days).
                assert len(points) >= 7, (zone, metric.name, len(points))
                assert sum(p["count"] for p in points) > 0
        # the city's daily report was written at start-up, from the demo's own data
        stored = api.get("/reports", params={"scope": "city", "kind": "daily"}).json()
        assert len(stored) == 1 and stored[0]["ledger"]["batches"] > 0
        # written right after the backfill, from rollups brought up to date first: every
        # device's day is complete (a lagging rollup used to show a device "with gaps")
        facts = {f["id"]: f["value"] for f in stored[0]["facts"]}
        assert facts["devices.reporting"] == 20 and facts["devices.low_completeness"] == 0
        answer = api.post("/ask", json={"question": f"How was NO2 in {zones[0]} yesterday?"})
        assert answer.status_code == 200, answer.text
        assert "NO2" in answer.json()["text"] and answer.json()["facts"]
        # the dashboard: signed in, every device with its agent's relayed health report
        dash = httpx.Client(base_url=f"{url}/dashboard", timeout=30)
        proc_closers.append(dash.close)
        login = {"username": "viewer", "password": "demo-password-1"}
        assert dash.post("/auth/login", json=login).status_code == 200
        deadline = time.monotonic() + 20
        while True:
            rows = dash.get("/api/devices").json()
            if all(r["health"] is not None for r in rows) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(rows) == 20 and all(r["health"] is not None for r in rows)
        overview = dash.get("/api/overview").json()
        assert len(overview["zones"]["features"]) == 4
        assert all(f["geometry"] for f in overview["zones"]["features"])
    finally:
        for close in proc_closers:
            close()
        proc.terminate()
        proc.wait(120)
        proc.stdout.close()
    assert proc.returncode == 0
