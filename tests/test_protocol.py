"""Wire protocol: round trips, tamper detection, strict decoding, hash-chain verdicts."""

from __future__ import annotations

import itertools
import math

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from civicmesh import protocol
from civicmesh.identity import Ed25519Signer, VerifyKey, derive_id
from civicmesh.metrics import BY_NAME
from civicmesh.protocol import (
    GENESIS_HASH,
    ChainHead,
    ChainVerdict,
    ProtocolError,
    Reading,
    SignatureError,
    judge_chain,
    make_payload,
    open_batch,
    open_envelope,
    seal_batch,
    wrap_envelope,
)

DEVICE = Ed25519Signer.from_seed(b"d" * 32)
OTHER = Ed25519Signer.from_seed(b"o" * 32)
GATEWAY = Ed25519Signer.from_seed(b"g" * 32)
KEYS = {s.key_id: s.verify_key() for s in (DEVICE, OTHER, GATEWAY)}
T0 = 1_700_000_000_000


def lookup(ident: str) -> VerifyKey | None:
    return KEYS.get(ident)


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
readings_strategy = st.lists(
    st.builds(
        Reading,
        ts_ms=st.integers(T0, T0 + 6 * 24 * 3600 * 1000),
        metric=st.sampled_from(sorted(BY_NAME)),
        value=finite,
        quality=st.integers(0, 2**16 - 1),
        raw=st.none() | finite,
        anomaly=st.none() | finite,
    ),
    max_size=40,
)


def chain(signer: Ed25519Signer, count: int, start_seq: int = 1) -> list[protocol.SignedBatch]:
    batches = []
    prev = GENESIS_HASH
    for seq in range(start_seq, start_seq + count):
        reading = Reading(T0 + seq * 60_000, "pm25", float(seq))
        batch = seal_batch(signer, make_payload(signer.key_id, seq, prev, T0, [reading]))
        batches.append(batch)
        prev = batch.hash
    return batches


@given(readings=readings_strategy, seq=st.integers(1, 2**63 - 1), model=st.text(max_size=64))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_batch_round_trip(readings: list[Reading], seq: int, model: str) -> None:
    payload = make_payload(DEVICE.key_id, seq, bytes(range(32)), T0, readings, model)
    sealed = seal_batch(DEVICE, payload)
    opened = open_batch(sealed.message, lookup)
    assert opened.payload == payload
    assert opened.hash == sealed.hash
    assert opened.message == sealed.message


