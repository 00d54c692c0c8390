"""``civicmesh edge``: key generation, the agent service, outbox status."""

from __future__ import annotations

import argparse
import base64
import json
import signal
import socket
import sys
import threading
from pathlib import Path

from civicmesh import __version__
from civicmesh.config import load_settings
from civicmesh.errors import MqttError
from civicmesh.identity import Ed25519Signer, Es256Signer, identity_file, load_device_signer
from civicmesh.protocol import encode_rotation
from civicmesh.timeutil import now_ms


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("edge", help="edge agent: keys, run, status")
    cmds = group.add_subparsers(dest="edge_command", metavar="ACTION", required=True)
    keygen = cmds.add_parser("keygen", help="make this device's Ed25519 key (file mode 0600)")
    keygen.add_argument("--key", type=Path, required=True, help="where to write the key")
    keygen.set_defaults(func=_keygen)
    prov = cmds.add_parser(
        "provision", help="make this device's key if it has none; print its registration request"
    )
    prov.add_argument("--key", type=Path, required=True, help="key file (mode 0600)")
    prov.add_argument("--kind", default="multi", choices=["air", "traffic", "multi"])
    prov.add_argument(
        "--algorithm",
        choices=["ed25519", "es256"],
        default="ed25519",
        help="a new key's algorithm (es256: as secure elements and TPMs sign)",
    )
    prov.set_defaults(func=_provision)
    rot = cmds.add_parser(
        "rotate", help="make a new key, keep this device's id, print the signed announcement"
    )
    rot.add_argument("--key", type=Path, required=True, help="the device's key file")
    rot.set_defaults(func=_rotate)
    run = cmds.add_parser("run", help="run the agent until SIGINT/SIGTERM")
    run.add_argument("--config", type=Path, help="TOML config (see deploy/examples/edge.toml)")
    run.set_defaults(func=_run)
    status = cmds.add_parser("status", help="print the outbox state")
    status.add_argument("--config", type=Path)
    status.set_defaults(func=_status)


def _provision(args: argparse.Namespace) -> int:
    """Idempotent: a device that has a key keeps it (its id is the key's hash)."""
    if args.key.exists():
        signer = load_device_signer(args.key)
    elif args.algorithm == "es256":
        signer = Es256Signer.generate()
        signer.save(args.key)
    else:
        signer = Ed25519Signer.generate()
        signer.save(args.key)
    request = {
        "device_id": signer.key_id,
        "public_key": signer.verify_key().to_text(),
        "kind": args.kind,
        "hostname": socket.gethostname(),
        "agent_version": __version__,
    }
    print(json.dumps(request, indent=2))
    print(
        "Send this to the operator, who registers it with zone, location and owner:\n"
        f"  civicmesh registry add-device --file registry.json --public-key "
        f"{request['public_key']} --kind {args.kind} --zone ZONE --lat LAT --lon LON",
        file=sys.stderr,
    )
    return 0


def _rotate(args: argparse.Namespace) -> int:
    """The current key signs the announcement of the next one; the next one replaces it
    in the key file (the old key is kept beside it as ``.old`` until you delete it)."""
    current = load_device_signer(args.key)
    nxt = Ed25519Signer.generate()
    announcement = encode_rotation(current, nxt.public_key, now_ms())
    staged = args.key.with_name(args.key.name + ".new")
    nxt.save(staged, overwrite=True)
    args.key.replace(args.key.with_name(args.key.name + ".old"))
    staged.replace(args.key)
    identity_file(args.key).write_text(current.key_id + "\n", encoding="ascii")
    print(base64.b64encode(announcement).decode("ascii"))
    print(
        "Have the operator apply it before restarting the agent:\n"
        "  civicmesh registry rotate-key --file registry.json --announcement <the line above>",
        file=sys.stderr,
    )
    return 0


def _keygen(args: argparse.Namespace) -> int:
    signer = Ed25519Signer.generate()
    signer.save(args.key)
    public = signer.verify_key().to_text()
    print(f"device id:  {signer.key_id}")
    print(f"public key: {public}")
    print("register it on the operator side with:")
    print(f"  civicmesh registry add-device --file registry.json --public-key {public} --zone ZONE")
    return 0


def _run(args: argparse.Namespace) -> int:
    from edge.app import build
    from edge.settings import EdgeSettings

    settings = load_settings(EdgeSettings, args.config)
    signer = load_device_signer(settings.key_file)
    settings.mqtt.require_tls_files(
        "mqtt",
        "Enrol the device (`civicmesh setup enrol` on the central server) and copy the "
        "files it writes here; `civicmesh setup edge --check` lists what is missing",
    )
    node = build(settings, signer=signer)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        try:
            if node.link is not None:  # its own link (none was passed to build)
                node.link.connect()
        except MqttError as exc:  # keep collecting offline; the agent retries
            print(f"civicmesh edge: broker not reachable yet ({exc}); buffering in the outbox")
        node.agent.run(stop)
    finally:
        node.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    from edge.outbox import Outbox
    from edge.settings import EdgeSettings

    settings = load_settings(EdgeSettings, args.config)
    outbox = Outbox(settings.state_dir / "outbox.db", max_readings=settings.outbox_max_readings)
    print(outbox.stats())
    outbox.close()
    return 0
