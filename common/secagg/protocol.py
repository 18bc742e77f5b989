"""SecAgg+ (Bell et al. 2020; Bonawitz et al. 2017) as two small state machines.

One round, for the sites sampled by the coordinator (protocol indices 1..n):

1. advertise: each site makes two fresh X25519 key pairs, ``c`` (to encrypt shares)
   and ``s`` (to agree pairwise masks), and sends both public keys.
2. share keys: the coordinator forwards to each site its neighbours' public keys. A
   site draws a self-mask seed ``b``, Shamir-shares ``b`` and its ``s`` private key
   among its holders (its neighbours and itself, threshold ``t``), and sends each
   neighbour's pair of shares sealed with ChaCha20-Poly1305 under a key agreed from
   the ``c`` keys, bound to the round, sender and receiver.
3. masked input: the coordinator routes the sealed shares. A site adds to its
   encoded update (a vector in Z_(2^k)) the expansion of ``b`` and, for every
   neighbour ``v`` whose shares it received, ``+PRG(s_uv)`` if ``u < v`` else
   ``-PRG(s_uv)``; pairwise masks cancel in the sum.
4. unmask: the coordinator names which sites' masked inputs it holds (alive) and which
   shared but sent none (dropped). Each survivor reveals, for each neighbour, the
   share of ``b`` if alive or of the ``s`` private key if dropped, never both: a site
   answers one unmask request per round. The coordinator rebuilds the dropped sites'
   pairwise masks and the alive sites' self masks and removes them from the sum.

The neighbour graph is a Harary graph on a public random permutation of the
participants: each site is joined to ``degree / 2`` sites on either side, the complete
graph when ``degree >= n - 1``. A site's secrets are recoverable from any ``t`` of its
``degree + 1`` holders, and ``t`` must be a strict majority of them (so answers to an
honest unmask request never give both secrets of one site) and at least 2.

Every message is checked on arrival: wrong stage, unknown or unexpected sender, wrong
length, failed authentication tag, a message of another round. Anything wrong raises
``SecAggError`` naming it; the coordinator treats the sender as dropped, and aborts the
round with ``SecAggAbort`` when some site's secrets could no longer be recovered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from common.quantize import RingArray, pack, unpack
from common.secagg import crypto, shamir
from common.secagg.errors import SecAggError

PROTOCOL = "fedsilo-secagg+/1"
_INDEX_BYTES = 4
_PLAINTEXT_BYTES = 2 * _INDEX_BYTES + 2 * shamir.SHARE_BYTES
_NONCE_BYTES, _TAG_BYTES = 12, 16
SEALED_BYTES = _NONCE_BYTES + _PLAINTEXT_BYTES + _TAG_BYTES


class SecAggAbort(SecAggError):
    """The round cannot complete securely; the sum must not be used."""


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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def _check_key(name: str, key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != crypto.KEY_BYTES:
        raise SecAggError(f"{name} must be {crypto.KEY_BYTES} bytes")
    return key


def _pair_info(params: SecAggParams, a: int, b: int, purpose: str) -> bytes:
    lo, hi = sorted((a, b))
    return params.context + f"|{purpose}|{lo}|{hi}".encode()


def _share_ad(params: SecAggParams, sender: int, receiver: int) -> bytes:
    return params.context + f"|share|{sender}->{receiver}".encode()


def commitment(params: SecAggParams, index: int, seed: bytes) -> bytes:
    """What a site binds its self-mask seed to before anyone reveals shares of it: the
    coordinator checks the seed it rebuilds, which Shamir alone cannot do from exactly
    ``t`` shares."""
    return hashlib.sha256(params.context + f"|b|{index}|".encode() + seed).digest()


def _pair_mask(
    params: SecAggParams, private: bytes, peer_public: bytes, a: int, b: int
) -> RingArray:
    seed = crypto.agree(private, peer_public, info=_pair_info(params, a, b, "mask"))
    return crypto.expand_mask(seed, params.vector_length, params.ring_bits)


def _ring_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


@dataclass(frozen=True)
class PublicKeys:
    c: bytes  # encrypts shares
    s: bytes  # agrees pairwise masks

    def __post_init__(self) -> None:
        _check_key("c public key", self.c)
        _check_key("s public key", self.s)
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


@dataclass
class SiteSession:
    """A site's secrets and progress through one secure round (kept in node state)."""

    params: SecAggParams
    index: int
    stage: str
    c_private: bytes
    s_private: bytes
    b_seed: bytes = b""
    keys: dict[int, PublicKeys] = field(default_factory=dict)
    received: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # (b, s) shares

    @classmethod
    def start(cls, params: SecAggParams, index: int) -> tuple[SiteSession, PublicKeys]:
        """Stage 1: fresh key pairs for this round."""
        if index not in params.participants:
            raise SecAggError(f"site {index} is not a participant of this round")
        c, s = crypto.generate_keypair(), crypto.generate_keypair()
        session = cls(params, index, "advertised", c.private, s.private)
        return session, PublicKeys(c.public, s.public)

    def _expect(self, stage: str, action: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"{action} is not allowed at stage '{self.stage}'")

    def share_keys(self, keys: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        """Stage 2: shares of ``b`` and ``s`` for every holder whose keys arrived."""
        self._expect("advertised", "share keys")
        holders = set(self.params.holders(self.index))
        unexpected = set(keys) - holders
        if unexpected:
            raise SecAggError(f"keys from sites that are not neighbours: {sorted(unexpected)}")
        own = keys.get(self.index)
        if (
            own is None
            or own.c != crypto.public_from_private(self.c_private)
            or (own.s != crypto.public_from_private(self.s_private))
        ):
            raise SecAggError("the coordinator did not return this site's own public keys")
        seen: set[bytes] = set()
        for v, pk in keys.items():
            if pk.c in seen or pk.s in seen:
                raise SecAggError(f"site {v} advertised a public key already in use")
            seen.update((pk.c, pk.s))
        if len(keys) < self.params.threshold:
            raise SecAggAbort(
                f"only {len(keys)} of {len(holders)} holders advertised keys, "
                f"threshold is {self.params.threshold}"
            )
        self.keys = dict(keys)
        self.b_seed = os.urandom(crypto.KEY_BYTES)
        holders_now = sorted(keys)
        t = self.params.threshold
        b_shares = shamir.split(self.b_seed, threshold=t, holders=holders_now)
        s_shares = shamir.split(self.s_private, threshold=t, holders=holders_now)
        sealed: dict[int, bytes] = {}
        for v in holders_now:
            if v == self.index:
                self.received[v] = (b_shares[v], s_shares[v])
                continue
            key = crypto.agree(
                self.c_private, keys[v].c, info=_pair_info(self.params, self.index, v, "seal")
            )
            plaintext = (
                self.index.to_bytes(_INDEX_BYTES, "big")
                + v.to_bytes(_INDEX_BYTES, "big")
                + b_shares[v]
                + s_shares[v]
            )
            sealed[v] = crypto.seal(
                key, plaintext, associated_data=_share_ad(self.params, self.index, v)
            )
        self.stage = "shared"
        return sealed

    def masked_input(self, sealed: Mapping[int, bytes], encoded: RingArray) -> RingArray:
        """Stage 3: open the shares sent to this site, then mask ``encoded``."""
        self._expect("shared", "masked input")
        unexpected = set(sealed) - (set(self.keys) - {self.index})
        if unexpected:
            raise SecAggError(f"shares from sites that advertised no keys: {sorted(unexpected)}")
        if encoded.shape != (self.params.vector_length,) or encoded.dtype != np.uint64:
            raise SecAggError(
                f"encoded update must be {self.params.vector_length} uint64 ring elements"
            )
        for u, blob in sorted(sealed.items()):
            if not isinstance(blob, bytes) or len(blob) != SEALED_BYTES:
                raise SecAggError(f"sealed shares from site {u} must be {SEALED_BYTES} bytes")
            key = crypto.agree(
                self.c_private, self.keys[u].c, info=_pair_info(self.params, u, self.index, "seal")
            )
            try:
                plain = crypto.open_sealed(
                    key, blob, associated_data=_share_ad(self.params, u, self.index)
                )
            except SecAggError as err:
                raise SecAggError(f"sealed shares from site {u}: {err}") from None
            sender = int.from_bytes(plain[:_INDEX_BYTES], "big")
            receiver = int.from_bytes(plain[_INDEX_BYTES : 2 * _INDEX_BYTES], "big")
            if (sender, receiver) != (u, self.index):
                raise SecAggError(f"sealed shares from site {u} name the wrong sender/receiver")
            body = plain[2 * _INDEX_BYTES :]
            self.received[u] = (body[: shamir.SHARE_BYTES], body[shamir.SHARE_BYTES :])
        if len(self.received) < self.params.threshold:
            raise SecAggAbort(
                f"only {len(self.received)} holders shared keys with this site, "
                f"threshold is {self.params.threshold}"
            )
        mask = _ring_mask(self.params.ring_bits)
        if encoded.size and int(encoded.max()) > int(mask):
            raise SecAggError(f"encoded update has values >= 2^{self.params.ring_bits}")
        total = encoded + crypto.expand_mask(
            self.b_seed, self.params.vector_length, self.params.ring_bits
        )
        for v in sorted(self.received):
            if v == self.index:
                continue
            pair = _pair_mask(self.params, self.s_private, self.keys[v].s, self.index, v)
            total = total + pair if self.index < v else total - pair
        self.stage = "masked"
        masked: RingArray = total & mask
        return masked

    @property
    def commitment(self) -> bytes:
        """Sent with the masked input: binds the self-mask seed (see ``commitment``)."""
        if not self.b_seed:
            raise SecAggError("no self-mask seed before share keys")
        return commitment(self.params, self.index, self.b_seed)

    def unmask(self, request: UnmaskRequest) -> dict[int, bytes]:
        """Stage 4, once: the ``b`` share of each alive holder-peer, the ``s`` share of
        each dropped one. A second request of the round is refused."""
        self._expect("masked", "unmask")
        alive, dropped = set(request.alive), set(request.dropped)
        if alive & dropped:
            raise SecAggError(f"sites both alive and dropped: {sorted(alive & dropped)}")
        if self.index not in alive:
            raise SecAggError("the unmask request does not count this site as alive")
        unknown = (alive | dropped) - set(self.params.participants)
        if unknown:
            raise SecAggError(f"unmask request names unknown sites: {sorted(unknown)}")
        if len(alive) < self.params.threshold:
            raise SecAggAbort(
                f"only {len(alive)} masked inputs, threshold is {self.params.threshold}"
            )
        self.stage = "done"
        out: dict[int, bytes] = {}
        for v, (b_share, s_share) in sorted(self.received.items()):
            if v in alive:
                out[v] = b_share
            elif v in dropped:
                out[v] = s_share
        return out

    # Persistence between the stages (Flower keeps it in the node's context state).
    def to_json(self) -> str:
        return json.dumps(
            {
                "params": self.params.to_json(),
                "index": self.index,
                "stage": self.stage,
                "c": _b64(self.c_private),
                "s": _b64(self.s_private),
                "b": _b64(self.b_seed),
                "keys": {str(v): [_b64(k.c), _b64(k.s)] for v, k in self.keys.items()},
                "received": {str(v): [_b64(b), _b64(s)] for v, (b, s) in self.received.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SiteSession:
        try:
            raw = json.loads(text)
            return cls(
                params=SecAggParams.from_json(raw["params"]),
                index=int(raw["index"]),
                stage=str(raw["stage"]),
                c_private=_unb64(raw["c"]),
                s_private=_unb64(raw["s"]),
                b_seed=_unb64(raw["b"]),
                keys={
                    int(v): PublicKeys(_unb64(c), _unb64(s)) for v, (c, s) in raw["keys"].items()
                },
                received={int(v): (_unb64(b), _unb64(s)) for v, (b, s) in raw["received"].items()},
            )
        except (ValueError, KeyError, TypeError) as err:
            raise SecAggError(f"saved secagg session is unreadable: {err}") from None


@dataclass
class CoordinatorSession:
    """The coordinator's view of one secure round: routes messages, sums, unmasks.

    It never holds a single site's unmasked input: it keeps only the running sum of
    masked inputs and removes masks from that sum.
    """

    params: SecAggParams
    keys: dict[int, PublicKeys] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)  # U2
    sealed: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender
    alive: set[int] = field(default_factory=set)  # U3
    commitments: dict[int, bytes] = field(default_factory=dict)  # of alive sites' b seeds
    total: RingArray | None = None
    rejected: dict[int, str] = field(default_factory=dict)
    stage: str = "advertise"

    def _expect(self, stage: str, nxt: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"coordinator expected stage '{self.stage}', got '{stage}'")
        self.stage = nxt

    def _reject(self, site: int, reason: str) -> None:
        self.rejected.setdefault(site, reason)

    def _require(self, survivors: set[int], candidates: Iterable[int], stage: str) -> None:
        t = self.params.threshold
        if len(survivors) < t:
            raise SecAggAbort(f"after {stage}, {len(survivors)} sites remain, threshold is {t}")
        for u in sorted(candidates):
            live = len(set(self.params.holders(u)) & survivors)
            if live < t:
                raise SecAggAbort(
                    f"after {stage}, site {u} has {live} live holders of its secrets, "
                    f"fewer than the threshold {t}"
                )

    def receive_keys(self, replies: Mapping[int, PublicKeys]) -> dict[int, dict[int, PublicKeys]]:
        """Stage 1 -> 2: each site gets the public keys of its live holders."""
        self._expect("advertise", "share")
        seen: dict[bytes, int] = {}
        for u, pk in sorted(replies.items()):
            if u not in self.params.participants:
                self._reject(u, "keys from a site that is not a participant")
                continue
            if pk.c in seen or pk.s in seen:
                self._reject(
                    u, f"public key already advertised by site {seen.get(pk.c, seen.get(pk.s))}"
                )
                continue
            seen[pk.c] = seen[pk.s] = u
            self.keys[u] = pk
        survivors = set(self.keys)
        self._require(survivors, survivors, "advertise keys")
        return {
            u: {v: self.keys[v] for v in self.params.holders(u) if v in survivors}
            for u in sorted(survivors)
        }

    def receive_shares(
        self, replies: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Stage 2 -> 3: route each sealed share to its receiver (opaque to us)."""
        self._expect("share", "masked")
        for u, per_receiver in sorted(replies.items()):
            if u not in self.keys:
                self._reject(u, "shares from a site that advertised no keys")
                continue
            expected = {v for v in self.params.holders(u) if v in self.keys} - {u}
            if set(per_receiver) != expected:
                self._reject(u, "shares addressed to the wrong set of sites")
                continue
            if any(
                not isinstance(b, bytes) or len(b) != SEALED_BYTES for b in per_receiver.values()
            ):
                self._reject(u, f"sealed shares must be {SEALED_BYTES} bytes each")
                continue
            self.shared.add(u)
            for v, blob in per_receiver.items():
                self.sealed.setdefault(v, {})[u] = blob
        self._require(self.shared, self.shared, "share keys")
        return {
            v: {u: blob for u, blob in self.sealed.get(v, {}).items() if u in self.shared}
            for v in sorted(self.shared)
        }

    def receive_masked(
        self, replies: Mapping[int, tuple[bytes, bytes]]
    ) -> dict[int, UnmaskRequest]:
        """Stage 3 -> 4: add each packed masked input to the sum (and keep the site's
        commitment to its self-mask seed); ask for the shares."""
        self._expect("masked", "unmask")
        mask = _ring_mask(self.params.ring_bits)
        total = np.zeros(self.params.vector_length, dtype=np.uint64)
        for u, (blob, bound) in sorted(replies.items()):
            if u not in self.shared:
                self._reject(u, "masked input from a site that did not share keys")
                continue
            if not isinstance(bound, bytes) or len(bound) != hashlib.sha256().digest_size:
                self._reject(u, "masked input without a 32-byte commitment to its seed")
                continue
            try:
                y = unpack(blob, self.params.ring_bits, self.params.vector_length)
            except ValueError as err:
                self._reject(u, f"malformed masked input: {err}")
                continue
            total = (total + y) & mask
            self.alive.add(u)
            self.commitments[u] = bound
        self.total = total
        dropped = self.shared - self.alive
        # Alive sites' self masks and dropped sites' keys must both be recoverable.
        self._require(self.alive, self.shared, "masked input")
        requests: dict[int, UnmaskRequest] = {}
        for u in sorted(self.alive):
            holders = set(self.params.holders(u))
            requests[u] = UnmaskRequest(
                alive=tuple(sorted(self.alive & holders)),
                dropped=tuple(sorted(dropped & holders)),
            )
        return requests

    def _rebuild(self, shares: Mapping[int, bytes], what: str) -> bytes:
        t = self.params.threshold
        if len(shares) < t:
            raise SecAggAbort(f"only {len(shares)} shares of {what}, need {t}")
        try:
            return shamir.combine(shares, threshold=t)
        except SecAggError as err:
            raise SecAggAbort(f"{what}: {err}") from None

    def receive_unmask(
        self, replies: Mapping[int, Mapping[int, bytes]]
    ) -> tuple[RingArray, tuple[int, ...]]:
        """Stage 4 -> done: rebuild masks, remove them; the sum and whose inputs it holds."""
        self._expect("unmask", "done")
        assert self.total is not None
        dropped = self.shared - self.alive
        shares: dict[int, dict[int, bytes]] = {}
        for holder, per_site in sorted(replies.items()):
            if holder not in self.alive:
                self._reject(holder, "unmask shares from a site that was not asked")
                continue
            holders_of = {v for v in per_site}
            wanted = {v for v in self.shared if holder in self.params.holders(v)} & (
                self.alive | dropped
            )
            if not holders_of <= wanted or any(
                not isinstance(s, bytes) or len(s) != shamir.SHARE_BYTES for s in per_site.values()
            ):
                self._reject(holder, "unmask shares for the wrong sites or of the wrong size")
                continue
            for v, share in per_site.items():
                shares.setdefault(v, {})[holder] = share
        bits, n = self.params.ring_bits, self.params.vector_length
        total = self.total.copy()
        for u in sorted(self.alive):
            seed = self._rebuild(shares.get(u, {}), f"site {u}'s self-mask seed")
            if commitment(self.params, u, seed) != self.commitments[u]:
                raise SecAggAbort(
                    f"site {u}'s rebuilt self-mask seed does not match its commitment"
                )
            total = total - crypto.expand_mask(seed, n, bits)
        for v in sorted(dropped):
            secret = self._rebuild(shares.get(v, {}), f"dropped site {v}'s key")
            if crypto.public_from_private(secret) != self.keys[v].s:
                raise SecAggAbort(f"dropped site {v}'s rebuilt key does not match its public key")
            for w in sorted(self.alive & set(self.params.neighbours(v))):
                pair = _pair_mask(self.params, secret, self.keys[w].s, v, w)
                total = total - pair if w < v else total + pair  # undo w's sign(w, v) * pair
        result: RingArray = total & _ring_mask(bits)
        return result, tuple(sorted(self.alive))


def pack_masked(values: RingArray, params: SecAggParams) -> bytes:
    """A masked input on the wire: exactly ring_bits per element."""
    return pack(values, params.ring_bits)
