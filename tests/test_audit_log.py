"""The audit log library against independent test vectors (tests/fixtures/tlog/README.md)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from civicmesh.audit import AuditError
from civicmesh.audit.leaf import LEAF_SIZE, decode_leaf, make_leaf
from civicmesh.audit.log import CheckpointSchedule, LogWriter, make_checkpoint
from civicmesh.audit.merkle import (
    EMPTY_ROOT,
    FileHashStore,
    MemoryHashStore,
    TreeAppender,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from civicmesh.audit.note import (
    ALG_COSIGNATURE_V1,
    Checkpoint,
    NoteKey,
    NoteSigner,
    add_signatures,
    cosign,
    format_note,
    open_checkpoint,
    sign_checkpoint,
    sign_note,
    split_note,
    verify_cosignature,
    verify_note_signature,
)
from civicmesh.audit.tiles import FolderSource, TileHashStore, encode_index, write_tiles
from civicmesh.audit.witness import SplitViewError, Witness

FIXTURES = Path(__file__).parent / "fixtures" / "tlog"


def _json(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((FIXTURES / name).read_text())


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def _tree(leaves: list[bytes]) -> MemoryHashStore:
    store = MemoryHashStore()
    store.write_nodes(TreeAppender().extend(leaf_hash(leaf) for leaf in leaves))
    return store


# A reference straight from the RFC 9162 definitions (MTH, PATH, SUBPROOF), for the
# property tests: the store-based code must agree with it at every size.
def _mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def _path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m < k:
        return [*_path(m, leaves[:k]), _mth(leaves[k:])]
    return [*_path(m - k, leaves[k:]), _mth(leaves[:k])]


def _subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [_mth(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*_subproof(m, leaves[:k], whole), _mth(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), _mth(leaves[:k])]


# ---------------------------------------------------------------- vectors


def test_roots_and_proofs_match_the_reference_vectors() -> None:
    ref = _json("rfc6962_reference.json")
    leaves = [bytes.fromhex(x) for x in ref["leaves_hex"]]
    store = _tree(leaves)
    assert root_hash(store, 0).hex() == ref["empty_root_hex"]
    for size, want in enumerate(ref["roots_hex"], start=1):
        assert root_hash(store, size).hex() == want
    roots = [bytes.fromhex(x) for x in ref["roots_hex"]]
    for case in ref["inclusion"]:
        proof = inclusion_proof(store, case["index"], case["size"])
        assert [p.hex() for p in proof] == case["proof_hex"]
        verify_inclusion(
            case["index"],
            case["size"],
            leaf_hash(leaves[case["index"]]),
            proof,
            roots[case["size"] - 1],
        )
    for case in ref["consistency"]:
        proof = consistency_proof(store, case["size1"], case["size2"])
        assert [p.hex() for p in proof] == case["proof_hex"]
        verify_consistency(
            case["size1"], roots[case["size1"] - 1], case["size2"], roots[case["size2"] - 1], proof
        )


def test_real_certificate_transparency_proofs_verify() -> None:
    """Google's Argon 2020 CT log: a leaf at 10000 of 961,984,013 and a consistency proof."""
    sth = _json("argon2020/sth.json")
    entry = _json("argon2020/entries.json")["entries"][0]["leaf_input"]
    path = [_b64(p) for p in _json("argon2020/proof.json")["audit_path"]]
    root = _b64(sth["sha256_root_hash"])
    verify_inclusion(10000, sth["tree_size"], leaf_hash(_b64(entry)), path, root)
    with pytest.raises(AuditError):
        verify_inclusion(10001, sth["tree_size"], leaf_hash(_b64(entry)), path, root)
    cons = _json("argon2020/consistency.json")
    proof = [_b64(p) for p in cons["consistency"]]
    verify_consistency(cons["old_size"], _b64(cons["old_root"]), sth["tree_size"], root, proof)
    bent = [*proof[:-1], bytes(32)]
    with pytest.raises(AuditError, match="rewritten"):
        verify_consistency(cons["old_size"], _b64(cons["old_root"]), sth["tree_size"], root, bent)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.data())
