"""A witness: checks that each new checkpoint extends the last one it saw, then cosigns.

A witness (a gateway run by an independent operator) keeps, per log origin, the largest
checkpoint it has cosigned. Shown a new one it verifies the log signature, asks the
log for a consistency proof from its last size and verifies it, and only then cosigns
(C2SP tlog-cosignature v1). It refuses, and raises :class:`SplitViewError`, when it
sees two different roots for one size or a tree that does not extend the one it saw:
the log showed different histories to different parties. The evidence (both notes) is
kept in its state file. :meth:`Witness.observe` also takes checkpoints cosigned by
*other* witnesses (gossip), so a fork shown to two witnesses is caught by either.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from civicmesh.audit import AuditError
from civicmesh.audit.merkle import verify_consistency
from civicmesh.audit.note import (
    NoteKey,
    NoteSignature,
    NoteSigner,
    OpenedCheckpoint,
    cosign,
    open_checkpoint,
)

log = logging.getLogger(__name__)

# (old size, new size) -> the log's consistency proof between them
ProofFetcher = Callable[[int, int], Sequence[bytes]]


class SplitViewError(AuditError):
    """The log showed two histories that cannot both be true."""

    reason = "witness.split_view"


@dataclass(frozen=True, slots=True)
class SeenCheckpoint:
    size: int
    root: bytes
    note: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "root": base64.b64encode(self.root).decode(), "note": self.note}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SeenCheckpoint:
        return cls(int(obj["size"]), base64.b64decode(obj["root"]), str(obj["note"]))


class CheckpointState:
    """The largest checkpoint seen per origin, in a JSON file (witnesses and verifiers)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.seen: dict[str, SeenCheckpoint] = {}
        self.alerts: list[dict[str, Any]] = []
        if path is not None and path.exists():
            try:
                obj = json.loads(path.read_text())
                self.seen = {k: SeenCheckpoint.from_json(v) for k, v in obj["seen"].items()}
                self.alerts = list(obj.get("alerts", []))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise AuditError(
                    f"state file {path} is unreadable ({exc}); move it away to start afresh",
                    reason="state.invalid",
                ) from None

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"seen": {k: v.to_json() for k, v in self.seen.items()}, "alerts": self.alerts}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1)
        os.replace(tmp, self.path)


def check_extends(
    last: SeenCheckpoint | None, opened: OpenedCheckpoint, proof_for: ProofFetcher
) -> None:
    """Raise :class:`SplitViewError` unless ``opened`` is consistent with ``last``."""
    if last is None:
        return
    cp = opened.checkpoint
    if cp.size == last.size:
        if cp.root != last.root:
            raise SplitViewError(
                f"split view: two checkpoints of size {cp.size} with different roots "
                f"({base64.b64encode(last.root).decode()} seen before, "
                f"{base64.b64encode(cp.root).decode()} now)"
            )
        return
    small, big = (cp, last) if cp.size < last.size else (last, cp)
    try:
        proof = proof_for(small.size, big.size)
        verify_consistency(small.size, small.root, big.size, big.root, proof)
    except AuditError as exc:
        raise SplitViewError(
            f"split view: the checkpoint of size {cp.size} is not consistent with the one of "
            f"size {last.size} seen before ({exc})"
        ) from None


class Witness:
    def __init__(
        self,
        signer: NoteSigner,
        log_key: NoteKey,
        state_path: Path | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signer = signer
        self.log_key = log_key
        self.state = CheckpointState(state_path)
        self._clock = clock

    @property
    def last(self) -> SeenCheckpoint | None:
        return self.state.seen.get(self.log_key.name)

    def observe(self, note: bytes, proof_for: ProofFetcher) -> OpenedCheckpoint:
        """Check a checkpoint (the log's, or one another witness cosigned) against what
        this witness saw; raises :class:`SplitViewError` and records the evidence."""
        opened = open_checkpoint(note, self.log_key)
        last = self.last
        try:
            check_extends(last, opened, proof_for)
        except SplitViewError as exc:
            log.error("audit witness %s: %s", self.signer.name, exc)
            self.state.alerts.append(
                {
                    "at": int(self._clock()),
                    "reason": exc.reason,
                    "message": str(exc),
                    "seen": last.note if last else "",
                    "shown": note.decode("utf-8", "replace"),
                }
            )
            self.state.save()
            raise
        return opened

    def cosign(self, note: bytes, proof_for: ProofFetcher) -> NoteSignature:
        """Verify ``note`` extends what this witness saw, remember it, and cosign it."""
        opened = self.observe(note, proof_for)
        last = self.last
        if last is not None and opened.checkpoint.size < last.size:
            raise AuditError(
                f"checkpoint of size {opened.checkpoint.size} is older than the one of size "
                f"{last.size} already cosigned; not cosigning it again",
                reason="witness.stale",
            )
        self.state.seen[self.log_key.name] = SeenCheckpoint(
            opened.checkpoint.size, opened.checkpoint.root, opened.text
        )
        self.state.save()
        return cosign(opened.text, self.signer, int(self._clock()))


def cosignature_message(size: int, signature: NoteSignature) -> bytes:
    """What a witness publishes on its cosignature topic: ``<size>\\n<signature line>``."""
    return f"{size}\n{signature.line()}".encode()
