"""A witness that runs beside a gateway: MQTT in, HTTP for proofs, MQTT out.

It takes the central's retained checkpoint, asks the public API for the consistency
proof from the last checkpoint it cosigned (tiles, plain HTTP), verifies it, and
publishes its cosignature. A split view is published on its alert topic with both
notes as evidence, logged at error level, and kept in its state file. Work happens in
its own thread: paho's network thread only hands the newest checkpoint over.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from civicmesh.audit import CHECKPOINT_TOPIC, AuditError, alert_topic, cosignature_topic
from civicmesh.audit.merkle import consistency_proof
from civicmesh.audit.note import split_note
from civicmesh.audit.tiles import HttpSource, Source, TileHashStore
from civicmesh.audit.witness import SplitViewError, Witness, cosignature_message
from civicmesh.errors import MqttError

if TYPE_CHECKING:
    from civicmesh.mqtt import Message, MqttLink

log = logging.getLogger(__name__)


class WitnessDaemon:
    def __init__(self, witness: Witness, link: MqttLink, source: Source | str) -> None:
        self.witness = witness
        self.link = link
        self.source = HttpSource(source) if isinstance(source, str) else source
        self.cosigned = 0
        self.alerts = 0
        self._newest: bytes | None = None
        self._last_text: str | None = None  # the checkpoint text last cosigned
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def _on_checkpoint(self, message: Message) -> None:
        with self._wake:
            self._newest = message.payload
            self._wake.notify()

    def start(self) -> None:
        self.link.subscribe(CHECKPOINT_TOPIC, self._on_checkpoint)
        self._thread = threading.Thread(target=self._run, name="audit-witness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._newest is None and not self._stop:
                    self._wake.wait(5.0)
                if self._stop:
                    return
                note, self._newest = self._newest, None
            if note is not None:
                self.handle(note)

    def handle(self, note: bytes) -> bool:
        """Check and cosign one checkpoint; True when a cosignature went out."""
        try:
            text = split_note(note)[0]
        except AuditError as exc:
            log.warning("audit witness: malformed checkpoint ignored: %s", exc)
            return False
        if text == self._last_text:
            return False  # the same checkpoint republished (with cosignatures): done already

        def proof_for(m: int, n: int) -> list[bytes]:
            return consistency_proof(TileHashStore(self.source, n), m, n)

        name = self.witness.signer.name
        try:
            signature = self.witness.cosign(note, proof_for)
        except SplitViewError as exc:
            self.alerts += 1
            self._send(alert_topic(name), f"{exc}\n\n".encode() + note)
            return False
        except AuditError as exc:
            log.warning("audit witness %s: not cosigning: %s (%s)", name, exc, exc.reason)
            return False
        size = int(text.split("\n")[1])
        if self._send(cosignature_topic(name), cosignature_message(size, signature)):
            self._last_text = text
            self.cosigned += 1
            return True
        return False

    def _send(self, topic: str, payload: bytes) -> bool:
        try:
            self.link.publish(topic, payload)
        except MqttError as exc:
            log.warning("audit witness: publishing to %s failed: %s", topic, exc)
            return False
        return True
