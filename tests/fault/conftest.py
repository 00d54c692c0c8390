"""The fault suite's figures, printed in pytest's terminal summary (with or without -s),
so a CI log shows them."""

from __future__ import annotations

from typing import Any

import pytest

FIGURES = pytest.StashKey[list[dict[str, Any]]]()


@pytest.fixture
def fault_figures(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """Append one dict of figures per fault run; the summary prints them."""
    return request.config.stash.setdefault(FIGURES, [])


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    runs = config.stash.get(FIGURES, [])
    if not runs:
        return
    terminalreporter.section("fault suite figures")
    keys = ("run", "kills", "broker_restarts", "batches", "readings", "lost", "duplicated")
    keys += (
        "chain_breaks",
        "dropped_batches",
        "dropped_readings",
        "max_capped_outbox_readings",
        "seconds",
    )
    for run in runs:
        terminalreporter.write_line(" ".join(f"{k}={run.get(k)}" for k in keys if k in run))
    total = {
        k: sum(int(r.get(k, 0)) for r in runs)
        for k in ("kills", "broker_restarts", "batches", "lost", "duplicated", "chain_breaks")
    }
    terminalreporter.write_line(
        f"total: runs={len(runs)} " + " ".join(f"{k}={v}" for k, v in total.items())
    )
