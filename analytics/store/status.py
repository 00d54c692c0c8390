"""``civicmesh db status``: what the store is and how its upkeep is doing.

On TimescaleDB: chunks, compression ratio, every policy (compression, retention per
level, continuous-aggregate refresh) with its settings, when it last ran, with what
result, and its visible effect. TimescaleDB 2.28.x records every background job run as
failed with ``cannot drop portal "" while it is being set up`` although the work commits
(an upstream bug in its job runner), so the report shows each policy's effect next to the
recorded result: judge a policy by its effect.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

PORTAL_BUG = 'cannot drop portal "" while it is being set up'
PORTAL_NOTE = (
    "note: TimescaleDB 2.28.x records background job runs as failed with "
    f"'{PORTAL_BUG}' while their work commits (an upstream bug in its job runner): "
    "judge each policy by its effect (chunks compressed or dropped, aggregates "
    "materialized), not by its recorded result alone"
)


def _when(value: datetime | None) -> str:
    return "never" if value is None else value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def format_status(status: dict[str, Any]) -> str:
    """The report ``status()`` of a store describes, as text for a terminal."""
    lines = [f"store path: {status['backend']}"]
    if "schema_version" in status:
        lines.append(f"schema: version {status['schema_version']} ({status['schema_name']})")
    counts = status.get("counts")
    if counts:
        lines.append(
            f"ledger: {counts['batches']} batches, {counts['readings']} readings, "
            f"{counts['quarantined']} quarantined"
        )
    for warning in status.get("warnings", []):
        lines.append(f"warning: {warning}")
    if status["backend"] == "postgresql":
        parts = status.get("partitions", [])
        lines.append(
            f"readings partitions: {len(parts)}"
            + (f" ({parts[0]} .. {parts[-1]})" if parts else "")
        )
    horizons = status.get("retention_horizons") or {}
    if horizons:
        lines.append(
            "retention has dropped data before: "
            + ", ".join(f"{rel} {_when(ts)}" for rel, ts in sorted(horizons.items()))
        )
    ts = status.get("timescaledb")
    if ts:
        lines += _format_timescaledb(ts)
    return "\n".join(lines)


def _format_timescaledb(ts: dict[str, Any]) -> list[str]:
    lines = [
        f"TimescaleDB {ts['version']} (extension in schema {ts['schema']}, "
        f"preloaded: {'yes' if ts['preloaded'] else 'NO'})"
    ]
    for hyper in ts["hypertables"]:
        line = (
            f"  {hyper['name']}: {hyper['chunks']} chunks, {hyper['compressed_chunks']} "
            f"compressed, {_size(hyper['total_bytes'])}"
        )
        before, after = hyper.get("before_compression_bytes"), hyper.get("after_compression_bytes")
        if before and after:
            line += (
                f"; compressed chunks {_size(before)} -> {_size(after)} "
                f"(ratio {before / after:.1f}x)"
            )
        if hyper.get("oldest_chunk") is not None:
            line += f"; oldest chunk from {_when(hyper['oldest_chunk'])}"
        lines.append(line)
    lines.append("policies:")
    if not ts["jobs"]:
        lines.append("  none")
    for job in ts["jobs"]:
        config = ", ".join(f"{k}={v}" for k, v in sorted(job["config"].items()))
        lines.append(
            f"  job {job['job_id']} {job['kind']} on {job['relation']} ({config}), "
            f"every {job['schedule_interval']}"
        )
        result = job["last_run_status"] or "no run recorded"
        if job.get("last_error"):
            result += f" ({job['last_error']})"
        lines.append(
            f"    last run {_when(job['last_run_started_at'])}: {result}; "
            f"runs {job['total_runs'] or 0}, recorded failures {job['total_failures'] or 0}; "
            f"next {_when(job['next_start'])}"
        )
        if job.get("effect"):
            lines.append(f"    effect: {job['effect']}")
    lines.append(PORTAL_NOTE)
    return lines


def print_status(status: dict[str, Any], *, as_json: bool, out: Callable[[str], Any]) -> None:
    if as_json:
        out(json.dumps(status, default=str, indent=2, sort_keys=True))
    else:
        out(format_status(status))
