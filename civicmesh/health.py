"""Agent health reports: what an edge agent says about itself, relayed to the centre.

Health is unsigned and informational (outbox backlog, model and agent version): it never
decides anything about readings, which carry their own signatures. The gateway relays a
report only for a registered, active device and wraps it with the device id it came from;
the centre keeps the newest one per device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from civicmesh.errors import CivicmeshError
from civicmesh.identity import is_valid_id

MAX_HEALTH_BYTES = 4096
# Bounds of every number a report carries: times as the wire protocol bounds them
# (2000-01-01 .. 2100-01-01), counters as the store's integer columns hold them.
MIN_TIME_MS = 946_684_800_000
MAX_TIME_MS = 4_102_444_800_000
MAX_COUNT = 2**31 - 1


class HealthError(CivicmeshError):
    reason = "health.invalid"


@dataclass(frozen=True, slots=True)
class HealthReport:
    device_id: str
    gateway_id: str
    received_at_ms: int  # gateway clock
    reported_ms: int  # agent clock
    outbox_batches: int
    outbox_readings: int
    model_version: str
    agent_version: str

    def to_relay(self) -> bytes:
        return json.dumps(
            {
                "device_id": self.device_id,
                "gateway_id": self.gateway_id,
                "received_at_ms": self.received_at_ms,
                "reported_ms": self.reported_ms,
                "outbox_batches": self.outbox_batches,
                "outbox_readings": self.outbox_readings,
                "model_version": self.model_version,
                "agent_version": self.agent_version,
            }
        ).encode()


def _obj(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_HEALTH_BYTES:
        raise HealthError(f"{what} of {len(payload)} bytes (at most {MAX_HEALTH_BYTES})")
    try:
        obj = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise HealthError(f"{what} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise HealthError(f"{what} is not a JSON object")
    return obj


def _int(obj: dict[str, Any], key: str, what: str, maximum: int = MAX_COUNT) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise HealthError(f"{what}: {key} must be an integer in [0, {maximum}]")
    return value


def _time(obj: dict[str, Any], key: str, what: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HealthError(f"{what}: {key} must be an integer time in ms")
    if not MIN_TIME_MS <= value <= MAX_TIME_MS:
        raise HealthError(f"{what}: {key} {value} is not a time between 2000 and 2100")
    return value


def _text(obj: dict[str, Any], key: str, what: str, limit: int = 64) -> str:
    value = obj.get(key, "")
    # isprintable() is False for NUL, control characters and lone surrogates
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise HealthError(f"{what}: {key} must be printable text of at most {limit} characters")
    return value


def from_agent(
    payload: bytes, device_id: str, gateway_id: str, received_at_ms: int
) -> HealthReport:
    """An agent's health message (``edge.agent.EdgeAgent.health``) as the gateway got it."""
    what = f"health of {device_id}"
    obj = _obj(payload, what)
    if obj.get("device_id") != device_id:
        raise HealthError(f"{what} names another device")
    outbox = obj.get("outbox")
    if not isinstance(outbox, dict):
        raise HealthError(f"{what}: outbox must be an object")
    return HealthReport(
        device_id,
        gateway_id,
        received_at_ms,
        _time(obj, "time_ms", what),
        _int(outbox, "sealed_batches", what),
        _int(outbox, "pending_readings", what),
        _text(obj, "model_version", what),
        _text(obj, "agent_version", what, 32),
    )


def from_relay(payload: bytes, gateway_id: str) -> HealthReport:
    """A report relayed by ``gateway_id`` (the topic's gateway must be the one named)."""
    what = f"health relayed by {gateway_id}"
    obj = _obj(payload, what)
    device_id = obj.get("device_id")
    if not isinstance(device_id, str) or not is_valid_id(device_id):
        raise HealthError(f"{what}: device_id is not a device id")
    if obj.get("gateway_id") != gateway_id:
        raise HealthError(f"{what} names another gateway")
    return HealthReport(
        device_id,
        gateway_id,
        _time(obj, "received_at_ms", what),
        _time(obj, "reported_ms", what),
        _int(obj, "outbox_batches", what),
        _int(obj, "outbox_readings", what),
        _text(obj, "model_version", what),
        _text(obj, "agent_version", what, 32),
    )
