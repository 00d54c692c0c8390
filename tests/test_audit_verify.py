"""``civicmesh audit verify`` against an honest log and against each kind of tampering.

Each tamper test changes the published files the way a dishonest or broken central
service would, and asserts the specific reason the verifier names (and the leaf, where
there is one).
"""

from __future__ import annotations

import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from civicmesh.audit.example import (
    ExampleLog,
    build_example,
    device_signer,
    gateway_signer,
    reading_value,
    write_log,
)
from civicmesh.audit.leaf import make_leaf
from civicmesh.audit.log import Mirror, make_checkpoint
from civicmesh.audit.merkle import MemoryHashStore, TreeAppender, consistency_proof, leaf_hash
from civicmesh.audit.note import Checkpoint, NoteSigner, add_signatures, sign_checkpoint, split_note
from civicmesh.audit.tiles import (
    FolderSource,
    decode_bundle,
    encode_bundle,
    entries_path,
    tile_path,
)
from civicmesh.audit.verify import Trust, Verifier, VerifyReport
from civicmesh.audit.witness import CheckpointState, SplitViewError, Witness
from civicmesh.cli import main
from civicmesh.protocol import (
    Reading,
    make_payload,
    open_batch,
    open_envelope,
    seal_batch,
    wrap_envelope,
)

DEVICES, BATCHES = 3, 4  # 12 entries, device d's seq s at leaf (s - 1) * 3 + d


def _verify(
    log: ExampleLog,
    directory: Path | None = None,
    *,
    quorum: int = 0,
    state: Path | None = None,
    peers: tuple[bytes, ...] = (),
    allow_gaps: bool = False,
) -> VerifyReport:
    trust = Trust(log.signer.key, log.registry, tuple(w.key for w in log.witnesses), quorum)
    return Verifier(
        FolderSource(directory or log.directory),
        trust,
        state=CheckpointState(state) if state else None,
        peers=peers,
        allow_gaps=allow_gaps,
    ).run()


def _failed(report: VerifyReport, reason: str, index: int | None = None) -> None:
    assert report.failure is not None, "\n".join(report.lines())
    assert report.failure.reason == reason, str(report.failure)
    if index is not None:
        assert report.failure.index == index, str(report.failure)


def _rebuild(log: ExampleLog, envelopes: list[bytes]) -> None:
    """The central rewrites its log from scratch and signs it with the real log key."""
    shutil.rmtree(log.directory / "tile")
    write_log(log.directory, log.signer, log.registry, envelopes, witnesses=[])


def _bundle(log: ExampleLog) -> tuple[Path, list[bytes]]:
    width = len(log.envelopes)
    path = log.directory / entries_path(0, width)
    return path, decode_bundle(path.read_bytes(), width, "bundle")


@pytest.fixture
def log(tmp_path: Path) -> ExampleLog:
    return build_example(tmp_path / "mirror", devices=DEVICES, batches_per_device=BATCHES)


def test_an_honest_log_verifies_with_both_cosignatures(log: ExampleLog, tmp_path: Path) -> None:
    report = _verify(log, quorum=2, state=tmp_path / "state.json")
    assert report.ok, "\n".join(report.lines())
    assert (report.size, report.devices, report.checked_to) == (12, 3, 12)
    assert [n for n, _ in report.cosigned_by] == ["witness.example/w0", "witness.example/w1"]
    assert _verify(log, quorum=2, state=tmp_path / "state.json").ok  # same log, state agrees


