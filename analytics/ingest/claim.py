"""One worker per MQTT session: a second worker with the same id is refused at start.

Two workers with one ``worker_id`` share one MQTT client id and so one persistent
session: the broker hands the session back and forth between them, and every message in
flight at a takeover is delivered again (each batch stored once, but quarantined as a
replay over and over). So each worker announces itself with a retained message on its
own claim topic, refreshed while it runs and cleared when it stops (by itself, or by the
broker through the connection's will when it dies); a worker that finds a fresh claim of
another instance refuses to start, with a message that says what to change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from dataclasses import dataclass

from analytics.ingest.errors import IngestError
from civicmesh import topics
from civicmesh.errors import MqttError
from civicmesh.mqtt import Message, MqttLink

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
# A claim older than this is a worker that died without the broker noticing (no will).
STALE_AFTER_MS = int(3 * HEARTBEAT_S * 1000)
_PROBE_WAIT_S = 0.5


def claim_topic(client_id: str) -> str:
    """Where the worker with MQTT client id ``client_id`` announces itself."""
    digest = hashlib.sha256(client_id.encode("utf-8")).hexdigest()[:32]
    return f"{topics.ROOT}/ingest/{digest}/claim"


@dataclass(frozen=True, slots=True)
class Claim:
    worker_id: str
    client_id: str
    instance: str
    at_ms: int

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "worker_id": self.worker_id,
                "client_id": self.client_id,
                "instance": self.instance,
                "at_ms": self.at_ms,
            }
        ).encode()

    @classmethod
    def parse(cls, payload: bytes) -> Claim | None:
        try:
            obj = json.loads(payload)
            return cls(
                str(obj["worker_id"]),
                str(obj["client_id"]),
                str(obj["instance"]),
                int(obj["at_ms"]),
            )
        except (ValueError, KeyError, TypeError, RecursionError):
            return None


class WorkerClaim:
    """The claim of one worker instance on its client id."""

    def __init__(self, link: MqttLink, worker_id: str) -> None:
        self.link = link
        self.worker_id = worker_id
        self.instance = secrets.token_hex(8)
        self.topic = claim_topic(link.client_id)

    def check_free(self, now_ms: int) -> None:
        """Raise IngestError when another live instance holds this client id."""
        seen: list[Claim] = []
        arrived = threading.Event()

        def on_claim(message: Message) -> None:
            claim = Claim.parse(message.payload) if message.payload else None
            if claim is not None:
                seen.append(claim)
            arrived.set()

        tls = self.link.tls_args
        probe = MqttLink(
            _probe_url(self.link),
            f"{self.link.client_id[:80]}-claim-{self.instance}",
            protocol=self.link.protocol_choice,
            tls_ca=tls["tls_ca"],
            tls_cert=tls["tls_cert"],
            tls_key=tls["tls_key"],
        )
        try:
            probe.connect()
            probe.subscribe(self.topic, on_claim, qos=0)
            arrived.wait(_PROBE_WAIT_S)
        except MqttError as exc:
            log.info("could not check the claim on %s (%s); starting anyway", self.topic, exc)
            return
        finally:
            probe.close()
        for claim in seen:
            if claim.instance != self.instance and now_ms - claim.at_ms < STALE_AFTER_MS:
                raise IngestError(
                    f"another ingest worker with worker_id {claim.worker_id!r} (MQTT client id "
                    f"{claim.client_id!r}) is running on this broker: two workers with one id "
                    "share one MQTT session and would receive every batch twice. Give each "
                    "worker its own ingest.worker_id (or --worker-id), or stop the other one."
                )

    def will(self) -> tuple[str, bytes]:
        """The connection's will: the broker clears the claim when this worker vanishes."""
        return self.topic, b""

    def announce(self, now_ms: int) -> None:
        claim = Claim(self.worker_id, self.link.client_id, self.instance, now_ms)
        try:
            self.link.publish(self.topic, claim.to_json(), qos=0, retain=True)
        except MqttError as exc:
            log.debug("claim not refreshed (%s)", exc)

    def release(self) -> None:
        try:
            self.link.publish(self.topic, b"", qos=1, retain=True, timeout=2)
        except MqttError as exc:
            log.info("claim not released (%s); it goes stale by itself", exc)


def _probe_url(link: MqttLink) -> str:
    address = link.address
    scheme = "mqtts" if address.tls else "mqtt"
    auth = ""
    if address.username:
        from urllib.parse import quote

        auth = quote(address.username, safe="")
        if address.password:
            auth += ":" + quote(address.password, safe="")
        auth += "@"
    return f"{scheme}://{auth}{address.host}:{address.port}"
