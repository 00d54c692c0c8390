"""`civicmesh demo` on a taken port: it says so in one line and serves on a free one."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_demo_moves_off_a_taken_port_and_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "civicmesh.cli", "demo", "--devices", "2", "--zones", "1",
             "--days", "0.05", "--duration", "5", "--port", str(port), "--state-dir",
             str(tmp_path / "d"), "--dashboard-password", "demo-password-1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            moved = url = None
            deadline = time.monotonic() + 300
            for line in proc.stdout:
                found = re.search(
                    rf"port {port} is taken; using (\d+) \(choose one with --port\)", line
                )
                moved = moved or (found and int(found.group(1)))
                match = re.search(r"API at (http://\S+)/docs", line)
                if match:
                    url = match.group(1)
                    break
                assert time.monotonic() < deadline, "demo did not come up in time"
            if url is None:
                proc.terminate()
                pytest.fail(f"no API line; stderr: {proc.communicate(timeout=60)[1][-3000:]}")
            assert moved and url == f"http://127.0.0.1:{moved}", (moved, url)
            assert httpx.get(f"{url}/dashboard/", timeout=30).status_code == 200
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err


def test_a_second_demo_on_a_running_demos_state_dir_refuses_and_wipes_nothing(
    tmp_path: Path,
) -> None:
    """A second demo started beside a running one used to delete the running demo's
    store, outboxes and credentials before it found the port taken."""
    import fcntl

    state = tmp_path / "d"
    state.mkdir()
    (state / "civicmesh.db").write_text("the running demo's store")
    # the lock a running demo holds (taken by this process, as a running demo would)
    with (tmp_path / ".d.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = subprocess.run(
            [sys.executable, "-m", "civicmesh.cli", "demo", "--port", "0", "--state-dir",
             str(state), "--duration", "1"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert second.returncode == 1, second.stdout + second.stderr
    assert "another demo is running with state dir" in second.stdout
    assert "Traceback" not in second.stderr, second.stderr
    assert (state / "civicmesh.db").read_text() == "the running demo's store"
