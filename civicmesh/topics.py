"""MQTT topic names, protocol version 1. Build and parse topics only here."""

from __future__ import annotations

from civicmesh.identity import is_valid_id

ROOT = "civicmesh/v1"
SHARED_GROUP = "civicmesh-ingest"


def device_up(device_id: str) -> str:
    """Device -> gateway: signed batches."""
    _check(device_id)
    return f"{ROOT}/dev/{device_id}/up"


def device_cmd(device_id: str) -> str:
    _check(device_id)
    return f"{ROOT}/dev/{device_id}/cmd"


def device_receipt(device_id: str) -> str:
    """Gateway -> device: digests of the batches the gateway has buffered."""
    _check(device_id)
    return f"{ROOT}/dev/{device_id}/receipt"


def device_health(device_id: str) -> str:
    _check(device_id)
    return f"{ROOT}/dev/{device_id}/health"


def gateway_health(gateway_id: str) -> str:
    """Gateway -> central: its devices' health reports, relayed (unsigned, informational)."""
    _check(gateway_id)
    return f"{ROOT}/gw/{gateway_id}/health"


def _id_of(topic: str, kind: str, leaf: str) -> str | None:
    """The id in ``{ROOT}/{kind}/{id}/{leaf}``; None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != ROOT or (parts[2], parts[4]) != (kind, leaf):
        return None
    return parts[3] if is_valid_id(parts[3]) else None


def device_from_health_topic(topic: str) -> str | None:
    """The device id of a device health topic; None for anything else."""
    return _id_of(topic, "dev", "health")


def gateway_from_health_topic(topic: str) -> str | None:
    """The gateway id of a gateway health topic; None for anything else."""
    return _id_of(topic, "gw", "health")


def gateway_up(gateway_id: str) -> str:
    """Gateway -> central: countersigned envelopes."""
    _check(gateway_id)
    return f"{ROOT}/gw/{gateway_id}/up"


def gateway_receipt(gateway_id: str) -> str:
    """Central -> gateway: digests of the messages ingest has committed."""
    _check(gateway_id)
    return f"{ROOT}/gw/{gateway_id}/receipt"


def gateway_from_topic(topic: str) -> str | None:
    """The gateway id of a gateway uplink or gateway quarantine topic; None otherwise."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != ROOT:
        return None
    if (parts[2], parts[4]) == ("gw", "up"):
        ident = parts[3]
    elif parts[2:4] == ["quarantine", "gw"]:
        ident = parts[4]
    else:
        return None
    return ident if is_valid_id(ident) else None


REGISTRY_SNAPSHOT = f"{ROOT}/registry"  # retained: the signed registry for gateways


def model_release(group: str, name: str) -> str:
    """Central -> devices, retained: the signed release of model ``name`` for one device
    group (staged rollout: a release reaches the groups it is published to, no others)."""
    _check_label(group, "device group")
    _check_label(name, "model name")
    return f"{ROOT}/models/{group}/{name}"


def model_releases(group: str) -> str:
    """The filter a device of ``group`` subscribes to."""
    _check_label(group, "device group")
    return f"{ROOT}/models/{group}/+"


def _check_label(value: str, what: str) -> None:
    if not (
        isinstance(value, str)
        and 0 < len(value) <= 32
        and all(c.isascii() and (c.isalnum() or c in "-_.") for c in value)
    ):
        raise ValueError(f"Invalid {what} {value!r}: 1-32 of a-z, A-Z, 0-9, '-', '_', '.'")


def quarantine(source: str, source_id: str) -> str:
    """Where a component publishes what it rejected (``source`` is "gw" or "ingest")."""
    return f"{ROOT}/quarantine/{source}/{source_id}"


ALL_DEVICE_UP = f"{ROOT}/dev/+/up"
ALL_DEVICE_HEALTH = f"{ROOT}/dev/+/health"
ALL_GATEWAY_HEALTH = f"{ROOT}/gw/+/health"
ALL_GATEWAY_UP = f"{ROOT}/gw/+/up"
ALL_QUARANTINE = f"{ROOT}/quarantine/#"


def shared(topic_filter: str, group: str = SHARED_GROUP) -> str:
    """MQTT 5 shared subscription filter: the broker spreads messages over the group."""
    return f"$share/{group}/{topic_filter}"


def id_from_up_topic(topic: str) -> tuple[str, str] | None:
    """``("dev", id)`` or ``("gw", id)`` for an uplink topic; None for anything else."""
    parts = topic.split("/")
    if len(parts) == 5 and f"{parts[0]}/{parts[1]}" == ROOT and parts[4] == "up":
        kind, ident = parts[2], parts[3]
        if kind in ("dev", "gw"):
            return kind, ident
    return None


def _check(ident: str) -> None:
    if not is_valid_id(ident):
        raise ValueError(f"Invalid topic id: {ident!r}")
