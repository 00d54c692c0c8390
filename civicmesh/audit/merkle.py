"""RFC 9162 Merkle trees: hashing, proofs from stored subtree hashes, verification.

Hashing (RFC 9162 section 2.1.1): a leaf hashes as ``SHA-256(0x00 || leaf)``, an inner
node as ``SHA-256(0x01 || left || right)``; a tree of ``n > 1`` leaves splits at the
largest power of two ``k < n``; the empty tree's root is ``SHA-256("")``.

Storage: the log keeps the hash of every *complete* subtree, addressed ``(level,
index)``: level 0 holds the leaf hashes, ``(level, i)`` covers leaves
``[i * 2**level, (i + 1) * 2**level)``. Appending a leaf adds on average two such
hashes (its own and, amortized, one parent), and never changes one already written, so
the store is append-only. Any RFC subtree ``[lo, hi)`` is a right-folded chain of at
most ``log2(n)`` complete subtrees, so a proof at any size needs O(log n) stored hashes
(read in one call) and O(log n) hashing.

Verification (:func:`verify_inclusion`, :func:`verify_consistency`) follows the
algorithms of RFC 9162 sections 2.1.3.2 and 2.1.4.2 and shares no code with proof
generation, so one checks the other.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from civicmesh.audit import AuditError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

NodeId = tuple[int, int]  # (level, index) of a complete subtree


def leaf_hash(leaf: bytes) -> bytes:
    """The RFC 9162 hash of a leaf's bytes."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 9162 hash of an inner node."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(size: int) -> int:
    """The largest power of two strictly below ``size`` (size >= 2)."""
    return 1 << ((size - 1).bit_length() - 1)


def range_nodes(lo: int, hi: int) -> list[NodeId]:
    """The complete subtrees that make up the RFC subtree ``[lo, hi)``, left to right.

    ``lo`` must be aligned as RFC subtrees are (a multiple of the power of two at or
    above ``hi - lo``); every range a proof names is.
    """
    nodes: list[NodeId] = []
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        nodes.append((level, lo >> level))
        lo += 1 << level
    return nodes


