"""Write: one group of messages into the store, transient failures retried, permanent
ones isolated.

A group is written with one ``write_batches`` call and one ``add_quarantine`` call.
When the store fails, :func:`analytics.ingest.errors.is_permanent` decides: a transient
failure (the database away) keeps the group and retries with backoff; a permanent one
(the data) splits the group in halves until the one batch or record the database refuses
is found, and that one is quarantined with the database's reason. The rest of the group
is written, so one bad value never stalls what arrives behind it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from analytics.ingest.errors import PARAMETER_ERRORS, describe, is_permanent
from analytics.ingest.verify import Verified
from analytics.store.base import Store, StoreError, WriteOutcome
from civicmesh.quarantine import QuarantineRecord

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Refused:
    """The store refused this item for good (its data): the database's reason."""

    detail: str


@dataclass(slots=True)
class WriteResult:
    outcomes: list[WriteOutcome | Refused]  # one per verified batch
    records: list[QuarantineRecord]  # every record that was stored
    dropped_records: int  # records even the fallback record of could not be stored


class GroupWriter:
    """Writes groups for one worker; reports store health through ``on_failure``/``on_ok``."""

    def __init__(
        self,
        store: Store,
        stopping: threading.Event,
        on_failure: Callable[[BaseException, float], None],
        refused_record: Callable[[QuarantineRecord, str], QuarantineRecord],
    ) -> None:
        self.store = store
        self._stopping = stopping
        self._on_failure = on_failure
        self._refused_record = refused_record

    def write(
        self, verified: Sequence[Verified], records: Sequence[QuarantineRecord]
    ) -> WriteResult | None:
        """Store the group; None only when asked to stop while the store still fails."""
        outcomes = self._each([v.batch for v in verified], self.store.write_batches)
        if outcomes is None:
            return None
        refused = [
            self._refused_record(_batch_record(v), o.detail)
            for v, o in zip(verified, outcomes, strict=True)
            if isinstance(o, Refused)
        ]
        wanted = [*records, *refused]
        stored = self._each(wanted, self._add_records)
        if stored is None:
            return None
        kept = [r for r, s in zip(wanted, stored, strict=True) if not isinstance(s, Refused)]
        # A record the store refuses (it passed our checks: a bug, or a store's own limit)
        # is replaced by one that carries only ingest's text and the database's reason.
        fallbacks = [
            self._refused_record(r, s.detail)
            for r, s in zip(wanted, stored, strict=True)
            if isinstance(s, Refused)
        ]
        again = self._each(fallbacks, self._add_records) if fallbacks else []
        if again is None:
            return None
        kept += [r for r, s in zip(fallbacks, again, strict=True) if not isinstance(s, Refused)]
        dropped = sum(isinstance(s, Refused) for s in again)
        if dropped:
            log.error("%d quarantine records could not be stored in any form; dropped", dropped)
        return WriteResult(list(outcomes), kept, dropped)

    def _add_records(self, chunk: Sequence[QuarantineRecord]) -> list[None]:
        self.store.add_quarantine(chunk)
        return [None] * len(chunk)

    def _each(
        self, items: Sequence[T], write: Callable[[Sequence[T]], Sequence[R]]
    ) -> list[R | Refused] | None:
        """``write`` over ``items``: retried while the store is away, halved around what it
        refuses for good. Each item is written once: results of halves already written are
        kept when a later half waits for the database."""
        results: dict[int, R | Refused] = {}
        pending: list[list[int]] = [list(range(len(items)))] if items else []
        delay = RETRY_MIN_S
        while pending:
            chunk = pending.pop()
            try:
                written = write([items[i] for i in chunk])
            except (StoreError, *PARAMETER_ERRORS) as exc:
                if not is_permanent(exc):
                    pending.append(chunk)
                    self._on_failure(exc, delay)
                    if self._stopping.wait(delay):
                        return None
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                if len(chunk) == 1:
                    results[chunk[0]] = Refused(describe(exc))
                    log.warning("store refused an item for good: %s", describe(exc))
                    continue
                half = len(chunk) // 2
                pending += [chunk[half:], chunk[:half]]
                continue
            delay = RETRY_MIN_S
            results.update(zip(chunk, written, strict=True))
        return [results[i] for i in range(len(items))]


def _batch_record(entry: Verified) -> QuarantineRecord:
    """The record of a batch the store refused: its whole message, for re-ingest later."""
    batch = entry.batch
    return QuarantineRecord.of(
        reason="store.refused",
        detail=f"device {batch.device_id} seq {batch.seq}",
        source="",
        topic=entry.item.message.topic,
        received_at_ms=entry.item.arrived_ms,
        payload=entry.item.message.payload,
        device_id=batch.device_id,
        seq=batch.seq,
    )