def test_store_proofs_agree_with_the_rfc_definitions(size: int, data: st.DataObject) -> None:
    leaves = [i.to_bytes(4, "big") for i in range(size)]
    store = _tree(leaves)
    assert root_hash(store, size) == _mth(leaves)
    index = data.draw(st.integers(0, size - 1))
    proof = inclusion_proof(store, index, size)
    assert proof == _path(index, leaves)
    verify_inclusion(index, size, leaf_hash(leaves[index]), proof, _mth(leaves))
    old = data.draw(st.integers(1, size))
    cproof = consistency_proof(store, old, size)
    assert cproof == _subproof(old, leaves, True)
    verify_consistency(old, _mth(leaves[:old]), size, _mth(leaves), cproof)
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1))
        bad = [*proof[:k], bytes(32), *proof[k + 1 :]]
        with pytest.raises(AuditError):
            verify_inclusion(index, size, leaf_hash(leaves[index]), bad, _mth(leaves))
    if old < size:
        with pytest.raises(AuditError):
            verify_consistency(old, _mth([b"x", *leaves[1:old]]), size, _mth(leaves), cproof)


def test_file_store_and_tiles_give_the_same_proofs(tmp_path: Path) -> None:
    leaves = [i.to_bytes(4, "big") for i in range(70_000)]
    memory = _tree(leaves)
    files = FileHashStore(tmp_path / "hashes")
    writer = LogWriter(files)
    writer.append(leaves[:40_000])
    writer = LogWriter(files, 40_000)  # restarts from the stored frontier
    writer.append(leaves[40_000:])
    write_tiles(tmp_path / "mirror", files, 0, 40_000)
    write_tiles(tmp_path / "mirror", files, 40_000, len(leaves))
    tiles = TileHashStore(FolderSource(tmp_path / "mirror"), len(leaves))
    for store in (files, tiles):
        assert root_hash(store, len(leaves)) == root_hash(memory, len(leaves))
        for index in (0, 255, 256, 65_535, 65_536, 69_999):
            assert inclusion_proof(store, index, len(leaves)) == inclusion_proof(
                memory, index, len(leaves)
            )
        assert consistency_proof(store, 40_000, 70_000) == consistency_proof(memory, 40_000, 70_000)
    files.close()
    assert encode_index(1234067) == "x001/x234/067" and encode_index(5) == "005"


# ---------------------------------------------------------------- leaves


def test_leaf_round_trip_and_strict_decoding() -> None:
    leaf = make_leaf("abcdefghijklmnop", 7, b"device bytes", b"gateway bytes")
    data = leaf.encode()
    assert len(data) == LEAF_SIZE == 89 and data[0] == 1
    assert decode_leaf(data) == leaf
    with pytest.raises(AuditError, match="version"):
        decode_leaf(b"\x02" + data[1:])
    with pytest.raises(AuditError, match="89 bytes"):
        decode_leaf(data[:-1])


# ---------------------------------------------------------------- notes


def test_signed_note_vectors_of_the_go_implementation() -> None:
    v = _json("note.json")
    signer = NoteSigner.from_skey(v["signer_key"])
    assert signer.key.to_vkey() == v["verifier_key"]
    assert format_note(v["text"], [sign_note(v["text"], signer)]).decode() == v["signed"]
    text, sigs = split_note((v["signed"] + v["other_signature_line"]).encode())
    assert text == v["text"]
    peter, enoch = NoteKey.from_vkey(v["verifier_key"]), NoteKey.from_vkey(v["other_verifier_key"])
    assert verify_note_signature(text, sigs[0], peter)
    assert verify_note_signature(text, sigs[1], enoch)
    assert not verify_note_signature(text, sigs[1], peter)
    tree = Checkpoint(
        "go.sum database tree", 123456789012, leaf_hash(v["tree_note_record"].encode())
    )
    assert tree.text() == v["tree_note"]
    assert Checkpoint.parse(v["tree_note"]) == tree
    mangled = v["verifier_key"][:-2] + "XX"
    with pytest.raises(ValueError):
        NoteKey.from_vkey(mangled)


