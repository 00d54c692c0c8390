"""The writing side of the log (central): append leaves, sign checkpoints, publish files.

Kept apart from the verifier on purpose: nothing in :mod:`civicmesh.audit.verify` uses
this module. The store is any :class:`WritableHashStore` (files, memory, or the
central database inside the batch's own transaction).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from civicmesh.audit.merkle import HashStore, TreeAppender, leaf_hash, root_hash
from civicmesh.audit.note import (
    Checkpoint,
    NoteSignature,
    NoteSigner,
    add_signatures,
    sign_checkpoint,
)
from civicmesh.audit.tiles import write_file, write_tiles

DAY_S = 86_400


class WritableHashStore(HashStore, Protocol):
    def write_nodes(self, nodes: Iterable[tuple[int, int, bytes]]) -> None: ...


class LogWriter:
    """Appends leaves to a store; one writer per log (the caller serializes appends)."""

    def __init__(self, store: WritableHashStore, size: int = 0) -> None:
        self.store = store
        self._appender = TreeAppender.from_store(store, size)

    @property
    def size(self) -> int:
        return self._appender.size

    def append(self, leaves: Sequence[bytes]) -> list[int]:
        """Add leaves (their bytes); returns their indexes."""
        first = self._appender.size
        self.store.write_nodes(self._appender.extend(leaf_hash(leaf) for leaf in leaves))
        return list(range(first, first + len(leaves)))

    def root(self) -> bytes:
        return self._appender.root()


def make_checkpoint(signer: NoteSigner, store: HashStore, size: int) -> bytes:
    """The signed checkpoint of the first ``size`` leaves (origin: the log key's name)."""
    return sign_checkpoint(Checkpoint(signer.name, size, root_hash(store, size)), signer)


@dataclass(slots=True)
class CheckpointSchedule:
    """A checkpoint every ``interval_s`` while the log grows, and one at each UTC day's
    close (so every day ends on a checkpoint, even a quiet one)."""

    interval_s: float
    last_at: float = 0.0
    last_size: int = -1

    def due(self, size: int, now: float) -> bool:
        if self.last_size < 0:
            return True
        day_closed = int(now // DAY_S) != int(self.last_at // DAY_S)
        grown = size != self.last_size and now - self.last_at >= self.interval_s
        return day_closed or grown

    def made(self, size: int, now: float) -> None:
        self.last_at, self.last_size = now, size


class Mirror:
    """The static files of the log in a folder (served by the API, mirrored by anyone)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.published = 0

    def publish(
        self,
        store: HashStore,
        size: int,
        note: bytes,
        entries: Callable[[int, int], Sequence[bytes]],
        cosignatures: Sequence[NoteSignature] = (),
    ) -> None:
        """Write the tiles and bundles grown since the last publish, then the checkpoint."""
        write_tiles(self.directory, store, self.published, size, entries)
        if cosignatures:
            note = add_signatures(note, cosignatures)
        write_file(self.directory, "checkpoint", note)
        self.published = size

    def publish_registry(self, snapshot: bytes) -> None:
        write_file(self.directory, "registry", snapshot)


def now_s() -> float:
    return time.time()
