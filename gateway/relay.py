"""The relay: verify device batches, keep chains, countersign, forward, quarantine.

A device message is acknowledged to the broker only after it was accepted into or
quarantined in the durable buffer, and the device gets a receipt for every batch the
buffer holds (so its outbox can let go). A forwarder thread publishes the buffer
upstream; an envelope is done when ingest's receipt names it, and is forwarded again
when :mod:`civicmesh.custody` finds it lost. A device re-sending a batch the gateway
already holds (its receipt was lost) gets the receipt again; it is recorded as a
``chain.replay`` quarantine entry (a replay looks the same) and not forwarded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from typing import Any

from civicmesh import health, topics
from civicmesh.custody import ResendPolicy
from civicmesh.errors import MqttError, RegistryError
from civicmesh.identity import Signer, VerifyKey
from civicmesh.mqtt import Message, MqttLink
from civicmesh.protocol import (
    MAX_RECEIPT_DIGESTS,
    ChainForkError,
    ChainVerdict,
    ProtocolError,
    Receipt,
    ReplayError,
    decode_receipt,
    encode_receipt,
    judge_chain,
    message_digest,
    open_batch,
    open_registry_snapshot,
    peek_signer,
    raise_for_verdict,
    wrap_envelope,
)
from civicmesh.quarantine import QuarantineRecord
from civicmesh.registry import Registry, RegistryFile
from civicmesh.timeutil import now_ms
from gateway.buffer import GatewayBuffer
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class TopicMismatchError(ProtocolError):
    reason = "topic.device_mismatch"


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        signer: Signer,
        registry: RegistryFile,
        device_link: MqttLink,
        upstream_link: MqttLink,
    ) -> None:
        self.settings = settings
        self.signer = signer
        self.registry = registry
        self.device_link = device_link  # create with persistent=True, manual_ack=True
        self.upstream_link = upstream_link
        self.buffer = GatewayBuffer(
            settings.state_dir / "buffer.db",
            await_receipts=settings.await_receipts,
            max_envelopes=settings.buffer_max_envelopes,
            max_bytes=settings.buffer_max_bytes,
        )
        self.up_topic = topics.gateway_up(signer.key_id)
        self._authority = (
            VerifyKey.from_text(settings.registry_authority)
            if settings.registry_authority
            else None
        )
        self._snapshot_file = settings.state_dir / "registry-snapshot.json"
        self.quarantine_topic = topics.quarantine("gw", signer.key_id)
        self._stop = threading.Event()
        self._forwarder = threading.Thread(
            target=self._forward_loop, name="gw-forward", daemon=True
        )
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._quarantined: Counter[str] = Counter()
        self._device_receipts: dict[str, list[bytes]] = {}
        self.resend = ResendPolicy(settings.resend_after_s)
        self._next_release = 0.0  # monotonic time of the next look for ended holds

    def start(self) -> None:
        """Subscribe to device uplinks and start forwarding (works before or after connect)."""
        if self.settings.await_receipts:
            self.upstream_link.subscribe(
                topics.gateway_receipt(self.signer.key_id), self._on_upstream_receipt
            )
        self.device_link.subscribe(
            topics.ALL_DEVICE_UP, self._on_message, on_error=self._on_handler_error
        )
        # health is QoS 0 end to end: the next report replaces a lost one
        self.device_link.subscribe(topics.ALL_DEVICE_HEALTH, self._on_health, qos=0)
        if self._authority is not None:
            self.upstream_link.subscribe(topics.REGISTRY_SNAPSHOT, self._on_registry)
        self._forwarder.start()

    def stop(self) -> None:
        self._stop.set()
        if self._forwarder.is_alive():
            self._forwarder.join(timeout=10)
        self.buffer.close()

    @property
    def forwarding(self) -> bool:
        """The forwarding thread is running."""
        return self._forwarder.is_alive()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            quarantined = dict(self._quarantined)
        return {
            **counts,
            "quarantined_by_reason": quarantined,
            "backlog": self.buffer.backlog(),
            "dropped_total": self.buffer.dropped_total(),
            "handler_errors": self.device_link.handler_errors,
        }

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    # ------------------------------------------------------------------ receive

    def _on_message(self, message: Message) -> None:
        self._count("received")
        if not self._registry_current():
            # Fail closed, but lose nothing: no receipt, so the device keeps the batch in
            # its outbox and sends it again once a current registry has arrived.
            self._count("held_registry_expired")
            self.device_link.ack(message)
            return
        device_id: str | None = None
        seq: int | None = None
        try:
            parsed = topics.id_from_up_topic(message.topic)
            batch = open_batch(message.payload, self.registry.device_key)
            device_id, seq = batch.device_id, batch.seq
            if parsed != ("dev", batch.device_id):
                raise TopicMismatchError(
                    f"batch of {batch.device_id} arrived on another device's topic {message.topic}"
                )
            head = self.buffer.head(batch.device_id)
            advance_head = True
            hold_until: int | None = None
            if head is not None and batch.seq <= head.seq:
                if self._is_resent(batch.device_id, batch.seq, message.payload):
                    # The same bytes again: a device whose receipt was lost, or a replay.
                    # Either way it is held already; receipt it again and record it.
                    self._count("duplicates")
                    self._receipt_for(batch.device_id, message.payload)
                    raise ReplayError(
                        f"device {batch.device_id} seq {batch.seq} is already held with the "
                        "same bytes: a re-send or a replay"
                    )
                why_not = self.buffer.links_behind_head(
                    batch.device_id, batch.seq, batch.hash, batch.payload.prev_hash
                )
                if why_not is not None:
                    raise ChainForkError(
                        f"device {batch.device_id} seq {batch.seq} forks the chain: {why_not}"
                    )
                # A re-sent batch that was lost while its successors got through.
                advance_head = False
                self._count("gaps_filled")
                log.info("device %s seq %d fills a gap", batch.device_id, batch.seq)
            if advance_head:
                verdict = judge_chain(head, batch)
                raise_for_verdict(verdict, batch, head)
                if verdict is ChainVerdict.GAP:
                    # Its prev_hash names a batch the gateway has not seen: held until
                    # that batch arrives and links it (see gap_hold_s), not forwarded
                    # as if it continued the chain.
                    self._count("chain_gaps")
                    hold_until = now_ms() + int(self.settings.gap_hold_s * 1000)
                    log.warning(
                        "chain gap: device %s jumped to seq %d (head %s); held",
                        batch.device_id,
                        batch.seq,
                        None if head is None else head.seq,
                    )
            envelope = wrap_envelope(self.signer, message.payload, now_ms())
            released = self.buffer.accept(
                batch.device_id,
                batch.seq,
                batch.hash,
                self.up_topic,
                envelope.message,
                message.payload,
                prev_hash=batch.payload.prev_hash,
                advance_head=advance_head,
                hold_until_ms=hold_until,
            )
            if released:
                self._count("gaps_linked", released)
            self._count("accepted")
            self._receipt_for(batch.device_id, message.payload)
        except ProtocolError as exc:
            if device_id is None:
                try:
                    device_id = peek_signer(message.payload)
                except ProtocolError:
                    device_id = None
            record = QuarantineRecord.of(
                reason=exc.reason,
                detail=str(exc),
                source=f"gw:{self.signer.key_id}",
                topic=message.topic,
                received_at_ms=now_ms(),
                payload=message.payload,
                device_id=device_id,
                seq=seq,
            )
            self.buffer.enqueue(self.quarantine_topic, record.to_wire(self.signer))
            with self._lock:
                self._quarantined[exc.reason] += 1
            log.warning("quarantined message on %s: %s", message.topic, exc.reason)
        # Acknowledge only now: the message is durably accepted or quarantined.
        self.device_link.ack(message)

    def _on_handler_error(self, message: Message, exc: Exception) -> bool:
        """:meth:`_on_message` raised something other than a protocol error (a full disk,
        a bug). The message is acknowledged without a receipt: its device keeps the batch
        and sends it again. A record with the reason goes upstream when the buffer can
        still take it."""
        self._count("handler_errors")
        with self._lock:
            self._quarantined["gateway.internal_error"] += 1
        try:
            record = QuarantineRecord.of(
                reason="gateway.internal_error",
                detail=f"{type(exc).__name__}: {exc}"[:500],
                source=f"gw:{self.signer.key_id}",
                topic=message.topic,
                received_at_ms=now_ms(),
                payload=message.payload,
                device_id=None,
                seq=None,
            )
            self.buffer.enqueue(self.quarantine_topic, record.to_wire(self.signer))
        except Exception as second:  # the record is best effort; the guard must return
            log.warning("no quarantine record for the failed message: %s", second)
        return True

    def _is_resent(self, device_id: str, seq: int, device_message: bytes) -> bool:
        """Is this exactly the message already accepted as (device, seq)?"""
        return self.buffer.known_digest(device_id, seq) == message_digest(device_message)

    def _receipt_for(self, device_id: str, device_message: bytes) -> None:
        with self._lock:
            self._device_receipts.setdefault(device_id, []).append(message_digest(device_message))

    def _send_device_receipts(self) -> None:
        """Publish the receipts collected since the last call, one message per device.

        At QoS 0: a lost receipt only makes the device re-send the batch,
        which :meth:`_on_message` recognises and answers with the receipt again.
        """
        with self._lock:
            pending, self._device_receipts = self._device_receipts, {}
        if not pending or not self.device_link.is_connected:
            if pending:
                with self._lock:
                    for device_id, digests in pending.items():
                        self._device_receipts.setdefault(device_id, []).extend(digests)
            return
        for device_id, digests in pending.items():
            for start in range(0, len(digests), MAX_RECEIPT_DIGESTS):
                receipt = Receipt(
                    self.signer.key_id, tuple(digests[start : start + MAX_RECEIPT_DIGESTS])
                )
                try:
                    self.device_link.publish(
                        topics.device_receipt(device_id), encode_receipt(receipt), qos=0
                    )
                except MqttError as exc:
                    log.info("receipt to device %s not sent (%s); it will re-send", device_id, exc)

    # ------------------------------------------------------------------ registry

    def _registry_current(self) -> bool:
        """Without an authority the registry file is trusted as it is; with one, the
        newest signed snapshot must not have expired."""
        if self._authority is None:
            return True
        state = self._snapshot_state()
        return state is not None and now_ms() < state[1]

    def _snapshot_state(self) -> tuple[int, int] | None:
        try:
            data = json.loads(self._snapshot_file.read_text(encoding="utf-8"))
            return int(data["issued_at_ms"]), int(data["expires_at_ms"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def _on_registry(self, message: Message) -> None:
        """A registry snapshot: applied when the authority signed it and it is newer."""
        assert self._authority is not None
        try:
            snapshot = open_registry_snapshot(message.payload, self._authority)
            registry = Registry.from_json(snapshot.registry_json.decode(), origin="snapshot")
        except (ProtocolError, RegistryError, UnicodeDecodeError) as exc:
            self._count("registry_refused")
            log.warning("registry snapshot refused: %s", exc)
            return
        state = self._snapshot_state()
        if state is not None and snapshot.issued_at_ms <= state[0]:
            return  # the same one again (retained), or an older one: keep what we have
        registry.save(self.registry.path)
        self._snapshot_file.write_text(
            json.dumps(
                {
                    "issued_at_ms": snapshot.issued_at_ms,
                    "expires_at_ms": snapshot.expires_at_ms,
                }
            ),
            encoding="utf-8",
        )
        self._count("registry_applied")
        log.info(
            "registry snapshot of %d applied (%d devices, valid until %d)",
            snapshot.issued_at_ms,
            len(registry.devices),
            snapshot.expires_at_ms,
        )

    def _on_health(self, message: Message) -> None:
        """Relay an agent's health report upstream (QoS 0: the next one replaces it)."""
        device_id = topics.device_from_health_topic(message.topic)
        if device_id is None or self.registry.device_key(device_id) is None:
            self._count("health_dropped")
            log.warning("health message on %s dropped: not a registered device", message.topic)
            return
        try:
            report = health.from_agent(message.payload, device_id, self.signer.key_id, now_ms())
            if self.upstream_link.is_connected:
                self.upstream_link.publish(
                    topics.gateway_health(self.signer.key_id), report.to_relay(), qos=0
                )
                self._count("health_relayed")
        except health.HealthError as exc:
            self._count("health_dropped")
            log.warning("health message of %s dropped: %s", device_id, exc)
        except MqttError as exc:
            log.info("health of %s not relayed: %s", device_id, exc)

    def _on_upstream_receipt(self, message: Message) -> None:
        try:
            receipt = decode_receipt(message.payload)
        except ProtocolError as exc:
            log.warning("ignored a malformed receipt on %s: %s", message.topic, exc.reason)
            return
        count, newest_forwarded = self.buffer.confirm(receipt.digests)
        self._count("confirmed", count)
        self.resend.confirmed(newest_forwarded)

    # ------------------------------------------------------------------ forward

    def _release_held(self) -> None:
        """Forward the held batches whose hold ended unlinked, each with a ``chain.gap``
        record upstream: ingest learns that the gateway could not check their link."""
        if time.monotonic() < self._next_release:
            return
        self._next_release = time.monotonic() + 1.0
        for device_id, seq in self.buffer.release_held(now_ms()):
            self._count("gaps_released_unlinked")
            with self._lock:
                self._quarantined["chain.gap"] += 1
            record = QuarantineRecord.of(
                reason="chain.gap",
                detail=(
                    f"device {device_id} seq {seq} jumped ahead of its chain and the batches "
                    f"before it did not arrive within {self.settings.gap_hold_s:.0f} s: "
                    "forwarded without a checked link to its predecessor"
                ),
                source=f"gw:{self.signer.key_id}",
                topic=topics.device_up(device_id),
                received_at_ms=now_ms(),
                payload=b"",
                device_id=device_id,
                seq=seq,
            )
            self.buffer.enqueue(self.quarantine_topic, record.to_wire(self.signer))
            log.warning("device %s seq %d forwarded unlinked after its hold", device_id, seq)

    def _forward_loop(self) -> None:
        backoff = 0.5
        next_prune = 0.0
        while not self._stop.is_set():
            self._send_device_receipts()
            self._release_held()
            plan = self.resend.plan() if self.settings.await_receipts else None
            items = self.buffer.pending(self.settings.forward_batch_size, plan)
            if not items:
                self._stop.wait(0.05)
                continue
            if not self.upstream_link.is_connected:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            try:
                acked = self.upstream_link.publish_many([(t, b) for _, t, b in items], timeout=10)
            except MqttError as exc:
                log.warning("upstream publish failed (%s); %d items kept", exc, len(items))
                acked = 0
            self.buffer.mark_forwarded([i for i, _, _ in items[:acked]])
            if acked and plan is not None and plan.probe:
                self.resend.probed()  # anything forwarded on a quiet path serves as its probe
            self._count("forwarded", acked)
            if acked < len(items):
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.5
            if self.settings.keep_forwarded_hours and next_prune < now_ms():
                keep_ms = int(self.settings.keep_forwarded_hours * 3_600_000)
                self.buffer.prune(now_ms() - keep_ms)
                next_prune = now_ms() + 600_000