@pytest.mark.parametrize(
    "bad",
    [b"no signatures\n", b"text\n\nnot a signature line\n", b"text\n\n\xe2\x80\x94 a+b AAAAAAA=\n"],
)
def test_malformed_notes_are_refused_with_a_reason(bad: bytes) -> None:
    with pytest.raises(AuditError) as err:
        split_note(bad)
    assert err.value.reason == "note.malformed"


def test_checkpoint_cosignatures_and_the_wrong_key() -> None:
    log = NoteSigner.generate("civicmesh.test/log")
    impostor = NoteSigner.generate("civicmesh.test/log")
    w1 = NoteSigner.generate("w1.test", ALG_COSIGNATURE_V1)
    w2 = NoteSigner.generate("w2.test", ALG_COSIGNATURE_V1)
    cp = Checkpoint("civicmesh.test/log", 12, bytes(range(32)))
    note = sign_checkpoint(cp, log)
    text = split_note(note)[0]
    cosig = cosign(text, w1, 1_700_000_000)
    assert verify_cosignature(text, cosig, w1.key) == 1_700_000_000
    assert verify_cosignature(text.replace("12", "13"), cosig, w1.key) is None
    signed = add_signatures(note, [cosig])
    opened = open_checkpoint(signed, log.key, [w1.key, w2.key], 1)
    assert opened.checkpoint == cp and [n for n, _ in opened.cosigned_by] == ["w1.test"]
    with pytest.raises(AuditError) as err:
        open_checkpoint(signed, log.key, [w1.key, w2.key], 2)
    assert err.value.reason == "checkpoint.witnesses"
    with pytest.raises(AuditError) as err:
        open_checkpoint(sign_checkpoint(cp, impostor), log.key)
    assert err.value.reason == "checkpoint.signature"


def test_checkpoint_schedule_interval_and_day_close() -> None:
    schedule = CheckpointSchedule(interval_s=10)
    assert schedule.due(0, 1000.0)
    schedule.made(0, 1000.0)
    assert not schedule.due(5, 1005.0)  # grown, but within the interval
    assert schedule.due(5, 1010.0)
    schedule.made(5, 1010.0)
    assert not schedule.due(5, 1500.0)  # nothing new
    assert schedule.due(5, 86_400.0)  # the day closed: a checkpoint even when quiet


# ---------------------------------------------------------------- witness


def test_witness_cosigns_growth_and_raises_on_a_split_view(tmp_path: Path) -> None:
    log = NoteSigner.generate("civicmesh.test/log")
    leaves = [bytes([i]) for i in range(10)]
    store = _tree(leaves)
    witness = Witness(
        NoteSigner.generate("w.test", ALG_COSIGNATURE_V1), log.key, tmp_path / "w.json"
    )

    def proof(m: int, n: int) -> list[bytes]:
        return consistency_proof(store, m, n)

    first = make_checkpoint(log, store, 6)
    witness.cosign(first, proof)
    witness.cosign(make_checkpoint(log, store, 10), proof)
    assert witness.last is not None and witness.last.size == 10
    with pytest.raises(AuditError) as err:
        witness.cosign(first, proof)  # an older checkpoint is not cosigned again
    assert err.value.reason == "witness.stale"
    forked = _tree([*leaves[:9], b"other"])
    fork_note = make_checkpoint(log, forked, 10)
    with pytest.raises(SplitViewError, match="size 10 with different roots"):
        witness.cosign(fork_note, proof)
    fork_bigger = _tree([*leaves[:9], b"other", b"more"])
    with pytest.raises(SplitViewError, match="not consistent"):
        witness.cosign(
            make_checkpoint(log, fork_bigger, 11), lambda m, n: consistency_proof(fork_bigger, m, n)
        )
    again = Witness(witness.signer, log.key, tmp_path / "w.json")  # state survives restarts
    assert again.last is not None and again.last.size == 10
    assert len(again.state.alerts) == 2 and again.state.alerts[0]["reason"] == "witness.split_view"
