"""SecAgg+ primitives: key agreement both ways, authenticated sealing that refuses any
tampering, identity signatures that verify only as signed, and a mask PRG that matches
the RFC 8439 ChaCha20 keystream and is uniform."""

from __future__ import annotations

import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from common.secagg.crypto import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    KeyPair,
    agree,
    expand_mask,
    generate_keypair,
    open_sealed,
    public_from_private,
    seal,
    verify,
    weak_identity,
)
from common.secagg.errors import SecAggError

FAST = settings(max_examples=25, deadline=None)
SEEDS = st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES)
RING_BITS = st.integers(min_value=1, max_value=64)
INFO = b"fedsilo/test/pairwise"
AD = b"round=3|from=1|to=2"

# RFC 8439, appendix A.1, test vector #1: key all zero, nonce all zero, block counter 0.
RFC8439_A1_BLOCK = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)


def flip_bit(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# ---- keys and agreement -------------------------------------------------------------


def test_generate_keypair_gives_raw_32_byte_keys() -> None:
    # Execute
    pair = generate_keypair()

    # Assert
    assert isinstance(pair, KeyPair)
    assert len(pair.private) == KEY_BYTES
    assert len(pair.public) == KEY_BYTES


def test_generate_keypair_is_fresh_each_call() -> None:
    # Execute
    first, second = generate_keypair(), generate_keypair()

    # Assert
    assert first.private != second.private
    assert first.public != second.public


def test_public_from_private_matches_generated_public() -> None:
    # Prepare
    pair = generate_keypair()

    # Execute
    public = public_from_private(pair.private)

    # Assert
    assert public == pair.public


@pytest.mark.parametrize("size", [0, 31, 33])
def test_public_from_private_refuses_wrong_length(size: int) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match=f"private key must be 32 bytes, got {size}"):
        public_from_private(bytes(size))


@FAST
@given(info=st.binary(max_size=64))
def test_agree_is_symmetric(info: bytes) -> None:
    # Prepare
    a, b = generate_keypair(), generate_keypair()

    # Execute
    key_ab = agree(a.private, b.public, info=info)
    key_ba = agree(b.private, a.public, info=info)

    # Assert
    assert key_ab == key_ba
    assert len(key_ab) == KEY_BYTES


def test_agree_with_different_info_gives_different_keys() -> None:
    # Prepare
    a, b = generate_keypair(), generate_keypair()

    # Execute
    key_1 = agree(a.private, b.public, info=b"fedsilo/encryption")
    key_2 = agree(a.private, b.public, info=b"fedsilo/mask")

    # Assert
    assert key_1 != key_2


def test_agree_with_different_peers_gives_different_keys() -> None:
    # Prepare
    a, b, c = generate_keypair(), generate_keypair(), generate_keypair()

    # Execute
    key_ab = agree(a.private, b.public, info=INFO)
    key_ac = agree(a.private, c.public, info=INFO)

    # Assert
    assert key_ab != key_ac


def test_agree_refuses_low_order_public_key() -> None:
    # Prepare
    a = generate_keypair()

    # Execute / Assert
    with pytest.raises(SecAggError, match="low-order point"):
        agree(a.private, bytes(KEY_BYTES), info=INFO)


@pytest.mark.parametrize(
    ("private_size", "public_size", "named"),
    [(31, 32, "private key"), (33, 32, "private key"), (32, 31, "peer public key")],
)
def test_agree_refuses_wrong_key_length(private_size: int, public_size: int, named: str) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match=f"^{named} must be 32 bytes"):
        agree(b"\x01" * private_size, b"\x09" + bytes(public_size - 1), info=INFO)


def test_error_messages_do_not_contain_key_material() -> None:
    # Prepare
    secret = b"\xab" * 31

    # Execute
    with pytest.raises(SecAggError) as caught:
        public_from_private(secret)

    # Assert
    text = str(caught.value)
    assert secret.hex() not in text
    assert repr(secret) not in text


# ---- sealing --------------------------------------------------------------------------


@FAST
@given(key=SEEDS, plaintext=st.binary(max_size=512), associated_data=st.binary(max_size=64))
def test_seal_then_open_round_trips(key: bytes, plaintext: bytes, associated_data: bytes) -> None:
    # Execute
    sealed = seal(key, plaintext, associated_data=associated_data)
    opened = open_sealed(key, sealed, associated_data=associated_data)

    # Assert
    assert opened == plaintext


def test_seal_uses_a_fresh_nonce_each_time() -> None:
    # Prepare
    key = bytes(range(32))

    # Execute
    first = seal(key, b"share", associated_data=AD)
    second = seal(key, b"share", associated_data=AD)

    # Assert
    assert first[:12] != second[:12]
    assert first != second


def test_seal_output_is_nonce_plus_ciphertext_plus_tag() -> None:
    # Execute
    sealed = seal(bytes(range(32)), b"x" * 10, associated_data=AD)

    # Assert
    assert len(sealed) == 12 + 10 + 16


