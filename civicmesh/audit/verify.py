"""``civicmesh audit verify``: check the log from its static files, trusting nothing but keys.

Given a mirror folder or the API's audit URL, the log's public key, the witnesses'
keys and the registry, it checks in this order and stops at the first failure, which
it names (reason, leaf index, device, seq):

1. the checkpoint: signed by the log key, cosigned by at least ``quorum`` witnesses;
2. consistency with every checkpoint seen before (the state file) and with checkpoints
   seen elsewhere (``--peer``): a rewritten or forked history fails here;
3. the tree: the root of the level-0 tiles is the checkpoint's root, and every higher
   tile holds the hashes the level below gives;
4. the entries of the range: the gateway's and the device's signatures against the
   registry, each entry's leaf hash against the tree, and each device's hash chain
   (seq order, prev-hash links, gaps).

Signature checks run on all cores (``--jobs``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from civicmesh.audit import AuditError
from civicmesh.audit.leaf import make_leaf
from civicmesh.audit.merkle import (
    consistency_proof,
    leaf_hash,
    node_hash,
    root_of,
)
from civicmesh.audit.note import NoteKey, OpenedCheckpoint, open_checkpoint
from civicmesh.audit.tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    Source,
    TileHashStore,
    decode_bundle,
    entries_path,
    tile_width,
)
from civicmesh.audit.witness import (
    CheckpointState,
    ProofFetcher,
    SeenCheckpoint,
    SplitViewError,
    check_extends,
)
from civicmesh.identity import VerifyKey
from civicmesh.protocol import (
    GENESIS_HASH,
    ProtocolError,
    open_batch_header,
    open_envelope,
    open_registry_snapshot,
)
from civicmesh.registry import Registry


@dataclass(frozen=True, slots=True)
class Failure:
    reason: str
    message: str
    index: int | None = None

    def __str__(self) -> str:
        where = f"leaf {self.index}: " if self.index is not None else ""
        return f"{self.reason}: {where}{self.message}"


@dataclass(slots=True)
class VerifyReport:
    source: str
    size: int = 0
    root: bytes = b""
    cosigned_by: tuple[tuple[str, int], ...] = ()
    checked_from: int = 0
    checked_to: int = 0
    devices: int = 0
    gaps: list[str] = field(default_factory=list)
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def lines(self) -> list[str]:
        import base64

        out = [f"source: {self.source}"]
        if self.size or self.root:
            out.append(f"checkpoint: size {self.size}, root {base64.b64encode(self.root).decode()}")
            names = ", ".join(n for n, _ in self.cosigned_by) or "none"
            out.append(f"cosigned by: {names}")
        if self.checked_to > self.checked_from:
            out.append(
                f"entries checked: {self.checked_from}..{self.checked_to - 1} "
                f"({self.checked_to - self.checked_from} batches, {self.devices} devices)"
            )
        if self.gaps:
            out.append(f"chain gaps: {len(self.gaps)} (first: {self.gaps[0]})")
        out.append("result: OK" if self.failure is None else f"result: FAILED {self.failure}")
        return out


@dataclass(frozen=True, slots=True)
class Trust:
    """What the verifier trusts: keys, not the server."""

    log_key: NoteKey
    registry: Registry
    witnesses: tuple[NoteKey, ...] = ()
    quorum: int = 0


class _Fail(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(str(failure))
        self.failure = failure


def registry_from_snapshot(data: bytes, authority: VerifyKey) -> Registry:
    """The registry inside a snapshot signed by ``authority``."""
    try:
        snapshot = open_registry_snapshot(data, authority)
    except ProtocolError as exc:
        raise AuditError(f"registry snapshot: {exc}", reason="registry.signature") from None
    return Registry.from_json(snapshot.registry_json.decode(), origin="registry snapshot")


# ---------------------------------------------------------------- entry checks (workers)

_KEYS: dict[str, tuple[dict[str, tuple[VerifyKey, ...]], dict[str, VerifyKey]]] = {}

# (device id, seq, payload hash, prev hash, leaf hash) or (reason, message)
Checked = tuple[str, int, bytes, bytes, bytes] | tuple[str, str]


def _key_tables(
    registry: Registry,
) -> tuple[dict[str, tuple[VerifyKey, ...]], dict[str, VerifyKey]]:
    devices: dict[str, tuple[VerifyKey, ...]] = {}
    for d in registry.devices.values():
        keys = [d.verify_key()]
        if d.previous_key is not None:
            keys.append(replace(VerifyKey.from_text(d.previous_key), bound_id=d.device_id))
        devices[d.device_id] = tuple(keys)
    # bound_id: the id is known, so it is not derived again for every envelope
    gateways = {
        g.gateway_id: replace(g.verify_key(), bound_id=g.gateway_id)
        for g in registry.gateways.values()
    }
    return devices, gateways


def _init_worker(registry_json: str) -> None:
    _KEYS["keys"] = _key_tables(Registry.from_json(registry_json))


def _check_entries(envelopes: Sequence[bytes]) -> list[Checked]:
    devices, gateways = _KEYS["keys"]
    out: list[Checked] = []
    for message in envelopes:
        try:
            envelope = open_envelope(message, gateways.get)
        except ProtocolError as exc:
            out.append((f"signature.gateway.{exc.reason}", f"gateway envelope: {exc}"))
            continue
        try:
            batch = open_batch_header(envelope.device_message, devices.get)
        except ProtocolError as exc:
            out.append((f"signature.device.{exc.reason}", f"device batch: {exc}"))
            continue
        leaf = make_leaf(batch.device_id, batch.seq, envelope.device_message, message)
        out.append(
            (
                batch.device_id,
                batch.seq,
                batch.hash,
                batch.prev_hash,
                leaf_hash(leaf.encode()),
            )
        )
    return out


# ---------------------------------------------------------------- the verifier


class Verifier:
    def __init__(
        self,
        source: Source,
        trust: Trust,
        *,
        state: CheckpointState | None = None,
        peers: Sequence[bytes] = (),
        allow_gaps: bool = False,
        jobs: int = 1,
        wait_witnesses_s: float = 0.0,
    ) -> None:
        self.source = source
        self.trust = trust
        self.state = state
        self.peers = peers
        self.allow_gaps = allow_gaps
        self.jobs = max(1, jobs)
        self.wait_witnesses_s = wait_witnesses_s

    def _checkpoint(self) -> OpenedCheckpoint:
        """The source's checkpoint. A live log publishes a checkpoint before its witnesses
        have cosigned it (they do within seconds), so one short of the quorum is fetched
        again for up to ``wait_witnesses_s`` before that counts as a failure."""
        t = self.trust
        deadline = time.monotonic() + self.wait_witnesses_s
        while True:
            try:
                return open_checkpoint(
                    self.source.get("checkpoint"), t.log_key, t.witnesses, t.quorum
                )
            except AuditError as exc:
                if exc.reason != "checkpoint.witnesses" or time.monotonic() >= deadline:
                    raise
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def run(self, start: int = 0, end: int | None = None) -> VerifyReport:
        report = VerifyReport(self.source.describe())
        try:
            self._run(report, start, end)
        except _Fail as fail:
            report.failure = fail.failure
        except AuditError as exc:
            report.failure = Failure(exc.reason, str(exc))
        return report

    def _run(self, report: VerifyReport, start: int, end: int | None) -> None:
        opened = self._checkpoint()
        cp = opened.checkpoint
        report.size, report.root, report.cosigned_by = cp.size, cp.root, opened.cosigned_by
        tiles = TileHashStore(self.source, cp.size)

        def proof_for(m: int, n: int) -> list[bytes]:
            return consistency_proof(TileHashStore(self.source, n), m, n)

        self._check_history(opened, proof_for)
        leaves = self._check_tree(tiles, cp.size, cp.root)
        end = cp.size if end is None else min(end, cp.size)
        if not 0 <= start <= end:
            raise _Fail(Failure("range.invalid", f"range {start}..{end} is not in the log"))
        self._check_entries(report, leaves, start, end)
        if self.state is not None:
            self.state.seen[self.trust.log_key.name] = SeenCheckpoint(cp.size, cp.root, opened.text)
            self.state.save()

    def _check_history(self, opened: OpenedCheckpoint, fetch: ProofFetcher) -> None:
        last = self.state.seen.get(self.trust.log_key.name) if self.state is not None else None
        try:
            check_extends(last, opened, fetch)
        except SplitViewError as exc:
            raise _Fail(
                Failure(
                    "checkpoint.consistency",
                    f"{exc}; the log's history changed since this verifier last saw it",
                )
            ) from None
        for note in self.peers:
            try:
                peer = open_checkpoint(note, self.trust.log_key)
            except AuditError as exc:
                raise _Fail(Failure(f"peer.{exc.reason}", f"peer checkpoint: {exc}")) from None
            seen = SeenCheckpoint(peer.checkpoint.size, peer.checkpoint.root, peer.text)
            try:
                check_extends(seen, opened, fetch)
            except SplitViewError as exc:
                names = ", ".join(n for n, _ in peer.cosigned_by) or "the log"
                raise _Fail(
                    Failure("checkpoint.split_view", f"{exc} (the other view shown to {names})")
                ) from None

    def _check_tree(self, tiles: TileHashStore, size: int, root: bytes) -> list[bytes]:
        """The level-0 hashes, after checking that they and the higher tiles give ``root``."""
        leaves: list[bytes] = []
        for index in range((size + TILE_WIDTH - 1) // TILE_WIDTH):
            leaves.extend(tiles.tile(0, index))
        if len(leaves) != size:
            raise _Fail(Failure("tile.count", f"level-0 tiles hold {len(leaves)} of {size} hashes"))
        got = root_of(leaves)
        if got != root:
            raise _Fail(
                Failure(
                    "tree.root",
                    f"the leaf hashes give another root than the checkpoint of size {size}: "
                    "the tiles were changed after it was signed",
                )
            )
        level = leaves
        tile_level = 0
        while True:
            for _ in range(TILE_HEIGHT):
                level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            tile_level += 1
            if not level:
                break
            for index in range((len(level) + TILE_WIDTH - 1) // TILE_WIDTH):
                want = level[
                    index * TILE_WIDTH : index * TILE_WIDTH + tile_width(tile_level, index, size)
                ]
                if tiles.tile(tile_level, index) != want:
                    raise _Fail(
                        Failure(
                            "tile.mismatch",
                            f"tile {tile_level}/{index} does not hold the hashes of the level "
                            "below",
                        )
                    )
        return leaves

    def _entries(self, start: int, end: int) -> Iterator[tuple[int, list[bytes]]]:
        index = start // TILE_WIDTH
        while index * TILE_WIDTH < end:
            width = tile_width(0, index, self._size)
            path = entries_path(index, width)
            bundle = decode_bundle(self.source.get(path), width, path)
            lo = index * TILE_WIDTH
            yield lo, bundle
            index += 1

    def _check_entries(
        self, report: VerifyReport, leaves: list[bytes], start: int, end: int
    ) -> None:
        self._size = len(leaves)
        report.checked_from, report.checked_to = start, end
        registry_json = self.trust.registry.to_json()
        chunks = list(self._entries(start, end))
        heads: dict[str, tuple[int, bytes]] = {}
        if self.jobs > 1 and end - start > 2 * TILE_WIDTH:
            pool = ProcessPoolExecutor(
                self.jobs, initializer=_init_worker, initargs=(registry_json,)
            )
            with pool:
                results = pool.map(_check_entries, [b for _, b in chunks], chunksize=4)
                for (lo, _), checked in zip(chunks, results, strict=True):
                    self._judge(report, heads, leaves, lo, checked, start, end)
        else:
            _init_worker(registry_json)
            for lo, bundle in chunks:
                self._judge(report, heads, leaves, lo, _check_entries(bundle), start, end)
        report.devices = len(heads)

    def _judge(
        self,
        report: VerifyReport,
        heads: dict[str, tuple[int, bytes]],
        leaves: list[bytes],
        lo: int,
        checked: list[Checked],
        start: int,
        end: int,
    ) -> None:
        for offset, result in enumerate(checked):
            index = lo + offset
            if not start <= index < end:
                continue
            if len(result) == 2:
                reason, message = result
                raise _Fail(Failure(str(reason), f"{message}: the stored batch was changed", index))
            device, seq, payload_hash, prev_hash, hashed = result
            where = f"device {device} seq {seq}"
            if hashed != leaves[index]:
                raise _Fail(
                    Failure(
                        "leaf.mismatch",
                        f"{where}: the entry does not hash to the leaf in the tree",
                        index,
                    )
                )
            head = heads.get(device)
            if head is None:
                if seq == 1 and prev_hash != GENESIS_HASH:
                    raise _Fail(
                        Failure("chain.fork", f"{where}: seq 1 must start from genesis", index)
                    )
            else:
                last_seq, last_hash = head
                if seq <= last_seq:
                    raise _Fail(
                        Failure(
                            "chain.order",
                            f"{where} comes after seq {last_seq} in the log: batches were "
                            "reordered or replayed",
                            index,
                        )
                    )
                if seq == last_seq + 1 and prev_hash != last_hash:
                    raise _Fail(
                        Failure(
                            "chain.fork",
                            f"{where} does not link to seq {last_seq} (prev-hash differs)",
                            index,
                        )
                    )
                if seq > last_seq + 1:
                    gap = f"{where} follows seq {last_seq} (leaf {index})"
                    if not self.allow_gaps:
                        raise _Fail(
                            Failure(
                                "chain.gap",
                                f"{where} follows seq {last_seq}: {seq - last_seq - 1} batches "
                                "missing from the log (deleted, or lost before ingest; "
                                "--allow-gaps accepts the latter)",
                                index,
                            )
                        )
                    report.gaps.append(gap)
            heads[device] = (int(seq), bytes(payload_hash))


def default_jobs() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def read_key_arg(value: str) -> str:
    """A key given inline, or ``@path`` / a path to a file holding it."""
    path = Path(value[1:] if value.startswith("@") else value)
    if value.startswith("@") or (path.exists() and path.is_file()):
        return path.read_text().strip()
    return value
