"""The cryptographic primitives of SecAgg+: X25519 key agreement, HKDF key derivation,
ChaCha20-Poly1305 for the shares sent through the coordinator, and a ChaCha20 PRG that
expands a 32-byte seed into a mask over the ring Z/2^ring_bits.

Every function checks its arguments and raises SecAggError naming what is wrong; no
message ever contains key, seed or plaintext bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.secagg.errors import SecAggError

KEY_BYTES = 32
SIGNATURE_BYTES = 64  # Ed25519
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_RING_BITS = 64
# cryptography's ChaCha20 "nonce" is counter (4 bytes, little endian) || nonce (12 bytes);
# all zero is block counter 0 and the zero nonce, safe because every seed is used once.
_PRG_NONCE = bytes(16)


@dataclass(frozen=True)
class KeyPair:
    """A raw X25519 key pair (32 bytes each), as exchanged in the advertise-keys stage."""

    private: bytes
    public: bytes


def _check_key(value: bytes, name: str) -> None:
    """Refuse anything but 32 bytes, naming the argument and its length only."""
    if not isinstance(value, bytes):
        raise SecAggError(f"{name} must be bytes, got {type(value).__name__}")
    if len(value) != KEY_BYTES:
        raise SecAggError(f"{name} must be {KEY_BYTES} bytes, got {len(value)}")


def _hkdf(key_material: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 to 32 bytes: raw DH output is not uniform, and `info` separates uses."""
    if not isinstance(info, bytes):
        raise SecAggError(f"info must be bytes, got {type(info).__name__}")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(
        key_material
    )


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair from OS entropy."""
    private = X25519PrivateKey.generate()
    return KeyPair(
        private=private.private_bytes_raw(), public=private.public_key().public_bytes_raw()
    )


def public_from_private(private: bytes) -> bytes:
    """The public key of a raw private key, so a stored private key can be re-advertised."""
    _check_key(private, "private key")
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes, *, info: bytes) -> bytes:
    """A 32-byte key shared with the peer: X25519, then HKDF-SHA256 bound to `info`.

    A low-order peer key would force a known (all-zero) shared secret, so it is refused."""
    _check_key(private, "private key")
    _check_key(peer_public, "peer public key")
    own = X25519PrivateKey.from_private_bytes(private)
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise SecAggError("peer public key is invalid (low-order point)") from None
    return _hkdf(shared, info)


# Encodings of the Ed25519 points of small order (the last byte's sign bit cleared),
# as libsodium's ge25519_has_small_order lists them: the neutral point, the points of
# order 2, 4 and 8, and the non-canonical encodings of 0, 1 and -1. Under such a "public
# key" one signature (R small-order, S = 0) verifies for every message.
_SMALL_ORDER = {
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    b"\xec" + b"\xff" * 30 + b"\x7f",
    b"\xed" + b"\xff" * 30 + b"\x7f",
    b"\xee" + b"\xff" * 30 + b"\x7f",
}


def weak_identity(identity: bytes) -> bool:
    """Whether a raw Ed25519 public key is a point of small order: anyone can sign as
    it, so no roster may list it and no signature under it counts."""
    return identity[:31] + bytes([identity[31] & 0x7F]) in _SMALL_ORDER


def verify(identity: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``message`` by the raw public
    key ``identity`` (a site's identity key); anything malformed, and any key of small
    order, is simply False."""
    if (
        not isinstance(identity, bytes)
        or len(identity) != KEY_BYTES
        or not isinstance(signature, bytes)
        or len(signature) != SIGNATURE_BYTES
        or weak_identity(identity)
    ):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(identity).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def seal(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 with a fresh random nonce, returned as nonce || ciphertext || tag.

    A random 96-bit nonce is safe here: each pairwise key seals only a handful of messages."""
    _check_key(key, "key")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, *, associated_data: bytes) -> bytes:
    """The plaintext of `seal`'s output; a tampered, truncated or misaddressed message is refused."""
    _check_key(key, "key")
    if not isinstance(sealed, bytes):
        raise SecAggError(f"sealed message must be bytes, got {type(sealed).__name__}")
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(
            f"sealed message is {len(sealed)} bytes, shorter than nonce + tag "
            f"({NONCE_BYTES + TAG_BYTES} bytes)"
        )
    nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, associated_data)
    except InvalidTag:
        raise SecAggError("ciphertext failed authentication") from None


def expand_mask(seed: bytes, length: int, ring_bits: int) -> np.ndarray:
    """`length` pseudorandom ring elements from a 32-byte seed (ChaCha20 keystream read as
    little-endian uint64, reduced mod 2^ring_bits): both ends of a pair derive the same mask."""
    _check_key(seed, "seed")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise SecAggError(f"length must be an int >= 0, got {length!r}")
    if (
        isinstance(ring_bits, bool)
        or not isinstance(ring_bits, int)
        or not 1 <= ring_bits <= MAX_RING_BITS
    ):
        raise SecAggError(f"ring_bits must be an int in 1..{MAX_RING_BITS}, got {ring_bits!r}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _PRG_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * length))
    values = np.frombuffer(stream, dtype="<u8").astype(np.uint64)  # owned, writable, native
    if ring_bits < MAX_RING_BITS:
        values &= np.uint64((1 << ring_bits) - 1)
    return values