@pytest.mark.parametrize(
    "index",
    [0, 11, 12, 20, -1],
    ids=["nonce-first", "nonce-last", "ciphertext-first", "ciphertext-mid", "tag-last"],
)
def test_open_refuses_a_flipped_bit(index: int) -> None:
    # Prepare
    key = bytes(range(32))
    sealed = seal(key, b"a share of a seed, 66 bytes", associated_data=AD)

    # Execute / Assert
    with pytest.raises(SecAggError, match="ciphertext failed authentication"):
        open_sealed(key, flip_bit(sealed, index), associated_data=AD)


def test_open_refuses_a_flipped_bit_in_associated_data() -> None:
    # Prepare
    key = bytes(range(32))
    sealed = seal(key, b"payload", associated_data=AD)

    # Execute / Assert
    with pytest.raises(SecAggError, match="ciphertext failed authentication"):
        open_sealed(key, sealed, associated_data=flip_bit(AD, 0))


def test_open_refuses_the_wrong_key() -> None:
    # Prepare
    sealed = seal(bytes(range(32)), b"payload", associated_data=AD)

    # Execute / Assert
    with pytest.raises(SecAggError, match="ciphertext failed authentication"):
        open_sealed(bytes(32), sealed, associated_data=AD)


@pytest.mark.parametrize("size", [0, 12, 27])
def test_open_refuses_a_message_shorter_than_nonce_and_tag(size: int) -> None:
    # Prepare
    key = bytes(range(32))
    sealed = seal(key, b"", associated_data=AD)  # exactly 28 bytes

    # Execute / Assert
    with pytest.raises(SecAggError, match=f"sealed message is {size} bytes"):
        open_sealed(key, sealed[:size], associated_data=AD)


def test_open_refuses_a_truncated_message_of_valid_length() -> None:
    # Prepare
    key = bytes(range(32))
    sealed = seal(key, b"payload", associated_data=AD)

    # Execute / Assert
    with pytest.raises(SecAggError, match="ciphertext failed authentication"):
        open_sealed(key, sealed[:-1], associated_data=AD)


@pytest.mark.parametrize("size", [16, 31, 33])
def test_seal_and_open_refuse_wrong_key_length(size: int) -> None:
    # Prepare
    sealed = seal(bytes(32), b"payload", associated_data=AD)

    # Execute / Assert
    with pytest.raises(SecAggError, match=f"key must be 32 bytes, got {size}"):
        seal(bytes(size), b"payload", associated_data=AD)
    with pytest.raises(SecAggError, match=f"key must be 32 bytes, got {size}"):
        open_sealed(bytes(size), sealed, associated_data=AD)


# ---- identity signatures ----------------------------------------------------------------


def _identity() -> tuple[Ed25519PrivateKey, bytes]:
    key = Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes_raw()


def test_verify_accepts_the_signers_signature_on_the_signed_message() -> None:
    # Prepare
    key, identity = _identity()
    signature = key.sign(AD)

    # Execute / Assert
    assert len(signature) == SIGNATURE_BYTES
    assert verify(identity, signature, AD)


@pytest.mark.parametrize("change", ["message", "signature", "other signer"])
def test_verify_refuses_anything_else(change: str) -> None:
    # Prepare
    key, identity = _identity()
    signature = key.sign(AD)
    _, other_identity = _identity()

    # Execute
    ok = {
        "message": lambda: verify(identity, signature, flip_bit(AD, 0)),
        "signature": lambda: verify(identity, flip_bit(signature, 5), AD),
        "other signer": lambda: verify(other_identity, signature, AD),
    }[change]()

    # Assert
    assert ok is False


@pytest.mark.parametrize(
    ("identity", "signature"),
    [
        (bytes(31), bytes(64)),
        (bytes(33), bytes(64)),
        (bytes(32), bytes(63)),
        ("not bytes", bytes(64)),
        (bytes(32), bytearray(64)),
    ],
)
def test_verify_says_false_to_malformed_keys_and_signatures(
    identity: object, signature: object
) -> None:
    # Execute / Assert: no exception escapes; a malformed signature simply fails.
    assert verify(identity, signature, AD) is False  # type: ignore[arg-type]


# ---- seeds and masks ------------------------------------------------------------------


def test_expand_mask_matches_rfc8439_chacha20_test_vector() -> None:
    # Prepare
    expected = np.frombuffer(RFC8439_A1_BLOCK, dtype="<u8")

    # Execute
    mask = expand_mask(bytes(32), 8, 64)

    # Assert
    assert int(mask[0]) == int.from_bytes(bytes.fromhex("76b8e0ada0f13d90"), "little")
    np.testing.assert_array_equal(mask, expected)


