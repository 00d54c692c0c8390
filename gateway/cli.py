"""``civicmesh gateway``: key generation and the relay service."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from civicmesh.config import load_settings
from civicmesh.identity import Ed25519Signer
from civicmesh.systemd import Watchdog, notify


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("gateway", help="gateway: keys, run")
    cmds = group.add_subparsers(dest="gateway_command", metavar="ACTION", required=True)
    keygen = cmds.add_parser("keygen", help="make the gateway's Ed25519 key (mode 0600)")
    keygen.add_argument("--key", type=Path, required=True)
    keygen.set_defaults(func=_keygen)
    run = cmds.add_parser("run", help="run the relay until SIGINT/SIGTERM")
    run.add_argument("--config", type=Path, help="TOML config")
    run.set_defaults(func=_run)
    replay = cmds.add_parser(
        "replay", help="forward again what the buffer kept (after the central store was lost)"
    )
    replay.add_argument("--config", type=Path, help="TOML config")
    replay.add_argument("--since", required=True, help="ISO time: replay envelopes from then on")
    replay.set_defaults(func=_replay)


def _keygen(args: argparse.Namespace) -> int:
    signer = Ed25519Signer.generate()
    signer.save(args.key)
    public = signer.verify_key().to_text()
    print(f"gateway id: {signer.key_id}")
    print(f"public key: {public}")
    print(f"  civicmesh registry add-gateway --file registry.json --public-key {public}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from datetime import datetime

    from gateway.buffer import GatewayBuffer
    from gateway.settings import GatewaySettings

    settings = load_settings(GatewaySettings, args.config)
    since = datetime.fromisoformat(args.since)
    buffer = GatewayBuffer(
        settings.state_dir / "buffer.db",
        max_envelopes=settings.buffer_max_envelopes,
        max_bytes=settings.buffer_max_bytes,
    )
    try:
        count = buffer.requeue(int(since.timestamp() * 1000))
    finally:
        buffer.close()
    print(f"{count} envelopes queued to forward again; a running gateway sends them now")
    return 0


def _run(args: argparse.Namespace) -> int:
    from gateway.app import build
    from gateway.settings import GatewaySettings

    settings = load_settings(GatewaySettings, args.config)
    signer = Ed25519Signer.load(settings.key_file)
    fix = (
        "Enrol the gateway (`civicmesh setup enrol` on the central server) and copy the "
        "files it writes here; `civicmesh setup gateway --check` lists what is missing"
    )
    settings.device_mqtt.require_tls_files("device_mqtt", fix)
    settings.upstream_mqtt.require_tls_files("upstream_mqtt", fix)
    node = build(settings, signer=signer)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    node.start()
    notify("READY=1")
    watchdog = Watchdog()
    try:
        # The gateway owns its reconnection, and the watchdog is fed only while the
        # forwarder runs and both links work or are being rebuilt: a stuck gateway, or
        # a link whose network thread died for good, gets restarted.
        while not stop.wait(2.0):
            node.maintain()
            if node.healthy:
                watchdog.tick()
    finally:
        node.stop()
    return 0