@given(readings=readings_strategy, data=st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_changed_byte_fails_verification(readings: list[Reading], data: st.DataObject) -> None:
    sealed = seal_batch(DEVICE, make_payload(DEVICE.key_id, 7, GENESIS_HASH, T0, readings))
    message = bytearray(sealed.message)
    index = data.draw(st.integers(0, len(message) - 1), label="index")
    flip = data.draw(st.integers(1, 255), label="xor")
    message[index] ^= flip
    with pytest.raises(ProtocolError):
        open_batch(bytes(message), lookup)


@given(extra=st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_refused(extra: bytes) -> None:
    sealed = chain(DEVICE, 1)[0]
    with pytest.raises(ProtocolError):
        open_batch(sealed.message + extra, lookup)


@given(data=st.data())
@settings(max_examples=200)
def test_envelope_round_trip_and_tamper(data: st.DataObject) -> None:
    inner = chain(DEVICE, 1)[0]
    envelope = wrap_envelope(GATEWAY, inner.message, T0 + 5)
    opened = open_envelope(envelope.message, lookup)
    assert opened.device_message == inner.message  # device bytes travel unchanged
    assert opened.gateway_id == GATEWAY.key_id
    assert opened.received_at_ms == T0 + 5
    assert open_batch(opened.device_message, lookup).payload == inner.payload

    message = bytearray(envelope.message)
    index = data.draw(st.integers(0, len(message) - 1))
    message[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ProtocolError):
        open_envelope(bytes(message), lookup)


def test_batch_signed_by_another_key_is_refused() -> None:
    payload = make_payload(DEVICE.key_id, 1, GENESIS_HASH, T0, [])
    forged_parts = cbor2.loads(
        seal_batch(OTHER, make_payload(OTHER.key_id, 1, GENESIS_HASH, T0, [])).message
    )
    protected, _, _, signature = forged_parts.value
    # OTHER's signature over DEVICE's payload, under OTHER's kid: signer/payload mismatch.
    forged = cbor2.dumps(
        cbor2.CBORTag(18, [protected, {}, protocol.encode_payload(payload), signature])
    )
    with pytest.raises(ProtocolError) as excinfo:
        open_batch(forged, lookup)
    assert excinfo.value.reason == "signature.invalid"


def test_payload_naming_another_device_is_refused() -> None:
    payload_bytes = protocol.encode_payload(make_payload(DEVICE.key_id, 1, GENESIS_HASH, T0, []))
    message, _ = protocol._cose_sign1(OTHER, payload_bytes)
    with pytest.raises(ProtocolError) as excinfo:
        open_batch(message, lookup)
    assert excinfo.value.reason == "schema.device_mismatch"


def test_seal_refuses_foreign_device() -> None:
    with pytest.raises(ValueError, match="cannot seal"):
        seal_batch(OTHER, make_payload(DEVICE.key_id, 1, GENESIS_HASH, T0, []))


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"", "decode.malformed"),
        (b"\xff\x00garbage", "decode.malformed"),
        (cbor2.dumps([1, 2, 3]), "decode.malformed"),
        (cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"", b"x" * 64])), "decode.malformed"),
        (b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1), "decode.too_large"),
    ],
)
def test_malformed_messages_have_named_reasons(message: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        open_batch(message, lookup)
    assert excinfo.value.reason == reason


def test_unknown_signer() -> None:
    stranger = Ed25519Signer.from_seed(b"s" * 32)
    sealed = seal_batch(stranger, make_payload(stranger.key_id, 1, GENESIS_HASH, T0, []))
    with pytest.raises(ProtocolError) as excinfo:
        open_batch(sealed.message, lookup)
    assert excinfo.value.reason == "signature.unknown_signer"


def _resign(body: dict[int, object]) -> bytes:
    message, _ = protocol._cose_sign1(DEVICE, cbor2.dumps(body))
    return message


def _valid_body() -> dict[int, object]:
    return {
        1: 1,
        2: DEVICE.key_id,
        3: 1,
        4: GENESIS_HASH,
        5: T0,
        6: T0,
        7: [[0, 1, 12.5, 0]],
        8: "",
    }


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({1: 2}, "schema.version"),
        ({3: 0}, "schema.invalid"),
        ({3: "1"}, "schema.invalid"),
        ({4: b"short"}, "schema.invalid"),
        ({5: 10}, "schema.invalid"),
        ({7: [[0, 99, 1.0, 0]]}, "schema.unknown_metric"),
        ({7: [[0, 1, "x", 0]]}, "schema.invalid"),
        ({7: [[0, 1]]}, "schema.invalid"),
        ({7: [[-5, 1, 1.0, 0]]}, "schema.invalid"),
        ({8: "m" * 65}, "schema.invalid"),
        ({9: "extra"}, "schema.invalid"),
    ],
)
def test_strict_payload_decoding(change: dict[int, object], reason: str) -> None:
    body = _valid_body()
    body.update(change)
    # A correctly signed but malformed payload must still be refused by its content.
    with pytest.raises(ProtocolError) as excinfo:
        open_batch(_resign(body), lookup)
    assert excinfo.value.reason == reason


def test_valid_body_helper_is_accepted() -> None:
    batch = open_batch(_resign(_valid_body()), lookup)
    assert batch.payload.readings == (Reading(T0, "pm25", 12.5),)


def test_nan_values_survive_the_wire_for_ingest_to_judge() -> None:
    sealed = seal_batch(
        DEVICE, make_payload(DEVICE.key_id, 1, GENESIS_HASH, T0, [Reading(T0, "no2", math.nan)])
    )
    assert math.isnan(open_batch(sealed.message, lookup).payload.readings[0].value)


# ---------------------------------------------------------------------- chain


def test_chain_links() -> None:
    batches = chain(DEVICE, 5)
    head = None
    for batch in batches:
        verdict = judge_chain(head, batch)
        assert verdict in (ChainVerdict.FIRST, ChainVerdict.NEXT)
        head = ChainHead(batch.seq, batch.hash)
    assert batches[0].payload.prev_hash == GENESIS_HASH
    for earlier, later in itertools.pairwise(batches):
        assert later.payload.prev_hash == earlier.hash