@FAST
@given(seed=SEEDS, length=st.integers(min_value=0, max_value=300), ring_bits=RING_BITS)
def test_expand_mask_has_shape_dtype_and_range(seed: bytes, length: int, ring_bits: int) -> None:
    # Execute
    mask = expand_mask(seed, length, ring_bits)

    # Assert
    assert mask.shape == (length,)
    assert mask.dtype == np.uint64
    assert all(int(v) < 2**ring_bits for v in mask)


@FAST
@given(seed=SEEDS, ring_bits=RING_BITS)
def test_expand_mask_is_deterministic(seed: bytes, ring_bits: int) -> None:
    # Execute
    first = expand_mask(seed, 100, ring_bits)
    second = expand_mask(seed, 100, ring_bits)

    # Assert
    np.testing.assert_array_equal(first, second)


@FAST
@given(seed=SEEDS, other=SEEDS)
def test_expand_mask_differs_for_different_seeds(seed: bytes, other: bytes) -> None:
    # Prepare
    if seed == other:
        other = bytes(b ^ 0xFF for b in seed)

    # Execute
    first = expand_mask(seed, 64, 32)
    second = expand_mask(other, 64, 32)

    # Assert
    assert not np.array_equal(first, second)


@FAST
@given(seed=SEEDS, ring_bits=RING_BITS)
def test_expand_mask_is_the_low_bits_of_the_full_width_stream(seed: bytes, ring_bits: int) -> None:
    # Prepare
    full = expand_mask(seed, 50, 64)

    # Execute
    reduced = expand_mask(seed, 50, ring_bits)

    # Assert
    expected = [int(v) % 2**ring_bits for v in full]
    assert [int(v) for v in reduced] == expected


def test_expand_mask_prefix_is_stable_across_lengths() -> None:
    # Execute
    short = expand_mask(bytes(range(32)), 10, 32)
    long = expand_mask(bytes(range(32)), 1000, 32)

    # Assert
    np.testing.assert_array_equal(short, long[:10])


def test_expand_mask_returns_a_writable_owned_array() -> None:
    # Execute
    mask = expand_mask(bytes(range(32)), 16, 64)
    mask[0] = 0

    # Assert
    assert mask.flags.writeable
    assert mask.flags.owndata


def test_expand_mask_is_uniform_over_the_ring() -> None:
    # Prepare
    stats = pytest.importorskip("scipy.stats")
    ring_bits = 13

    # Execute
    mask = expand_mask(bytes(range(32)), 100_000, ring_bits)
    counts = np.bincount((mask >> np.uint64(ring_bits - 4)).astype(np.int64), minlength=16)

    # Assert
    assert counts.shape == (16,)  # the top 4 bits, no value above the ring
    assert stats.chisquare(counts).pvalue > 1e-6  # the seed is fixed: not flaky


def test_expand_mask_is_fast_for_the_model_size() -> None:
    # Prepare
    expand_mask(bytes(32), 1_000, 32)  # warm up

    # Execute
    start = time.perf_counter()
    expand_mask(bytes(range(32)), 140_000, 32)
    elapsed = time.perf_counter() - start

    # Assert
    assert elapsed < 0.5  # a few ms in practice; generous for loaded CI machines


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_expand_mask_refuses_wrong_seed_length(size: int) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match=f"seed must be 32 bytes, got {size}"):
        expand_mask(bytes(size), 10, 32)


@pytest.mark.parametrize("length", [-1, 1.5, True, "10"])
def test_expand_mask_refuses_bad_length(length: object) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match="length must be an int >= 0"):
        expand_mask(bytes(32), length, 32)  # type: ignore[arg-type]


@pytest.mark.parametrize("ring_bits", [0, 65, -3, True, 32.0])
def test_expand_mask_refuses_bad_ring_bits(ring_bits: object) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match=r"ring_bits must be an int in 1\.\.64"):
        expand_mask(bytes(32), 10, ring_bits)  # type: ignore[arg-type]


# Ed25519 points of small order, as raw public keys (libsodium's list; the sign bit of
# the last byte is ignored when compared).
SMALL_ORDER_KEYS = [
    b"\x01" + bytes(31),  # the neutral point
    bytes(32),  # order 4
    b"\xec" + b"\xff" * 30 + b"\x7f",  # -1: order 2
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),  # 8
]


def test_a_signature_under_the_neutral_point_verifies_for_anything_in_openssl() -> None:
    # The attack the check below stops: R = the neutral point, S = 0 is a valid
    # signature of every message under the neutral point as a public key.
    key = SMALL_ORDER_KEYS[0]
    Ed25519PublicKey.from_public_bytes(key).verify(key + bytes(32), b"any message")
    assert not verify(key, key + bytes(32), b"any message")


@pytest.mark.parametrize("key", SMALL_ORDER_KEYS)
def test_keys_of_small_order_are_weak_and_never_verify(key: bytes) -> None:
    assert weak_identity(key)
    assert not verify(key, key + bytes(32), b"m")
    genuine = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    assert not weak_identity(genuine)
