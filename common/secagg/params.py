"""The public side of a secure round: its parameters, the neighbour graph, the
public keys a site advertises, the unmask request, and what both sides derive from
them (the round's context string, pair keys' info, commitments, the pairwise masks).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import numpy as np

from common.quantize import RingArray, pack
from common.secagg import crypto, shamir
from common.secagg.errors import SecAggError

PROTOCOL = "fedsilo-secagg+/1"
INDEX_BYTES = 4
_PLAINTEXT_BYTES = 2 * INDEX_BYTES + 2 * shamir.SHARE_BYTES
_NONCE_BYTES, _TAG_BYTES = 12, 16
SEALED_BYTES = _NONCE_BYTES + _PLAINTEXT_BYTES + _TAG_BYTES


def default_degree(num_sites: int) -> int:
    """Neighbours per site: the complete graph for few sites, else an even degree of
    about 3 log2(n) (Bell et al. need O(log n) for security and correctness)."""
    if num_sites < 2:
        return 0
    degree = 2 * math.ceil(1.5 * math.log2(num_sites))
    return num_sites - 1 if degree >= num_sites - 1 else degree


def default_threshold(holders: int, fraction: float = 0.5) -> int:
    """The least safe threshold (a strict majority of holders), raised to ``fraction``."""
    return max(holders // 2 + 1, math.ceil(fraction * holders), 2)


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of one secure round, chosen by the coordinator."""

    session: str  # unique per round of a run: binds every key, share and message to it
    participants: tuple[int, ...]
    threshold: int
    degree: int
    ring_bits: int
    vector_length: int

    def __post_init__(self) -> None:
        if not self.session or len(self.session) > 200:
            raise SecAggError("secagg session must be a non-empty string of <= 200 chars")
        parts = self.participants
        if len(parts) < 2:
            raise SecAggError(f"secure aggregation needs at least 2 sites, got {len(parts)}")
        if len(set(parts)) != len(parts) or any(
            isinstance(p, bool) or not isinstance(p, int) or not 1 <= p < 2**31 for p in parts
        ):
            raise SecAggError("participants must be distinct integers in 1..2^31-1")
        if tuple(sorted(parts)) != parts:
            raise SecAggError("participants must be sorted")
        n = len(parts)
        if not 1 <= self.degree <= n - 1 or (self.degree < n - 1 and self.degree % 2):
            raise SecAggError(
                f"degree must be n - 1 = {n - 1} (complete graph) or an even number in "
                f"2..{n - 2}, got {self.degree}"
            )
        holders = self.degree + 1
        if not holders // 2 + 1 <= self.threshold <= holders or self.threshold < 2:
            raise SecAggError(
                f"threshold {self.threshold} is unsafe for {holders} holders per site: it "
                f"must be a strict majority (>= {max(holders // 2 + 1, 2)}) and at most "
                f"{holders}"
            )
        if not 1 <= self.ring_bits <= 64:
            raise SecAggError(f"ring_bits must be in 1..64, got {self.ring_bits}")
        if self.vector_length < 1:
            raise SecAggError(f"vector_length must be >= 1, got {self.vector_length}")

    @classmethod
    def create(
        cls,
        participants: Iterable[int],
        *,
        ring_bits: int,
        vector_length: int,
        degree: int | None = None,
        threshold_fraction: float = 0.5,
        session: str | None = None,
    ) -> SecAggParams:
        parts = tuple(sorted(participants))
        deg = default_degree(len(parts)) if degree is None else degree
        return cls(
            session=session or base64.b32encode(os.urandom(15)).decode().lower(),
            participants=parts,
            threshold=default_threshold(deg + 1, threshold_fraction),
            degree=deg,
            ring_bits=ring_bits,
            vector_length=vector_length,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "session": self.session,
                "participants": list(self.participants),
                "threshold": self.threshold,
                "degree": self.degree,
                "ring_bits": self.ring_bits,
                "vector_length": self.vector_length,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SecAggParams:
        try:
            raw = json.loads(text)
            ints = {k: raw[k] for k in ("threshold", "degree", "ring_bits", "vector_length")}
            bad = [k for k, v in ints.items() if isinstance(v, bool) or not isinstance(v, int)]
            bad += [] if isinstance(raw["session"], str) else ["session"]
            bad += [] if isinstance(raw["participants"], list) else ["participants"]
            if bad:
                raise SecAggError(f"secagg parameters are malformed: mistyped {bad}")
            return cls(session=raw["session"], participants=tuple(raw["participants"]), **ints)
        except (ValueError, KeyError, TypeError) as err:
            if isinstance(err, SecAggError):
                raise
            raise SecAggError(f"secagg parameters are malformed: {err}") from None

    @property
    def context(self) -> bytes:
        return f"{PROTOCOL}|{self.session}".encode()

    def neighbours(self, index: int) -> tuple[int, ...]:
        """``index``'s neighbours (not itself): a Harary graph on a public permutation."""
        if index not in self.participants:
            raise SecAggError(f"site {index} is not a participant of this round")
        n = len(self.participants)
        if self.degree >= n - 1:
            return tuple(p for p in self.participants if p != index)
        order = list(self.participants)
        random.Random(self.session).shuffle(order)  # public: everyone derives the same
        at = order.index(index)
        half = self.degree // 2
        near = {order[(at + d) % n] for d in range(-half, half + 1) if d}
        return tuple(sorted(near))

    def holders(self, index: int) -> tuple[int, ...]:
        """Who holds shares of ``index``'s secrets: its neighbours and itself."""
        return tuple(sorted((*self.neighbours(index), index)))

    def pieces(self, alive: Collection[int]) -> int:
        """How many connected pieces the neighbour graph falls into among ``alive``:
        more than one, and each piece's masks cancel on their own, so unmasking would
        reveal each piece's sum (one victim and one colluder make a piece)."""
        left = set(alive)
        count = 0
        while left:
            count += 1
            stack = [left.pop()]
            while stack:
                for v in self.neighbours(stack.pop()):
                    if v in left:
                        left.remove(v)
                        stack.append(v)
        return count


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def check_key(name: str, key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != crypto.KEY_BYTES:
        raise SecAggError(f"{name} must be {crypto.KEY_BYTES} bytes")
    return key


def pair_info(params: SecAggParams, a: int, b: int, purpose: str) -> bytes:
    lo, hi = sorted((a, b))
    return params.context + f"|{purpose}|{lo}|{hi}".encode()


def share_ad(params: SecAggParams, sender: int, receiver: int) -> bytes:
    return params.context + f"|share|{sender}->{receiver}".encode()


def commitment(params: SecAggParams, index: int, seed: bytes) -> bytes:
    """What a site binds its self-mask seed to before anyone reveals shares of it: the
    coordinator checks the seed it rebuilds, which Shamir alone cannot do from exactly
    ``t`` shares."""
    return hashlib.sha256(params.context + f"|b|{index}|".encode() + seed).digest()


def pair_mask(
    params: SecAggParams, private: bytes, peer_public: bytes, a: int, b: int
) -> RingArray:
    seed = crypto.agree(private, peer_public, info=pair_info(params, a, b, "mask"))
    return crypto.expand_mask(seed, params.vector_length, params.ring_bits)


def ring_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


@dataclass(frozen=True)
class PublicKeys:
    c: bytes  # encrypts shares
    s: bytes  # agrees pairwise masks

    def __post_init__(self) -> None:
        check_key("c public key", self.c)
        check_key("s public key", self.s)
        if self.c == self.s:
            raise SecAggError("the two public keys of a site must differ")
        # A low-order point would make every peer's key agreement fail: refuse it here,
        # where the sender is known, rather than let it abort the round later.
        probe = crypto.generate_keypair().private
        for name, key in (("c", self.c), ("s", self.s)):
            try:
                crypto.agree(probe, key, info=b"fedsilo-secagg key check")
            except SecAggError:
                raise SecAggError(f"{name} public key is invalid (low-order point)") from None


@dataclass(frozen=True)
class UnmaskRequest:
    alive: tuple[int, ...]  # their masked inputs are in the sum: reveal b shares
    dropped: tuple[int, ...]  # shared keys but sent no masked input: reveal s shares


def pack_masked(values: RingArray, params: SecAggParams) -> bytes:
    """A masked input on the wire: exactly ring_bits per element."""
    return pack(values, params.ring_bits)
