"""``civicmesh registry``: manage the device/gateway registry file by hand."""

from __future__ import annotations

import argparse
import base64
import time
from datetime import datetime
from pathlib import Path

from civicmesh import topics
from civicmesh.errors import RegistryError
from civicmesh.identity import Ed25519Signer, VerifyKey, derive_id
from civicmesh.mqtt import MqttLink
from civicmesh.protocol import ProtocolError, encode_registry_snapshot
from civicmesh.registry import (
    IMPORT_KIND,
    DeviceRecord,
    GatewayRecord,
    Registry,
    check_valid_from,
)
from civicmesh.timeutil import now_ms


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("registry", help="manage the device and gateway registry file")
    cmds = group.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    add = cmds.add_parser("add-device", help="register a device public key in a zone")
    add.add_argument("--file", type=Path, required=True, help="registry JSON file")
    add.add_argument("--public-key", required=True, help="base64 Ed25519 public key")
    add.add_argument("--zone", required=True)
    add.add_argument("--lat", type=float)
    add.add_argument("--lon", type=float)
    add.add_argument("--kind", default="multi", choices=["air", "traffic", "multi", "import"])
    add.add_argument("--owner", default="", help="who runs the node (an operator's name)")
    add.add_argument(
        "--valid-from",
        help="ISO 8601 time from which its readings are accepted (default: now); a past "
        "time only with --kind import (an importer identity, see `civicmesh import`)",
    )
    add.set_defaults(func=_add_device)

    gw = cmds.add_parser("add-gateway", help="register a gateway public key")
    gw.add_argument("--file", type=Path, required=True)
    gw.add_argument("--public-key", required=True)
    gw.set_defaults(func=_add_gateway)

    rev = cmds.add_parser("revoke-device", help="mark a device revoked")
    rev.add_argument("--file", type=Path, required=True)
    rev.add_argument("device_id")
    rev.set_defaults(func=_revoke)

    rot = cmds.add_parser(
        "rotate-key", help="apply a device's key rotation (`civicmesh edge rotate` prints it)"
    )
    rot.add_argument("--file", type=Path, required=True)
    rot.add_argument("--announcement", required=True, help="base64, as the device printed it")
    rot.add_argument(
        "--overlap-hours",
        type=float,
        default=24.0,
        help="how long the old key stays valid (default 24)",
    )
    rot.set_defaults(func=_rotate)
    auth = cmds.add_parser("authority-keygen", help="make the key that signs registry snapshots")
    auth.add_argument("--key", type=Path, required=True)
    auth.set_defaults(func=_authority_keygen)
    pub = cmds.add_parser(
        "publish", help="publish the signed registry snapshot (retained) for the gateways"
    )
    pub.add_argument("--file", type=Path, required=True)
    pub.add_argument("--key", type=Path, required=True, help="the authority key")
    pub.add_argument("--mqtt-url", required=True)
    pub.add_argument("--tls-ca", type=Path)
    pub.add_argument("--tls-cert", type=Path)
    pub.add_argument("--tls-key", type=Path)
    pub.add_argument(
        "--valid-hours",
        type=float,
        default=24.0,
        help="gateways hold device batches once a snapshot is this old",
    )
    pub.add_argument(
        "--every-s",
        type=float,
        default=0.0,
        help="publish again every N seconds (0: once); keep it under the validity",
    )
    pub.set_defaults(func=_publish)
    show = cmds.add_parser("list", help="print the registry")
    show.add_argument("--file", type=Path, required=True)
    show.set_defaults(func=_list)


def _load_or_empty(path: Path) -> Registry:
    return Registry.load(path) if path.exists() else Registry.empty()


def _add_device(args: argparse.Namespace) -> int:
    key = VerifyKey.from_text(args.public_key)
    now = now_ms()
    valid_from = now if args.valid_from is None else _parse_time(args.valid_from)
    check_valid_from(args.kind, valid_from, now)
    record = DeviceRecord(
        device_id=derive_id(key.public_key),
        public_key=args.public_key,
        zone=args.zone,
        lat=args.lat,
        lon=args.lon,
        kind=args.kind,
        registered_at_ms=valid_from,
        owner=args.owner,
    )
    registry = _load_or_empty(args.file)
    if args.kind == IMPORT_KIND:
        registry = registry.with_importer(record, valid_from)
    else:
        registry = registry.with_device(record)
    registry.save(args.file)
    print(record.device_id)
    return 0


def _parse_time(text: str) -> int:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise RegistryError(
            f"--valid-from {text!r} is not an ISO 8601 time (e.g. 2004-03-01T00:00:00+00:00)"
        ) from None
    if when.tzinfo is None:
        raise RegistryError(f"--valid-from {text!r} needs a UTC offset (e.g. +00:00)")
    return int(when.timestamp() * 1000)


def _add_gateway(args: argparse.Namespace) -> int:
    key = VerifyKey.from_text(args.public_key)
    record = GatewayRecord(gateway_id=derive_id(key.public_key), public_key=args.public_key)
    _load_or_empty(args.file).with_gateway(record).save(args.file)
    print(record.gateway_id)
    return 0


def _rotate(args: argparse.Namespace) -> int:
    try:
        announcement = base64.b64decode(args.announcement, validate=True)
    except ValueError:
        raise RegistryError("The announcement is not base64") from None
    try:
        registry, device_id = Registry.load(args.file).rotate_device_key(
            announcement, int(args.overlap_hours * 3_600_000), now_ms()
        )
    except ProtocolError as exc:
        raise RegistryError(f"Rotation refused: {exc}") from None
    registry.save(args.file)
    print(
        f"device {device_id}: new key registered; the old one is valid for "
        f"{args.overlap_hours:g} h more"
    )
    return 0


def _authority_keygen(args: argparse.Namespace) -> int:
    signer = Ed25519Signer.generate()
    signer.save(args.key)
    print(
        f"authority public key (gateway setting registry_authority): "
        f"{signer.verify_key().to_text()}"
    )
    return 0


def publish_snapshot(
    link: MqttLink, registry_file: Path, authority: Ed25519Signer, valid_ms: int
) -> int:
    """Sign the registry as it is now and publish it retained; returns its serial."""
    registry = Registry.load(registry_file)  # validated before it goes out
    issued = now_ms()
    message = encode_registry_snapshot(
        authority, registry.to_json().encode(), issued, issued + valid_ms
    )
    link.publish(topics.REGISTRY_SNAPSHOT, message, qos=1, retain=True)
    return issued


def _publish(args: argparse.Namespace) -> int:
    authority = Ed25519Signer.load(args.key)
    link = MqttLink(
        args.mqtt_url,
        f"civicmesh-registry-{authority.key_id}",
        tls_ca=str(args.tls_ca) if args.tls_ca else None,
        tls_cert=str(args.tls_cert) if args.tls_cert else None,
        tls_key=str(args.tls_key) if args.tls_key else None,
    )
    link.connect()
    try:
        while True:
            serial = publish_snapshot(link, args.file, authority, int(args.valid_hours * 3_600_000))
            print(f"registry snapshot {serial} published", flush=True)
            if args.every_s <= 0:
                return 0
            time.sleep(args.every_s)
    finally:
        link.close()


def _revoke(args: argparse.Namespace) -> int:
    Registry.load(args.file).revoke_device(args.device_id).save(args.file)
    return 0


def _list(args: argparse.Namespace) -> int:
    print(Registry.load(args.file).to_json())
    return 0