@given(n=st.integers(2, 12), data=st.data())
def test_gaps_forks_and_replays_are_detected(n: int, data: st.DataObject) -> None:
    batches = chain(DEVICE, n)
    cut = data.draw(st.integers(1, n - 1), label="head index")
    head = ChainHead(batches[cut - 1].seq, batches[cut - 1].hash)

    # Replay: any batch at or before the head.
    old = data.draw(st.integers(0, cut - 1), label="replayed")
    assert judge_chain(head, batches[old]) is ChainVerdict.REPLAY

    # Gap: a batch beyond head + 1.
    if cut + 1 < n:
        ahead = data.draw(st.integers(cut + 1, n - 1), label="ahead")
        assert judge_chain(head, batches[ahead]) is ChainVerdict.GAP
    assert judge_chain(head, batches[cut]) is ChainVerdict.NEXT

    # Fork: a different batch at head + 1 (wrong prev) or at the head's seq.
    wrong_prev = seal_batch(DEVICE, make_payload(DEVICE.key_id, head.seq + 1, b"\x01" * 32, T0, []))
    assert judge_chain(head, wrong_prev) is ChainVerdict.FORK
    same_seq_other = seal_batch(
        DEVICE,
        make_payload(DEVICE.key_id, head.seq, batches[cut - 1].payload.prev_hash, T0 + 1, []),
    )
    assert judge_chain(head, same_seq_other) is ChainVerdict.FORK


def test_first_batch_must_start_from_genesis() -> None:
    bad = seal_batch(DEVICE, make_payload(DEVICE.key_id, 1, b"\x02" * 32, T0, []))
    assert judge_chain(None, bad) is ChainVerdict.FORK
    with pytest.raises(protocol.ChainForkError):
        protocol.raise_for_verdict(ChainVerdict.FORK, bad, None)


def test_device_id_is_bound_to_key() -> None:
    assert derive_id(DEVICE.public_key) == DEVICE.key_id
    assert derive_id(OTHER.public_key) != DEVICE.key_id
    assert len(DEVICE.key_id) == 16


@given(
    issuer=st.text(min_size=1, max_size=64),
    digests=st.lists(st.binary(min_size=16, max_size=16), max_size=50),
)
def test_receipt_round_trip(issuer: str, digests: list[bytes]) -> None:
    receipt = protocol.Receipt(issuer, tuple(digests))
    assert protocol.decode_receipt(protocol.encode_receipt(receipt)) == receipt


def test_message_digest_names_exact_bytes() -> None:
    batch = seal_batch(DEVICE, make_payload(DEVICE.key_id, 1, GENESIS_HASH, T0, []))
    digest = protocol.message_digest(batch.message)
    assert len(digest) == protocol.DIGEST_BYTES
    assert protocol.message_digest(batch.message + b"\x00") != digest


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff", "decode.malformed"),
        (cbor2.dumps({1: 1, 2: "gw"}), "schema.invalid"),
        (cbor2.dumps({1: 2, 2: "gw", 3: []}), "schema.version"),
        (cbor2.dumps({1: True, 2: "gw", 3: []}), "schema.version"),
        (cbor2.dumps({1: 1, 2: 7, 3: []}), "schema.invalid"),
        (cbor2.dumps({1: 1, 2: "gw", 3: [b"short"]}), "schema.invalid"),
        (cbor2.dumps({1: 1, 2: "", 3: []}), "schema.invalid"),
        (cbor2.dumps({1: 1, 2: "gw", 3: []}) + b"\x00", "decode.malformed"),
        (cbor2.dumps({1: 1, 2: "gw", 3: [bytes(16)] * 5000}), "decode.too_large"),
    ],
)
def test_malformed_receipts_have_named_reasons(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        protocol.decode_receipt(body)
    assert caught.value.reason == reason


def test_es256_batches_verify_and_tampering_or_a_wrong_algorithm_fails() -> None:
    from civicmesh.identity import ALG_ES256, Es256Signer

    signer = Es256Signer.generate()
    key = signer.verify_key()
    assert key.algorithm == ALG_ES256 and VerifyKey.from_text(key.to_text()) == key
    assert key.to_text().startswith("es256:")
    payload = make_payload(
        signer.key_id,
        1,
        GENESIS_HASH,
        1_700_000_000_000,
        [Reading(1_700_000_000_000, "pm25", 12.5)],
    )
    batch = seal_batch(signer, payload)
    opened = open_batch(batch.message, {signer.key_id: key}.get)
    assert opened.payload == payload
    tampered = bytearray(batch.message)
    tampered[-70] ^= 1
    with pytest.raises(ProtocolError):
        open_batch(bytes(tampered), {signer.key_id: key}.get)
    # the same id registered with an Ed25519 key does not accept an ES256 signature
    ed = VerifyKey(bytes(32), bound_id=signer.key_id)
    with pytest.raises(SignatureError, match="algorithm"):
        open_batch(batch.message, {signer.key_id: ed}.get)
