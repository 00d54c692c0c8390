"""``civicmesh gateway``: key generation and the relay service."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from civicmesh.config import load_settings
from civicmesh.errors import ConfigError, MqttError
from civicmesh.identity import Ed25519Signer
from civicmesh.mqtt import MqttLink
from civicmesh.registry import RegistryFile
from civicmesh.systemd import Watchdog, notify

if TYPE_CHECKING:
    from civicmesh.audit.daemon import WitnessDaemon
    from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


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
    from gateway.relay import Gateway
    from gateway.settings import GatewaySettings

    settings = load_settings(GatewaySettings, args.config)
    signer = Ed25519Signer.load(settings.key_file)
    fix = (
        "Enrol the gateway (`civicmesh setup enrol` on the central server) and copy the "
        "files it writes here; `civicmesh setup gateway --check` lists what is missing"
    )
    settings.device_mqtt.require_tls_files("device_mqtt", fix)
    settings.upstream_mqtt.require_tls_files("upstream_mqtt", fix)
    dev = settings.device_mqtt
    up = settings.upstream_mqtt
    device_link = MqttLink(
        dev.url,
        dev.client_id or f"civicmesh-gw-{signer.key_id}-dev",
        persistent=True,
        manual_ack=True,
        protocol=dev.protocol,
        **dev.tls_args(),
    )
    upstream_link = MqttLink(
        up.url,
        up.client_id or f"civicmesh-gw-{signer.key_id}-up",
        protocol=up.protocol,
        **up.tls_args(),
    )
    gateway = Gateway(
        settings, signer, RegistryFile(settings.registry_file), device_link, upstream_link
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Subscribe before connecting, so messages queued in our persistent session find a handler.
    gateway.start()
    # Either broker may be down at boot: the loop below keeps trying (with backoff) and
    # the buffer holds what arrives meanwhile.
    for link in (upstream_link, device_link):
        try:
            link.connect()
        except MqttError as exc:
            log.warning("%s; the gateway starts anyway and keeps trying", exc)
    witness = _audit_witness(settings, upstream_link)
    notify("READY=1")
    watchdog = Watchdog()
    try:
        # The gateway owns its reconnection, and the watchdog is fed only while the
        # forwarder runs and both links work or are being rebuilt: a stuck gateway, or
        # a link whose network thread died for good, gets restarted.
        while not stop.wait(2.0):
            upstream_link.maintain()
            device_link.maintain()
            if gateway.forwarding and upstream_link.healthy and device_link.healthy:
                watchdog.tick()
    finally:
        if witness is not None:
            witness.stop()
        device_link.close()
        gateway.stop()
        upstream_link.close()
    return 0


def _audit_witness(settings: GatewaySettings, link: MqttLink) -> WitnessDaemon | None:
    """The audit-log witness beside this gateway, when configured (issue 21)."""
    if settings.audit_witness_key is None:
        return None
    from civicmesh.audit.daemon import WitnessDaemon
    from civicmesh.audit.note import NoteKey, NoteSigner
    from civicmesh.audit.witness import Witness

    if not settings.audit_log_key or not settings.audit_api_url:
        raise ConfigError("audit_witness_key needs audit_log_key and audit_api_url as well")
    try:
        log_key = NoteKey.from_vkey(settings.audit_log_key)
    except ValueError as exc:
        raise ConfigError(f"audit_log_key: {exc}") from None
    state = settings.state_dir / "audit-witness.json"
    witness = Witness(NoteSigner.load(settings.audit_witness_key), log_key, state)
    daemon = WitnessDaemon(witness, link, settings.audit_api_url)
    daemon.start()
    return daemon
