"""The public side of a secure round: its parameters, the neighbour graph, the
signed adverts of the sites' public keys, the signed dealing record of every share,
and what both sides derive from them (the round's context string, the graph seed, pair
keys' info, commitments, share hashes, the messages each signature covers, the
pairwise masks).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

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


def active_threshold(holders: int) -> int:
    """The least threshold safe against an active coordinator: more than 2/3 of a
    site's holders (Bonawitz et al. 2017), and at least 2."""
    return max(2 * holders // 3 + 1, 2)


def default_threshold(holders: int, fraction: float = 0.5) -> int:
    """The active-security threshold, raised to ``fraction`` of the holders."""
    return min(max(active_threshold(holders), math.ceil(fraction * holders)), holders)


def tolerated_colluders(holders: int, threshold: int) -> int:
    """How many colluding sites among a site's holders the threshold tolerates against
    an active coordinator. To get both secrets of a site it must make two disjoint
    groups of honest holders each reveal a different one; with the consistency round
    each group needs ``threshold`` signatures on its own survivor set and
    ``threshold`` shares, the colluders counting in both: 2t - c <= holders. So
    ``2t - holders - 1`` colluders are tolerated; and at most ``t - 2``: with
    ``t - 1`` colluders the coordinator could keep only them and one victim alive
    (``t`` sites) and the sum alone would give the victim's update away."""
    return max(0, min(2 * threshold - holders - 1, threshold - 2))


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of one secure round, chosen by the coordinator."""

    session: str  # unique per round of a run: binds every key, share and message to it
    participants: tuple[int, ...]
    threshold: int
    degree: int
    ring_bits: int
    vector_length: int
    # The neighbour graph's seed (hex): empty in the coordinator's parameters; every
    # party derives it from the sites' signed adverts (``graph_seed``), so the
    # coordinator cannot pick a graph that surrounds a site with its own.
    graph: str = ""

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
        least = active_threshold(holders)
        if not least <= self.threshold <= holders:
            raise SecAggError(
                f"threshold {self.threshold} is unsafe for {holders} holders per site: "
                f"against an active coordinator it must exceed 2/3 of them (>= {least}) "
                f"and be at most {holders}"
            )
        if self.graph and (len(self.graph) != 64 or self.graph.strip("0123456789abcdef")):
            raise SecAggError("the graph seed must be 64 lowercase hex digits")
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

    @property
    def tolerated(self) -> int:
        """Colluding sites among any site's holders that this round tolerates."""
        return tolerated_colluders(self.degree + 1, self.threshold)

    def with_graph(self, seed: bytes) -> SecAggParams:
        """These parameters with the neighbour graph fixed by ``seed`` (``graph_seed``)."""
        if self.graph:
            raise SecAggError("the neighbour graph is already fixed")
        return replace(self, graph=seed.hex())

    def to_json(self) -> str:
        return json.dumps(
            {
                "session": self.session,
                "participants": list(self.participants),
                "threshold": self.threshold,
                "degree": self.degree,
                "ring_bits": self.ring_bits,
                "vector_length": self.vector_length,
                "graph": self.graph,
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
            graph = raw.get("graph", "")
            bad += [] if isinstance(graph, str) else ["graph"]
            if bad:
                raise SecAggError(f"secagg parameters are malformed: mistyped {bad}")
            return cls(
                session=raw["session"],
                participants=tuple(raw["participants"]),
                graph=graph,
                **ints,
            )
        except (ValueError, KeyError, TypeError) as err:
            if isinstance(err, SecAggError):
                raise
            raise SecAggError(f"secagg parameters are malformed: {err}") from None

    @cached_property
    def context(self) -> bytes:
        """Binds every key, share and signature to this round and all its public
        parameters (participants, threshold, degree, ring) and, once it is fixed, to
        the graph, hence to the set of signed adverts every party saw."""
        core = hashlib.sha256(replace(self, graph="").to_json().encode()).hexdigest()
        return f"{PROTOCOL}|{self.session}|{core}|{self.graph}".encode()

    def neighbours(self, index: int) -> tuple[int, ...]:
        """``index``'s neighbours (not itself): a Harary graph on a permutation drawn
        from the graph seed (public once the adverts are in)."""
        if index not in self.participants:
            raise SecAggError(f"site {index} is not a participant of this round")
        n = len(self.participants)
        if self.degree >= n - 1:
            return tuple(p for p in self.participants if p != index)
        if not self.graph:
            raise SecAggError("the neighbour graph is not fixed before the adverts are in")
        order, position = self._ring
        at = position[index]
        half = self.degree // 2
        near = {order[(at + d) % n] for d in range(-half, half + 1) if d}
        return tuple(sorted(near))

    @cached_property
    def _ring(self) -> tuple[list[int], dict[int, int]]:
        """The permutation the graph is laid out on, and each site's place in it."""
        order = list(self.participants)
        random.Random(bytes.fromhex(self.graph)).shuffle(order)  # everyone derives the same
        return order, {u: i for i, u in enumerate(order)}

    def holders(self, index: int) -> tuple[int, ...]:
        """Who holds shares of ``index``'s secrets: its neighbours and itself."""
        return tuple(sorted((*self.neighbours(index), index)))

    def separable(self, alive: Collection[int], removed: int) -> bool:
        """Whether removing at most ``removed`` of the ``alive`` sites can split the
        others into two groups with no edge between them. Colluders are such removable
        sites: the coordinator knows their pairwise masks, so two honest groups joined
        only through colluders unmask on their own (a sum over part of the sites).

        The graph is complete (never separable) or a Harary ring, where an edge spans
        at most ``half`` ring positions: the alive sites split iff two disjoint runs of
        ``half`` consecutive positions hold at most ``removed`` alive sites together
        and alive sites remain on both sides between them."""
        n = len(self.participants)
        if self.degree >= n - 1:
            return False
        order, _ = self._ring
        half = self.degree // 2
        live = set(alive)
        flags = [1 if order[i] in live else 0 for i in range(n)]
        prefix = [0]
        for f in flags + flags:
            prefix.append(prefix[-1] + f)

        def count(start: int, length: int) -> int:  # alive in positions start..start+length-1
            start %= n
            return prefix[start + length] - prefix[start]

        window = [count(i, half) for i in range(n)]
        for a in range(n):
            for gap in range(1, n - 2 * half):  # the second run starts ``half + gap`` later
                b = a + half + gap
                other = n - 2 * half - gap  # positions between the second run and the first
                if other < 1 or window[a] + window[b % n] > removed:
                    continue
                if count(a + half, gap) and count(b + half, other):
                    return True
        return False

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
        probe = _probe_key()
        for name, key in (("c", self.c), ("s", self.s)):
            try:
                crypto.agree(probe, key, info=b"fedsilo-secagg key check")
            except SecAggError:
                raise SecAggError(f"{name} public key is invalid (low-order point)") from None


@lru_cache(maxsize=1)
def _probe_key() -> bytes:
    """A private key of this process's own, to test that a peer's key agrees at all."""
    return crypto.generate_keypair().private


@dataclass(frozen=True)
class Survivors:
    """Whom the coordinator says it holds masked inputs from (``alive``) and who shared
    keys but sent none (``dropped``): one set for the whole round, signed by every
    survivor in the consistency round before anyone reveals a share."""

    alive: tuple[int, ...]
    dropped: tuple[int, ...]


Signer = Callable[[bytes], bytes]  # a site's Ed25519 identity key, signing


@dataclass(frozen=True)
class Advert:
    """A site's public keys for one round, signed with its identity key (the key the
    federation's roster lists): an advert the coordinator made up does not verify."""

    index: int
    identity: bytes  # raw Ed25519 public key
    keys: PublicKeys
    signature: bytes

    SIZE = 3 * crypto.KEY_BYTES + crypto.SIGNATURE_BYTES

    @classmethod
    def make(
        cls, params: SecAggParams, index: int, identity: bytes, keys: PublicKeys, sign: Signer
    ) -> Advert:
        return cls(index, identity, keys, sign(advert_message(params, index, identity, keys)))

    def verifies(self, params: SecAggParams) -> bool:
        message = advert_message(params, self.index, self.identity, self.keys)
        return crypto.verify(self.identity, self.signature, message)

    def to_bytes(self) -> bytes:
        return self.identity + self.keys.c + self.keys.s + self.signature

    @classmethod
    def from_bytes(cls, index: int, blob: bytes, *, checked: bool = False) -> Advert:
        """An advert from the wire (its keys are checked), or from the site's own saved
        state with ``checked`` (they were checked on arrival: not again each stage)."""
        if not isinstance(blob, bytes) or len(blob) != cls.SIZE:
            raise SecAggError(f"the advert of site {index} must be {cls.SIZE} bytes")
        k = crypto.KEY_BYTES
        if checked:
            keys = object.__new__(PublicKeys)  # skips the agreement probe of __post_init__
            object.__setattr__(keys, "c", blob[k : 2 * k])
            object.__setattr__(keys, "s", blob[2 * k : 3 * k])
            return cls(index, blob[:k], keys, blob[3 * k :])
        return cls(index, blob[:k], PublicKeys(blob[k : 2 * k], blob[2 * k : 3 * k]), blob[3 * k :])


def advert_message(params: SecAggParams, index: int, identity: bytes, keys: PublicKeys) -> bytes:
    """What an advert's signature covers: the round (before the graph is fixed), the
    site's protocol index, its identity and both public keys."""
    if params.graph:
        raise SecAggError("adverts are signed before the neighbour graph is fixed")
    return params.context + f"|advert|{index}|".encode() + identity + keys.c + keys.s


def graph_seed(params: SecAggParams, adverts: Mapping[int, Advert]) -> bytes:
    """The neighbour graph's seed: a hash of every signed advert of the round. The
    sites' fresh keys make it unpredictable to the coordinator; its remaining say is
    which adverts to route (and a colluding site's choice of keys), which
    docs/secure-aggregation.md counts in the tolerated colluders."""
    digest = hashlib.sha256(params.context + b"|graph")
    for u in sorted(adverts):
        a = adverts[u]
        digest.update(u.to_bytes(INDEX_BYTES, "big") + a.identity + a.keys.c + a.keys.s)
    return digest.digest()


def share_hash(params: SecAggParams, dealer: int, holder: int, kind: str, share: bytes) -> bytes:
    """Binds one share: the dealer signs it in its dealing record, the holder checks
    the share it opened against it, the coordinator the share it is revealed."""
    return hashlib.sha256(
        params.context + f"|{kind}-share|{dealer}->{holder}|".encode() + share
    ).digest()


DEAL_BYTES = 2 * crypto.KEY_BYTES + crypto.SIGNATURE_BYTES  # b hash, s hash, signature


def deal_message(params: SecAggParams, dealer: int, holder: int, hashes: bytes) -> bytes:
    """What a dealing entry's signature covers: the hashes of one holder's two shares."""
    return params.context + f"|deal|{dealer}->{holder}|".encode() + hashes


def survivors_message(params: SecAggParams, survivors: Survivors) -> bytes:
    """What a survivor signs in the consistency round."""
    alive = ",".join(map(str, survivors.alive))
    dropped = ",".join(map(str, survivors.dropped))
    return params.context + f"|survivors|{alive}|{dropped}".encode()


def reveal_message(params: SecAggParams, holder: int, shares: Mapping[int, bytes]) -> bytes:
    """What a holder signs with the shares it reveals: the coordinator can show who
    revealed what."""
    body = b"".join(v.to_bytes(INDEX_BYTES, "big") + shares[v] for v in sorted(shares))
    return params.context + f"|reveal|{holder}|".encode() + body


def pack_masked(values: RingArray, params: SecAggParams) -> bytes:
    """A masked input on the wire: exactly ring_bits per element."""
    return pack(values, params.ring_bits)
