"""The static mirror of the log: a C2SP tlog-tiles-like layout of plain files.

::

    checkpoint                    the latest checkpoint, with its cosignatures
    tile/<L>/<N>[.p/<W>]          hash tiles: tile level L, index N, width W < 256 if partial
    tile/entries/<N>[.p/<W>]      entry bundles: the leaves' signed batches
    registry                      the signed registry snapshot (device and gateway keys)

As in tlog-tiles, tiles have height 8: the tile at level ``L``, index ``N`` holds the
hashes of tree level ``8 * L``, nodes ``256 * N`` to ``256 * N + W - 1``, concatenated;
``N`` is written in groups of three digits, all but the last prefixed ``x``
(``1234067`` -> ``x001/x234/067``). A partial tile is replaced by the full one once
the level holds 256 nodes there.

Unlike tlog-tiles, an entry in a bundle is a 32-bit big-endian length (an envelope may
exceed the 64 KiB of a 16-bit one) followed by the gateway envelope bytes; the leaf is
derived from them (see :mod:`civicmesh.audit.leaf`).

Anyone can mirror the folder with plain HTTP; :class:`FolderSource` and
:class:`HttpSource` read it from a folder or from the API (``/api/v1/audit/``).
"""

from __future__ import annotations

import os
import struct
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from civicmesh.audit import AuditError
from civicmesh.audit.merkle import HASH_SIZE, HashStore, NodeId, node_hash

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_ENTRY_BYTES = 1 << 20


def encode_index(n: int) -> str:
    """``1234067`` -> ``x001/x234/067`` (tlog-tiles path encoding)."""
    digits = str(n)
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    return "/".join([*("x" + g for g in groups[:-1]), groups[-1]])


def tile_path(tile_level: int, index: int, width: int = TILE_WIDTH) -> str:
    base = f"tile/{tile_level}/{encode_index(index)}"
    return base if width == TILE_WIDTH else f"{base}.p/{width}"


def entries_path(index: int, width: int = TILE_WIDTH) -> str:
    base = f"tile/entries/{encode_index(index)}"
    return base if width == TILE_WIDTH else f"{base}.p/{width}"


def tile_width(tile_level: int, index: int, size: int) -> int:
    """How many hashes the tile holds in a tree of ``size`` leaves (0: none yet)."""
    count = size >> (TILE_HEIGHT * tile_level)
    return max(0, min(TILE_WIDTH, count - index * TILE_WIDTH))


def encode_bundle(entries: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(e)) + e for e in entries)


def decode_bundle(data: bytes, expected: int, where: str) -> list[bytes]:
    entries: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise AuditError(f"{where}: truncated entry length", reason="entries.malformed")
        (length,) = struct.unpack_from(">I", data, offset)
        offset += 4
        if length > MAX_ENTRY_BYTES or offset + length > len(data):
            raise AuditError(f"{where}: truncated entry", reason="entries.malformed")
        entries.append(data[offset : offset + length])
        offset += length
    if len(entries) != expected:
        raise AuditError(
            f"{where} holds {len(entries)} entries where the tree has {expected}: "
            "entries were removed or added",
            reason="entries.count",
        )
    return entries


# ---------------------------------------------------------------- sources


class Source(Protocol):
    """Where a verifier reads the mirror from."""

    def get(self, path: str) -> bytes: ...

    def describe(self) -> str: ...


class FolderSource:
    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, path: str) -> bytes:
        try:
            return (self.root / path).read_bytes()
        except FileNotFoundError:
            raise AuditError(f"{self.root / path} is missing", reason="source.missing") from None
        except OSError as exc:
            raise AuditError(
                f"cannot read {self.root / path}: {exc}", reason="source.read"
            ) from None

    def describe(self) -> str:
        return str(self.root)


