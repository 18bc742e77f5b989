"""The coordinator's side of a secure round: routes keys and sealed shares it cannot
open, sums masked inputs, and removes the masks from the sum only."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from common.quantize import RingArray, unpack
from common.secagg import crypto, shamir
from common.secagg.errors import SecAggAbort, SecAggError
from common.secagg.params import (
    SEALED_BYTES,
    PublicKeys,
    SecAggParams,
    UnmaskRequest,
    commitment,
    pair_mask,
    ring_mask,
)


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
        mask = ring_mask(self.params.ring_bits)
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
        pieces = self.params.pieces(self.alive)
        if pieces > 1:
            raise SecAggAbort(
                f"after masked input the alive sites' neighbour graph falls into {pieces} "
                "pieces: unmasking would reveal each piece's sum"
            )
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
                pair = pair_mask(self.params, secret, self.keys[w].s, v, w)
                total = total - pair if w < v else total + pair  # undo w's sign(w, v) * pair
        result: RingArray = total & ring_mask(bits)
        return result, tuple(sorted(self.alive))
