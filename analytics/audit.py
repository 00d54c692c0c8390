"""The central service's side of the audit log: checkpoints, cosignatures, public routes.

:class:`AuditPublisher` signs a checkpoint of the store's log every ``interval_s`` while
it grows and at each UTC day's close, publishes it (retained) on
:data:`CHECKPOINT_TOPIC`, and takes the witnesses' cosignatures from
``civicmesh/v1/audit/cosig/<witness>``: a cosignature counts only when it verifies under
a configured witness key for the checkpoint it names; the checkpoint is then
republished with it. ``router`` serves the log to anyone, without a token (it is the
public part of the service): the checkpoint, proofs, and the tlog-tiles files straight
from the database, so ``civicmesh audit verify <api>/api/v1/audit`` works without a
mirror.
"""

from __future__ import annotations

import base64
import logging
import queue
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from analytics.store.base import Store, StoreError
from civicmesh.audit import CHECKPOINT_TOPIC, COSIGNATURE_FILTER, AuditError
from civicmesh.audit.log import CheckpointSchedule, Mirror, make_checkpoint
from civicmesh.audit.merkle import consistency_proof, inclusion_proof
from civicmesh.audit.note import (
    NoteKey,
    NoteSigner,
    add_signatures,
    parse_signature_line,
    split_note,
    verify_cosignature,
)
from civicmesh.audit.tiles import TILE_HEIGHT, TILE_WIDTH, encode_bundle, tile_width
from civicmesh.errors import MqttError
from civicmesh.timeutil import now_ms

if TYPE_CHECKING:
    from analytics.settings import AnalyticsSettings
    from civicmesh.mqtt import Message, MqttLink

log = logging.getLogger(__name__)

PREFIX = "/api/v1/audit"

# topic, payload, retain
Publish = Callable[[str, bytes, bool], None]


@dataclass(frozen=True, slots=True)
class PublishedCheckpoint:
    size: int
    note: bytes  # with every cosignature received so far
    cosigned_by: tuple[str, ...]

    def witnessed(self, quorum: int) -> bool:
        return len(self.cosigned_by) >= quorum


