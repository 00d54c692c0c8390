"""Acknowledge: the broker's PUBACK after the commit, then a receipt to each gateway.

An acknowledgement names a packet id, which means something only on the connection the
message came with: one received before a reconnect is not acknowledged on the new
connection (:meth:`MqttLink.ack` refuses it), and the broker redelivers it there; the
store recognises the redelivery as a replay of what it holds.

Receipts go at QoS 0: a lost receipt only makes the gateway forward the message again,
which the store recognises as a duplicate and this worker receipts again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from analytics.ingest.receive import Inbound
from civicmesh import topics
from civicmesh.errors import MqttError
from civicmesh.mqtt import MqttLink
from civicmesh.protocol import MAX_RECEIPT_DIGESTS, Receipt, encode_receipt, message_digest

log = logging.getLogger(__name__)


class Acknowledger:
    def __init__(self, link: MqttLink, source: str) -> None:
        self.link = link
        self.source = source

    def acknowledge(self, group: Sequence[Inbound]) -> tuple[int, int]:
        """PUBACK every message of a committed group, then send the gateways' receipts.

        Returns (acknowledged, left to the broker's redelivery)."""
        acked = stale = 0
        for item in group:
            if self.link.ack(item.message):
                acked += 1
            else:
                stale += 1
        if stale:
            log.info("%d messages came on an earlier connection; the broker redelivers them", stale)
        self._send_receipts(group)
        return acked, stale

    def _send_receipts(self, group: Sequence[Inbound]) -> None:
        """Tell each gateway which of its messages are now committed (stored or quarantined)."""
        by_gateway: dict[str, list[bytes]] = {}
        for item in group:
            gateway_id = topics.gateway_from_topic(item.message.topic)
            if gateway_id is not None:
                by_gateway.setdefault(gateway_id, []).append(message_digest(item.message.payload))
        for gateway_id, digests in by_gateway.items():
            for start in range(0, len(digests), MAX_RECEIPT_DIGESTS):
                receipt = Receipt(self.source, tuple(digests[start : start + MAX_RECEIPT_DIGESTS]))
                try:
                    self.link.publish(
                        topics.gateway_receipt(gateway_id), encode_receipt(receipt), qos=0
                    )
                except MqttError as exc:
                    log.info("receipt to gateway %s not sent (%s)", gateway_id, exc)