class HttpSource:
    """The API's audit files (``<base>/checkpoint``, ``<base>/tile/...``) over HTTP."""

    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.base = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def get(self, path: str) -> bytes:
        url = f"{self.base}/{path}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as exc:
            reason = "source.missing" if exc.code == 404 else "source.fetch"
            raise AuditError(f"GET {url}: HTTP {exc.code}", reason=reason) from None
        except (urllib.error.URLError, OSError) as exc:
            raise AuditError(f"GET {url} failed: {exc}", reason="source.fetch") from None

    def describe(self) -> str:
        return self.base


def open_source(where: str) -> Source:
    """A folder path or an ``http(s)://`` URL."""
    if where.startswith(("http://", "https://")):
        return HttpSource(where)
    path = Path(where)
    if not path.is_dir():
        raise AuditError(f"{where} is neither a folder nor an http(s) URL", reason="source.missing")
    return FolderSource(path)


def _complete(hashes: Sequence[bytes]) -> bytes:
    """The root of a complete subtree over a power-of-two run of hashes."""
    level = list(hashes)
    while len(level) > 1:
        level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


class TileHashStore:
    """A :class:`HashStore` that reads the hashes of a tree of ``size`` from tiles."""

    def __init__(self, source: Source, size: int) -> None:
        self.source = source
        self.size = size
        self._tiles: dict[tuple[int, int], list[bytes]] = {}

    def tile(self, tile_level: int, index: int) -> list[bytes]:
        key = (tile_level, index)
        found = self._tiles.get(key)
        if found is None:
            width = tile_width(tile_level, index, self.size)
            if width == 0:
                raise AuditError(
                    f"tile {tile_level}/{index} is beyond a tree of size {self.size}",
                    reason="audit.store",
                )
            path = tile_path(tile_level, index, width)
            data = self.source.get(path)
            if len(data) != width * HASH_SIZE:
                raise AuditError(
                    f"tile {path} is {len(data)} bytes, not {width * HASH_SIZE}",
                    reason="tile.malformed",
                )
            found = [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]
            self._tiles[key] = found
        return found

    def read_nodes(self, ids: Sequence[NodeId]) -> list[bytes]:
        out: list[bytes] = []
        for level, index in ids:
            tile_level, rest = divmod(level, TILE_HEIGHT)
            first = index << rest  # the node's first hash at the tile's level
            tile = self.tile(tile_level, first >> TILE_HEIGHT)
            start = first - (first >> TILE_HEIGHT << TILE_HEIGHT)
            part = tile[start : start + (1 << rest)]
            if len(part) != 1 << rest:
                raise AuditError(f"node {(level, index)} is not complete", reason="audit.store")
            out.append(_complete(part))
        return out


# ---------------------------------------------------------------- writing


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tiles(
    directory: Path,
    store: HashStore,
    old_size: int,
    new_size: int,
    entries: Callable[[int, int], Sequence[bytes]] | None = None,
) -> int:
    """Write every hash tile (and entry bundle) that leaves ``[old_size, new_size)`` touch.

    ``entries(lo, hi)`` returns the signed batches of leaves ``lo`` to ``hi - 1``.
    Returns the number of files written.
    """
    written = 0
    tile_level = 0
    while new_size >> (TILE_HEIGHT * tile_level):
        shift = TILE_HEIGHT * tile_level
        first_tile = (old_size >> shift) >> TILE_HEIGHT
        last_tile = ((new_size >> shift) - 1) >> TILE_HEIGHT
        for index in range(first_tile, last_tile + 1):
            width = tile_width(tile_level, index, new_size)
            ids = [(shift, index * TILE_WIDTH + i) for i in range(width)]
            _write_atomic(
                directory / tile_path(tile_level, index, width), b"".join(store.read_nodes(ids))
            )
            written += 1
            if tile_level == 0 and entries is not None:
                lo = index * TILE_WIDTH
                bundle = encode_bundle(entries(lo, lo + width))
                _write_atomic(directory / entries_path(index, width), bundle)
                written += 1
        tile_level += 1
    return written


def write_file(directory: Path, name: str, data: bytes) -> None:
    """Write ``checkpoint`` or ``registry`` atomically."""
    _write_atomic(directory / name, data)