def test_the_cli_verifies_and_names_the_first_failure(
    log: ExampleLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "registry.json"
    log.registry.save(registry)
    args = ["audit", "verify", str(log.directory), "--log-key", log.signer.key.to_vkey()]
    args += ["--registry", str(registry), "--state", str(tmp_path / "s.json"), "--jobs", "1"]
    for w in log.witnesses:
        args += ["--witness", w.key.to_vkey()]
    assert main(args) == 0
    assert "result: OK" in capsys.readouterr().out
    path, entries = _bundle(log)
    path.write_bytes(encode_bundle(entries[:5] + entries[6:]))
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "result: FAILED entries.count" in out
    assert main([*args[:3], "--log-key", "not a key"]) == 1  # a clear error, not a traceback
    assert "--log-key" in capsys.readouterr().err


def test_a_changed_reading_value_breaks_the_signatures(log: ExampleLog) -> None:
    path, entries = _bundle(log)
    index = 7  # device 1, seq 3
    old = struct.pack(">d", reading_value(1, 3, 2))
    assert entries[index].count(old) == 1
    entries[index] = entries[index].replace(old, struct.pack(">d", 99.25))
    path.write_bytes(encode_bundle(entries))
    _failed(_verify(log), "signature.gateway.signature.invalid", index)


def test_a_deleted_batch(log: ExampleLog, tmp_path: Path) -> None:
    assert _verify(log, state=tmp_path / "state.json").ok
    path, entries = _bundle(log)
    path.write_bytes(encode_bundle(entries[:4] + entries[5:]))  # deleted from the files only
    _failed(_verify(log), "entries.count")
    _rebuild(log, log.envelopes[:4] + log.envelopes[5:])  # the log rebuilt without it
    _failed(_verify(log), "chain.gap", 6)  # device 1: seq 3 (now leaf 6) follows seq 1
    _failed(_verify(log, state=tmp_path / "state.json"), "checkpoint.consistency")


def test_two_batches_reordered(log: ExampleLog, tmp_path: Path) -> None:
    assert _verify(log, state=tmp_path / "state.json").ok
    swapped = list(log.envelopes)
    swapped[2], swapped[5] = swapped[5], swapped[2]  # device 2's seq 1 and seq 2
    path, _ = _bundle(log)
    path.write_bytes(encode_bundle(swapped))
    _failed(_verify(log), "leaf.mismatch", 2)
    _rebuild(log, swapped)
    _failed(_verify(log), "chain.order", 5)
    _failed(_verify(log, state=tmp_path / "state.json"), "checkpoint.consistency")


def test_a_rewritten_leaf_with_a_recomputed_root(log: ExampleLog, tmp_path: Path) -> None:
    assert _verify(log, state=tmp_path / "state.json").ok
    hashes = [
        leaf_hash(make_leaf("a" * 16, 1, b"x", b"y").encode()) if i == 3 else h
        for i, h in enumerate(log.store.read_nodes([(0, i) for i in range(12)]))
    ]
    tile = log.directory / tile_path(0, 0, 12)
    tile.write_bytes(b"".join(hashes))
    _failed(_verify(log), "tree.root")  # the old checkpoint no longer matches
    store = MemoryHashStore()
    store.write_nodes(TreeAppender().extend(hashes))
    note = make_checkpoint(log.signer, store, 12)  # recomputed and signed with the log key
    (log.directory / "checkpoint").write_bytes(note)
    _failed(_verify(log), "leaf.mismatch", 3)
    _failed(_verify(log, quorum=1), "checkpoint.witnesses")  # no witness saw this tree
    _failed(_verify(log, state=tmp_path / "state.json"), "checkpoint.consistency")


def test_a_checkpoint_not_cosigned_yet_is_waited_for(log: ExampleLog) -> None:
    """Found by a new user: the demo's printed `audit verify` line failed with
    `checkpoint.witnesses` when run just after a checkpoint was published and before its
    witness cosigned it (a second later it passed)."""
    path = log.directory / "checkpoint"
    cosigned = path.read_bytes()
    text = split_note(cosigned)[0]
    path.write_bytes(sign_checkpoint(Checkpoint.parse(text), log.signer))  # log-signed only
    trust = Trust(log.signer.key, log.registry, tuple(w.key for w in log.witnesses), 2)
    assert _verify(log, quorum=2).failure is not None  # no waiting: the quorum is missing
    fresh = path.with_name("checkpoint.new")
    fresh.write_bytes(cosigned)
    # the witnesses cosign; the mirror is replaced whole, as a publisher does
    timer = threading.Timer(1.0, fresh.replace, (path,))
    timer.start()
    try:
        report = Verifier(FolderSource(log.directory), trust, wait_witnesses_s=20).run()
    finally:
        timer.join()
    assert report.ok, "\n".join(report.lines())
    path.write_bytes(sign_checkpoint(Checkpoint.parse(text), log.signer))
    waited = Verifier(FolderSource(log.directory), trust, wait_witnesses_s=1.5).run()
    assert waited.failure is not None and waited.failure.reason == "checkpoint.witnesses"


def test_a_checkpoint_signed_by_the_wrong_key(log: ExampleLog) -> None:
    text = split_note((log.directory / "checkpoint").read_bytes())[0]
    impostor = NoteSigner.generate(log.signer.name)  # same name, other key
    (log.directory / "checkpoint").write_bytes(sign_checkpoint(Checkpoint.parse(text), impostor))
    report = _verify(log)
    _failed(report, "checkpoint.signature")
    assert f"{log.signer.key.id:08x}" in report.failure.message  # type: ignore[union-attr]


def _next_batch(log: ExampleLog, value: float) -> bytes:
    """Device 0's next batch (seq BATCHES + 1), linking to its last one."""
    signer = device_signer(0)
    last = open_batch(
        open_envelope(
            log.envelopes[(BATCHES - 1) * DEVICES], log.registry.gateway_key
        ).device_message,
        log.registry.device_key,
    )
    t = last.payload.sealed_at_ms + 1000
    payload = make_payload(
        signer.key_id, BATCHES + 1, last.hash, t + 60_000, [Reading(t, "pm25", value)]
    )
    return wrap_envelope(gateway_signer(), seal_batch(signer, payload).message, t + 61_000).message


def test_a_forked_log_shown_to_two_witnesses(log: ExampleLog, tmp_path: Path) -> None:
    w0, w1 = (
        Witness(w, log.signer.key, tmp_path / f"w{i}.json") for i, w in enumerate(log.witnesses)
    )

    def proof(store: MemoryHashStore) -> Callable[[int, int], list[bytes]]:
        return lambda m, n: consistency_proof(store, m, n)

    for w in (w0, w1):
        w.cosign(log.note, proof(log.store))
    views: dict[str, tuple[ExampleLog, bytes]] = {}
    for name, witness, value in (("a", w0, 11.5), ("b", w1, 12.5)):
        fork = write_log(
            tmp_path / name, log.signer, log.registry, [*log.envelopes, _next_batch(log, value)]
        )
        fork.witnesses = log.witnesses  # the client trusts the real witnesses
        cosig = witness.cosign(fork.note, proof(fork.store))  # each alone sees a consistent log
        Mirror(fork.directory).publish(
            fork.store, 13, fork.note, lambda lo, hi, f=fork: f.envelopes[lo:hi], [cosig]
        )
        views[name] = (fork, add_signatures(fork.note, [cosig]))
    fork_a, note_a = views["a"]
    fork_b = views["b"][0]
    with pytest.raises(SplitViewError, match="size 13 with different roots"):
        w1.observe(note_a, proof(fork_a.store))  # gossip: w1 is shown what w0 cosigned
    assert w1.state.alerts[-1]["reason"] == "witness.split_view"
    assert _verify(fork_b, quorum=1).ok  # each view alone looks fine to a client ...
    _failed(_verify(fork_b, quorum=1, peers=(note_a,)), "checkpoint.split_view")  # ... not both


def test_batch_header_agrees_with_the_full_decoder(log: ExampleLog) -> None:
    from civicmesh.protocol import SignatureError, open_batch_header

    inner = open_envelope(log.envelopes[4], log.registry.gateway_key).device_message
    full = open_batch(inner, log.registry.device_key)
    header = open_batch_header(inner, log.registry.device_key)
    assert (header.device_id, header.seq, header.prev_hash, header.hash) == (
        full.device_id,
        full.seq,
        full.payload.prev_hash,
        full.hash,
    )
    bent = inner[:-1] + bytes([inner[-1] ^ 1])  # the signature's last byte
    with pytest.raises(SignatureError):
        open_batch_header(bent, log.registry.device_key)