class AuditPublisher:
    def __init__(
        self,
        store: Store,
        signer: NoteSigner,
        *,
        interval_s: float = 10.0,
        witnesses: Sequence[NoteKey] = (),
        publish: Publish | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.store = store
        self.signer = signer
        self.witnesses = {w.name: w for w in witnesses}
        self.schedule = CheckpointSchedule(interval_s)
        self.publish = publish  # where checkpoints go (MQTT, retained); None: nowhere
        self._clock = clock or (lambda: now_ms() / 1000)
        self._lock = threading.Lock()

    def tick(self) -> PublishedCheckpoint | None:
        """Make and publish a checkpoint when one is due; returns it (else None)."""
        now = self._clock()
        size = self.store.audit.size()
        with self._lock:
            if not self.schedule.due(size, now):
                return None
            latest = self.store.audit.latest_checkpoint()
            if latest is None or latest[0] != size:
                note = make_checkpoint(self.signer, self.store.audit, size)
                self.store.audit.save_checkpoint(size, note, int(now * 1000))
            self.schedule.made(size, now)
        return self.republish()

    def current(self) -> PublishedCheckpoint | None:
        latest = self.store.audit.latest_checkpoint()
        if latest is None:
            return None
        size, note = latest
        lines = self.store.audit.cosignatures(size)
        signatures = [parse_signature_line(line) for line in lines]
        cosigned = tuple(s.name for s in signatures)
        return PublishedCheckpoint(
            size, add_signatures(note, signatures) if signatures else note, cosigned
        )

    def republish(self) -> PublishedCheckpoint | None:
        published = self.current()
        if published is not None and self.publish is not None:
            self.publish(CHECKPOINT_TOPIC, published.note, True)
        return published

    def add_cosignature(self, payload: bytes) -> PublishedCheckpoint:
        """A witness's cosignature: ``<size>\\n<signature line>``; verified, stored,
        republished. Raises :class:`AuditError` for one that does not verify."""
        try:
            size_text, line = payload.decode().split("\n", 1)
            size = int(size_text)
            signature = parse_signature_line(line.strip())
        except (UnicodeDecodeError, ValueError) as exc:
            raise AuditError(
                f"malformed cosignature message: {exc}", reason="cosignature.malformed"
            ) from None
        key = self.witnesses.get(signature.name)
        if key is None:
            raise AuditError(
                f"{signature.name} is not a configured witness", reason="cosignature.unknown"
            )
        latest = self.store.audit.latest_checkpoint()
        if latest is None or latest[0] != size:
            raise AuditError(f"no current checkpoint of size {size}", reason="cosignature.stale")
        text = split_note(latest[1])[0]
        if verify_cosignature(text, signature, key) is None:
            raise AuditError(
                f"cosignature of {signature.name} does not verify for size {size}",
                reason="cosignature.invalid",
            )
        self.store.audit.save_cosignature(size, signature.name, signature.line().strip(), now_ms())
        published = self.republish()
        assert published is not None
        return published


class AuditLoop:
    """Runs a publisher in its own thread: backfill at start, a checkpoint when due
    (published retained over MQTT, written to the mirror folder), and the witnesses'
    cosignatures from MQTT (handed over from paho's thread, which must not block)."""

    def __init__(
        self,
        publisher: AuditPublisher,
        link: MqttLink | None = None,
        mirror_dir: Path | None = None,
        *,
        tick_s: float = 1.0,
    ) -> None:
        self.publisher = publisher
        self.link = link
        self.mirror = Mirror(mirror_dir) if mirror_dir is not None else None
        self.tick_s = tick_s
        self.rejected = 0  # cosignatures refused (each logged)
        self._inbox: queue.Queue[bytes] = queue.Queue(maxsize=1000)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if link is not None:
            publisher.publish = self._publish

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.link is None or not self.link.is_connected:
            return  # the next checkpoint or cosignature republishes it
        try:
            self.link.publish(topic, payload, retain=retain)
        except MqttError as exc:
            log.warning(
                "audit: publishing %s failed (%s); it goes out with the next one", topic, exc
            )

    def _on_cosignature(self, message: Message) -> None:
        try:
            self._inbox.put_nowait(message.payload)
        except queue.Full:
            log.warning("audit: cosignature inbox full; dropped one from %s", message.topic)

    def start(self) -> None:
        if self.link is not None:
            self.link.subscribe(COSIGNATURE_FILTER, self._on_cosignature)
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def step(self) -> PublishedCheckpoint | None:
        """One round: take the cosignatures that came in, make a checkpoint if due."""
        if self.link is not None:
            self.link.maintain()
        while True:
            try:
                payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            try:
                self._mirror(self.publisher.add_cosignature(payload))
            except AuditError as exc:
                self.rejected += 1
                log.warning("audit: cosignature refused: %s (%s)", exc, exc.reason)
        published = self.publisher.tick()
        if published is not None:
            self._mirror(published)
        return published

    def _mirror(self, published: PublishedCheckpoint) -> None:
        if self.mirror is not None:
            audit = self.publisher.store.audit
            self.mirror.publish(audit, published.size, published.note, audit.entries)

    def _run(self) -> None:
        try:
            added = self.publisher.store.audit.backfill()
            if added:
                log.info("audit: %d batches stored before the log were appended", added)
        except StoreError as exc:
            log.warning("audit: backfill failed (%s); retried at next start", exc)
        while not self._stop.is_set():
            try:
                self.step()
            except (StoreError, AuditError, OSError) as exc:
                log.warning("audit: checkpoint round failed: %s", exc)
            self._stop.wait(self.tick_s)


def start_audit(settings: AnalyticsSettings, store: Store, app: Any) -> AuditLoop | None:
    """The API process's audit loop when a log key is configured (else None)."""
    cfg = settings.audit
    if cfg.log_key is None:
        log.info("audit: no [audit] log_key configured; checkpoints are not made")
        return None
    from civicmesh.mqtt import MqttLink

    try:
        witnesses = [NoteKey.from_vkey(w) for w in cfg.witnesses]
    except ValueError as exc:
        raise AuditError(f"[audit] witnesses: {exc}", reason="config.invalid") from None
    publisher = AuditPublisher(
        store, NoteSigner.load(cfg.log_key), interval_s=cfg.interval_s, witnesses=witnesses
    )
    link = MqttLink(
        settings.mqtt.url,
        f"{settings.mqtt_client_id('audit')}-audit",
        protocol=settings.mqtt.protocol,
        **settings.mqtt.tls_args(),
    )
    app.state.audit_publisher = publisher
    app.state.audit_quorum = cfg.quorum
    loop = AuditLoop(publisher, link, cfg.mirror_dir)
    loop.start()
    return loop


# ---------------------------------------------------------------- routes

router = APIRouter(prefix=PREFIX, tags=["audit"])


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


StoreDep = Annotated[Store, Depends(_store)]


def _latest(store: Store) -> tuple[int, bytes]:
    latest = store.audit.latest_checkpoint()
    if latest is None:
        raise HTTPException(
            404, "The audit log has no checkpoint yet; one is made every few seconds"
        )
    return latest


@router.get("/checkpoint", response_class=Response)
def checkpoint(request: Request, store: StoreDep) -> Response:
    """The latest checkpoint (C2SP signed note) with its cosignatures."""
    publisher: AuditPublisher | None = getattr(request.app.state, "audit_publisher", None)
    if publisher is not None:
        current = publisher.current()
        note = current.note if current else None
    else:
        note = _latest(store)[1]
    if note is None:
        raise HTTPException(404, "The audit log has no checkpoint yet")
    return Response(
        note, media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-store"}
    )


class InclusionOut(BaseModel):
    device_id: str
    seq: int
    index: int
    size: int
    proof: list[str]
    checkpoint: str


class ConsistencyOut(BaseModel):
    size1: int
    size2: int
    proof: list[str]


def _b64(hashes: Sequence[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


@router.get("/proof/inclusion")
def proof_inclusion(
    store: StoreDep,
    device: Annotated[str, Query(min_length=16, max_length=16)],
    seq: Annotated[int, Query(ge=1)],
) -> InclusionOut:
    """Where batch (device, seq) is in the log, and its inclusion proof at the latest checkpoint."""
    size, note = _latest(store)
    index = store.audit.leaf_index(device, seq)
    if index is None:
        raise HTTPException(404, f"Batch {device} seq {seq} is not in the audit log")
    if index >= size:
        raise HTTPException(
            409,
            f"Batch {device} seq {seq} is leaf {index}, after the latest checkpoint "
            f"({size}); ask again shortly",
        )
    return InclusionOut(
        device_id=device, seq=seq, index=index, size=size,
        proof=_b64(inclusion_proof(store.audit, index, size)), checkpoint=note.decode(),
    )  # fmt: skip


@router.get("/proof/consistency")
def proof_consistency(
    store: StoreDep,
    size1: Annotated[int, Query(alias="from", ge=0)],
    size2: Annotated[int, Query(alias="to", ge=0)],
) -> ConsistencyOut:
    """The consistency proof between two tree sizes (the log never rewrites its past)."""
    size = store.audit.size()
    if not size1 <= size2 <= size:
        raise HTTPException(422, f"need from <= to <= {size} (the log's size)")
    return ConsistencyOut(
        size1=size1, size2=size2, proof=_b64(consistency_proof(store.audit, size1, size2))
    )


_TILE = re.compile(
    r"^(?P<level>entries|\d{1,2})/(?P<index>(?:x\d{3}/)*\d{3})(?:\.p/(?P<width>\d{1,3}))?$"
)


def _tile(store: Store, path: str) -> bytes:
    match = _TILE.match(path)
    if match is None:
        raise HTTPException(404, f"No tile {path!r}")
    index = int(match["index"].replace("x", "").replace("/", ""))
    width = int(match["width"]) if match["width"] else TILE_WIDTH
    if not 1 <= width <= TILE_WIDTH or (match["width"] and width == TILE_WIDTH):
        raise HTTPException(404, f"No tile {path!r}")
    size = store.audit.size()
    tile_level = 0 if match["level"] == "entries" else int(match["level"])
    if width > tile_width(tile_level, index, size):
        raise HTTPException(404, f"Tile {path!r} is beyond the log's {size} leaves")
    first = index * TILE_WIDTH
    if match["level"] == "entries":
        return encode_bundle(store.audit.entries(first, first + width))
    shift = TILE_HEIGHT * tile_level
    return b"".join(store.audit.read_nodes([(shift, first + i) for i in range(width)]))


@router.get("/tile/{path:path}", response_class=Response)
def tile(store: StoreDep, path: str) -> Response:
    """tlog-tiles hash tiles and entry bundles (immutable: cacheable for ever)."""
    data = _tile(store, path)
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )


@router.get("/registry", response_class=Response)
def registry_snapshot(request: Request) -> Response:
    """The signed registry snapshot the log's signatures are checked against."""
    snapshot: bytes | None = getattr(request.app.state, "audit_registry_snapshot", None)
    if snapshot is None:
        raise HTTPException(
            404, "No signed registry snapshot is published; verify with --registry FILE"
        )
    return Response(snapshot, media_type="application/cbor")


def install(
    app: Any, publisher: AuditPublisher | None = None, registry_snapshot: bytes | None = None
) -> None:
    """Add the public audit routes to the API app."""
    app.state.audit_publisher = publisher
    app.state.audit_registry_snapshot = registry_snapshot
    app.include_router(router)