def fold(hashes: Sequence[bytes]) -> bytes:
    """The hash of a subtree from its complete parts (as :func:`range_nodes` lists them)."""
    result = hashes[-1]
    for left in reversed(hashes[:-1]):
        result = node_hash(left, result)
    return result


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The subtrees whose hashes form the inclusion proof of ``index`` (leaf to root)."""
    if not 0 <= index < size:
        raise AuditError(f"leaf {index} is not in a tree of size {size}", reason="audit.range")
    ranges: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo += k
    ranges.reverse()
    return ranges


def consistency_ranges(size1: int, size2: int) -> list[tuple[int, int]]:
    """The subtrees whose hashes form the consistency proof from ``size1`` to ``size2``."""
    if not 0 <= size1 <= size2:
        raise AuditError(
            f"no consistency proof from size {size1} to size {size2}", reason="audit.range"
        )
    if size1 == 0 or size1 == size2:
        return []
    ranges: list[tuple[int, int]] = []
    lo, hi, m, whole = 0, size2, size1, True
    while True:
        if m == hi - lo:
            if not whole:
                ranges.append((lo, hi))
            break
        k = _split(hi - lo)
        if m <= k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo += k
            m -= k
            whole = False
    ranges.reverse()
    return ranges


class HashStore(Protocol):
    """Hashes of complete subtrees; a missing one raises :class:`AuditError`."""

    def read_nodes(self, ids: Sequence[NodeId]) -> Sequence[bytes]: ...


def _hashes_of(store: HashStore, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    parts = [range_nodes(lo, hi) for lo, hi in ranges]
    wanted = sorted({node for nodes in parts for node in nodes})
    found = dict(zip(wanted, store.read_nodes(wanted), strict=True))
    return [fold([found[node] for node in nodes]) for nodes in parts]


def root_hash(store: HashStore, size: int) -> bytes:
    """The root of the first ``size`` leaves."""
    if size == 0:
        return EMPTY_ROOT
    return _hashes_of(store, [(0, size)])[0]


def inclusion_proof(store: HashStore, index: int, size: int) -> list[bytes]:
    """RFC 9162 inclusion proof (audit path) of leaf ``index`` in the tree of ``size``."""
    return _hashes_of(store, inclusion_ranges(index, size))


def consistency_proof(store: HashStore, size1: int, size2: int) -> list[bytes]:
    """RFC 9162 consistency proof between the trees of ``size1`` and ``size2`` leaves."""
    return _hashes_of(store, consistency_ranges(size1, size2))


# ---------------------------------------------------------------- verification


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root an inclusion proof leads to (RFC 9162 2.1.3.2); raises when malformed."""
    if not 0 <= index < size:
        raise AuditError(f"leaf {index} is not in a tree of size {size}", reason="audit.inclusion")
    fn, sn, result = index, size - 1, leaf
    for sibling in proof:
        if sn == 0:
            raise AuditError("inclusion proof is too long", reason="audit.inclusion")
        if fn & 1 or fn == sn:
            result = node_hash(sibling, result)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            result = node_hash(result, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise AuditError("inclusion proof is too short", reason="audit.inclusion")
    return result


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise :class:`AuditError` unless ``proof`` shows leaf hash ``leaf`` at ``index``."""
    if root_from_inclusion(index, size, leaf, proof) != root:
        raise AuditError(
            f"inclusion proof of leaf {index} does not lead to the root of size {size}",
            reason="audit.inclusion",
        )


def verify_consistency(
    size1: int, root1: bytes, size2: int, root2: bytes, proof: Sequence[bytes]
) -> None:
    """Raise :class:`AuditError` unless the tree of ``size1`` is a prefix of ``size2``."""
    what = f"from size {size1} to size {size2}"
    if not 0 <= size1 <= size2:
        raise AuditError(f"no consistency {what}: the log shrank", reason="audit.consistency")
    if size1 == size2:
        if proof:
            raise AuditError(f"consistency proof {what} must be empty", reason="audit.consistency")
        if root1 != root2:
            raise AuditError(
                f"two different roots for size {size1}: the log forked",
                reason="audit.consistency",
            )
        return
    if size1 == 0:
        if proof:
            raise AuditError(f"consistency proof {what} must be empty", reason="audit.consistency")
        return
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # a power of two: the old root is a node of the new tree
        path.insert(0, root1)
    if not path:
        raise AuditError(f"consistency proof {what} is empty", reason="audit.consistency")
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise AuditError(f"consistency proof {what} is too long", reason="audit.consistency")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0 or fr != root1 or sr != root2:
        raise AuditError(
            f"consistency proof {what} does not join the two roots: the log was rewritten",
            reason="audit.consistency",
        )


# ---------------------------------------------------------------- appending


class TreeAppender:
    """Adds leaves to a tree, yielding the new complete-subtree hashes to store.

    It holds only the *frontier*: one hash per set bit of the size (the complete
    subtrees left of the next leaf), so it starts from a store in one small read.
    """

    def __init__(self, size: int = 0, frontier: Sequence[bytes] = ()) -> None:
        nodes = range_nodes(0, size)
        if len(frontier) != len(nodes):
            raise AuditError(
                f"a tree of size {size} has {len(nodes)} frontier hashes, not {len(frontier)}",
                reason="audit.store",
            )
        self.size = size
        self._frontier = {level: h for (level, _), h in zip(nodes, frontier, strict=True)}

    @classmethod
    def from_store(cls, store: HashStore, size: int) -> TreeAppender:
        return cls(size, store.read_nodes(range_nodes(0, size)) if size else ())

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf hash; returns the ``(level, index, hash)`` nodes it completes."""
        index = self.size
        new = [(0, index, leaf)]
        h, level, i = leaf, 0, index
        while i & 1:
            h = node_hash(self._frontier.pop(level), h)
            i >>= 1
            level += 1
            new.append((level, i, h))
        self._frontier[level] = h
        self.size += 1
        return new

    def extend(self, leaves: Iterable[bytes]) -> list[tuple[int, int, bytes]]:
        new: list[tuple[int, int, bytes]] = []
        for leaf in leaves:
            new.extend(self.append(leaf))
        return new

    def frontier(self) -> list[bytes]:
        """The frontier hashes, left to right (what :meth:`__init__` takes back)."""
        return [self._frontier[level] for level in sorted(self._frontier, reverse=True)]

    def root(self) -> bytes:
        if not self.size:
            return EMPTY_ROOT
        levels = sorted(self._frontier, reverse=True)  # left (big) to right (small)
        return fold([self._frontier[level] for level in levels])


def root_of(leaf_hashes: Iterable[bytes]) -> bytes:
    """The root of a tree with these leaf hashes (streaming, O(log n) memory)."""
    appender = TreeAppender()
    for h in leaf_hashes:
        appender.append(h)
    return appender.root()


# ---------------------------------------------------------------- stores


class MemoryHashStore:
    """A dict of subtree hashes (tests, small mirrors)."""

    def __init__(self) -> None:
        self.nodes: dict[NodeId, bytes] = {}

    def write_nodes(self, nodes: Iterable[tuple[int, int, bytes]]) -> None:
        for level, index, h in nodes:
            self.nodes[(level, index)] = h

    def read_nodes(self, ids: Sequence[NodeId]) -> list[bytes]:
        try:
            return [self.nodes[node] for node in ids]
        except KeyError as exc:
            raise AuditError(
                f"no stored hash for node {exc.args[0]}", reason="audit.store"
            ) from None


@dataclass(frozen=True, slots=True)
class _LevelFile:
    fd: int
    path: Path


class FileHashStore:
    """Subtree hashes in flat files, one per level (``level-L.bin``, 32 bytes each at
    offset ``32 * index``): a read is one ``pread``, at any size."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[int, _LevelFile] = {}
        self._lock = threading.Lock()

    def _file(self, level: int) -> _LevelFile:
        found = self._files.get(level)
        if found is None:
            path = self.directory / f"level-{level}.bin"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            found = self._files[level] = _LevelFile(fd, path)
        return found

    def read_nodes(self, ids: Sequence[NodeId]) -> list[bytes]:
        out: list[bytes] = []
        with self._lock:
            for level, index in ids:
                data = os.pread(self._file(level).fd, HASH_SIZE, index * HASH_SIZE)
                if len(data) != HASH_SIZE:
                    raise AuditError(
                        f"no stored hash for node {(level, index)}", reason="audit.store"
                    )
                out.append(data)
        return out

    def write_nodes(self, nodes: Iterable[tuple[int, int, bytes]]) -> None:
        with self._lock:
            for level, index, h in nodes:
                os.pwrite(self._file(level).fd, h, index * HASH_SIZE)

    def write_level(self, level: int, start: int, hashes: bytes) -> None:
        """Write a run of hashes of one level (bulk building)."""
        with self._lock:
            os.pwrite(self._file(level).fd, hashes, start * HASH_SIZE)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                os.close(f.fd)
            self._files.clear()
