"""The composition root of the gateway: settings in, a relay with its two links out.
``civicmesh gateway run`` and the demo build it here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from civicmesh.errors import ConfigError, MqttError
from civicmesh.identity import Ed25519Signer, Signer
from civicmesh.mqtt import MqttLink
from civicmesh.registry import RegistryFile
from gateway.relay import Gateway
from gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from civicmesh.audit.daemon import WitnessDaemon

log = logging.getLogger(__name__)


@dataclass
class GatewayNode:
    """The relay and its links: the device side (persistent session, manual
    acknowledgement: a device's batch is acknowledged only once it is buffered) and the
    upstream side towards central."""

    gateway: Gateway
    device_link: MqttLink
    upstream_link: MqttLink
    witness: WitnessDaemon | None = None

    def start(self) -> None:
        # Subscribe before connecting, so messages queued in our persistent session find
        # a handler.
        self.gateway.start()
        # Either broker may be down at boot: maintain() keeps trying (with backoff) and
        # the buffer holds what arrives meanwhile.
        for link in (self.upstream_link, self.device_link):
            try:
                link.connect()
            except MqttError as exc:
                log.warning("%s; the gateway starts anyway and keeps trying", exc)
        self.witness = _audit_witness(self.gateway.settings, self.upstream_link)

    def maintain(self) -> None:
        """Rebuild a link whose connection is gone (call it periodically)."""
        self.upstream_link.maintain()
        self.device_link.maintain()

    @property
    def healthy(self) -> bool:
        """Forwarding, and both links work or are being rebuilt (feeds the watchdog)."""
        return bool(
            self.gateway.forwarding and self.upstream_link.healthy and self.device_link.healthy
        )

    def stop(self) -> None:
        if self.witness is not None:
            self.witness.stop()
        self.device_link.close()
        self.gateway.stop()
        self.upstream_link.close()


def build(settings: GatewaySettings, *, signer: Signer | None = None) -> GatewayNode:
    """The gateway ``settings`` describe; ``signer`` defaults to the key file."""
    signer = signer or Ed25519Signer.load(settings.key_file)
    dev, up = settings.device_mqtt, settings.upstream_mqtt
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
    registry = RegistryFile(settings.registry_file)
    gateway = Gateway(settings, signer, registry, device_link, upstream_link)
    return GatewayNode(gateway, device_link, upstream_link)


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
