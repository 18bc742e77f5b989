"""The coordinator's side of a secure round: it checks and routes what the sites
send, sums the masked inputs, gathers the survivors' signatures and removes the masks
from the sum only.

It relays; the sites do not trust it. Every check here is for robustness and blame:
a site whose advert, dealing record, signature or revealed share does not verify is
rejected and named (``rejected``), and the round completes whenever enough verified
shares remain."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from common.quantize import RingArray, unpack
from common.secagg import crypto, shamir
from common.secagg.errors import SecAggAbort, SecAggError
from common.secagg.params import (
    DEAL_BYTES,
    SEALED_BYTES,
    Advert,
    SecAggParams,
    Survivors,
    commitment,
    deal_message,
    graph_seed,
    pair_mask,
    reveal_message,
    ring_mask,
    share_hash,
    survivors_message,
)

Dealing = tuple[dict[int, bytes], dict[int, bytes]]  # sealed shares, dealing entries


@dataclass
class CoordinatorSession:
    """The coordinator's view of one secure round: routes messages, sums, unmasks.

    It never holds a single site's unmasked input: it keeps only the running sum of
    masked inputs and removes masks from that sum.
    """

    params: SecAggParams
    adverts: dict[int, Advert] = field(default_factory=dict)  # U1
    shared: set[int] = field(default_factory=set)  # U2
    sealed: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender
    dealt: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender
    hashes: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (dealer, holder)
    members: set[int] = field(default_factory=set)  # U2 less refused dealers: train
    reports: dict[int, list[int]] = field(default_factory=dict)  # dealer -> who refused it
    alive: set[int] = field(default_factory=set)  # U3
    survivors: Survivors | None = None
    signatures: dict[int, bytes] = field(default_factory=dict)  # U4
    commitments: dict[int, bytes] = field(default_factory=dict)  # of alive sites' b seeds
    total: RingArray | None = None
    rejected: dict[int, str] = field(default_factory=dict)
    # Sites proven to have cheated: every share of theirs matched their own signed
    # entries, yet the shares do not rebuild what they committed to or advertised.
    cheaters: set[int] = field(default_factory=set)
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

    def receive_adverts(self, replies: Mapping[int, Advert]) -> dict[int, Advert]:
        """Stage 1 -> 2: the signed adverts every site gets (all of them: each site
        checks them against its roster and derives the graph from them)."""
        self._expect("advertise", "share")
        seen: dict[bytes, int] = {}
        for u, advert in sorted(replies.items()):
            if u not in self.params.participants or advert.index != u:
                self._reject(u, "an advert from a site that is not this participant")
                continue
            if not advert.verifies(self.params):
                self._reject(u, "an advert whose signature does not verify")
                continue
            used = [k for k in (advert.identity, advert.keys.c, advert.keys.s) if k in seen]
            if used:
                self._reject(u, f"a key already advertised by site {seen[used[0]]}")
                continue
            for k in (advert.identity, advert.keys.c, advert.keys.s):
                seen[k] = u
            self.adverts[u] = advert
        if len(self.adverts) < 2:
            raise SecAggAbort(f"only {len(self.adverts)} sites advertised keys")
        self.params = self.params.with_graph(graph_seed(self.params, self.adverts))
        survivors = set(self.adverts)
        self._require(survivors, survivors, "advertise keys")
        return dict(self.adverts)

    def receive_shares(self, replies: Mapping[int, Dealing]) -> dict[int, Dealing]:
        """Stage 2 -> 3: keep each dealer's signed entries (the share hashes), route
        each sealed share with its entry to its receiver (the shares are opaque to us)."""
        self._expect("share", "open")
        for u, (per_receiver, entries) in sorted(replies.items()):
            if u not in self.adverts:
                self._reject(u, "shares from a site that advertised no keys")
                continue
            expected = {v for v in self.params.holders(u) if v in self.adverts}
            if set(per_receiver) != expected - {u} or set(entries) != expected:
                self._reject(u, "shares addressed to the wrong set of sites")
                continue
            if any(
                not isinstance(b, bytes) or len(b) != SEALED_BYTES for b in per_receiver.values()
            ):
                self._reject(u, f"sealed shares must be {SEALED_BYTES} bytes each")
                continue
            identity = self.adverts[u].identity
            if any(
                not isinstance(e, bytes)
                or len(e) != DEAL_BYTES
                or not crypto.verify(identity, e[64:], deal_message(self.params, u, v, e[:64]))
                for v, e in entries.items()
            ):
                self._reject(u, "a dealing entry whose signature does not verify")
                continue
            self.shared.add(u)
            for v, entry in entries.items():
                self.hashes[(u, v)] = entry[:64]
            for v, blob in per_receiver.items():
                self.sealed.setdefault(v, {})[u] = blob
                self.dealt.setdefault(v, {})[u] = entries[v]
        self._require(self.shared, self.shared, "share keys")
        return {
            v: (
                {u: b for u, b in self.sealed.get(v, {}).items() if u in self.shared},
                {u: e for u, e in self.dealt.get(v, {}).items() if u in self.shared},
            )
            for v in sorted(self.shared)
        }

    def receive_opened(self, replies: Mapping[int, Iterable[int]]) -> tuple[int, ...]:
        """Stage 3 -> 4, before anyone trains: each holder names the dealers whose shares
        failed its checks. A refusal is a conflict between a holder and a dealer that
        nobody can settle (only the holder sees the shares; the routing may have been
        tampered with), so both may be at fault. A site in two or more conflicts is left
        out; a conflict between two sites in no other one leaves both out. One malicious
        site thus removes itself and at most one honest site, never a round. Sites that
        did not reply are out too; the rest are the round's sites."""
        self._expect("open", "masked")
        opened: set[int] = set()
        conflicts: set[tuple[int, int]] = set()  # (holder, dealer)
        for w, refused in sorted(replies.items()):
            if w not in self.shared:
                self._reject(w, "opened shares it was never sent")
                continue
            opened.add(w)
            for v in set(refused):
                if v in self.shared and v != w and w in self.params.holders(v):
                    conflicts.add((w, v))
        count: dict[int, int] = {}
        for w, v in sorted(conflicts):
            count[w] = count.get(w, 0) + 1
            count[v] = count.get(v, 0) + 1
            self.reports.setdefault(v, []).append(w)
        out = {u for u, k in count.items() if k >= 2}
        for u in sorted(out):
            others = sorted({x for pair in conflicts if u in pair for x in pair} - {u})
            self._reject(
                u,
                f"in conflict over dealt shares with sites {others} (refused theirs or was "
                "refused by them; which side is at fault cannot be checked): left out "
                "before training",
            )
        for w, v in sorted(conflicts):
            if w not in out and v not in out:
                out |= {w, v}
                why = (
                    f"holder {w} refused the shares dealer {v} dealt it (they do not match "
                    f"{v}'s signed entry, or were tampered with on the way; which cannot be "
                    "checked): both left out before training"
                )
                self._reject(w, why)
                self._reject(v, why)
        self.members = opened - out
        self._require(self.members, self.members, "opening shares")
        return tuple(sorted(self.members))

    def receive_masked(self, replies: Mapping[int, tuple[bytes, bytes]]) -> Survivors:
        """Stage 5 -> 6: add each packed masked input to the sum (and keep the site's
        commitment to its self-mask seed); the survivor set every survivor will sign."""
        self._expect("masked", "consistency")
        mask = ring_mask(self.params.ring_bits)
        total = np.zeros(self.params.vector_length, dtype=np.uint64)
        for u, (blob, bound) in sorted(replies.items()):
            if u not in self.members:
                self._reject(u, "masked input from a site that is not in the round")
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
        # Alive sites' self masks and dropped sites' keys must both be recoverable.
        self._require(self.alive, self.members, "masked input")
        pieces = self.params.pieces(self.alive)
        if pieces > 1:
            raise SecAggAbort(
                f"after masked input the alive sites' neighbour graph falls into {pieces} "
                "pieces: unmasking would reveal each piece's sum"
            )
        if self.params.separable(self.alive, self.params.tolerated):
            raise SecAggAbort(
                f"after masked input, {self.params.tolerated} colluding alive sites (the "
                "number this round tolerates) could cut the alive sites' neighbour graph: "
                "unmasking could reveal the sum of part of them"
            )
        self.survivors = Survivors(
            alive=tuple(sorted(self.alive)), dropped=tuple(sorted(self.members - self.alive))
        )
        return self.survivors

    def receive_signatures(self, replies: Mapping[int, bytes]) -> dict[int, bytes]:
        """Stage 6 -> 7: the survivors' signatures on the survivor set (forwarded to all
        of them); each site reveals only if ``t`` of its holders signed."""
        self._expect("consistency", "unmask")
        assert self.survivors is not None
        message = survivors_message(self.params, self.survivors)
        for u, sig in sorted(replies.items()):
            if u not in self.alive:
                self._reject(u, "a survivor signature from a site that is not alive")
            elif not crypto.verify(self.adverts[u].identity, sig, message):
                self._reject(u, "a survivor signature that does not verify")
            else:
                self.signatures[u] = sig
        # Every alive site's self mask and every dropped site's key needs t revealers.
        self._require(set(self.signatures), self.members, "consistency")
        return dict(self.signatures)

    def _dealt_hash(self, dealer: int, holder: int, kind: str) -> bytes:
        hashes = self.hashes[(dealer, holder)]  # b hash || s hash
        return hashes[:32] if kind == "b" else hashes[32:]

    def _verified_shares(
        self, replies: Mapping[int, tuple[Mapping[int, bytes], bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """The revealed shares that verify (by dealer), rejecting and naming any holder
        whose reply is unsigned, misaddressed, or holds a share its dealer did not deal."""
        assert self.survivors is not None
        alive, dropped = set(self.survivors.alive), set(self.survivors.dropped)
        shares: dict[int, dict[int, bytes]] = {}
        for holder, (per_site, signature) in sorted(replies.items()):
            if holder not in self.signatures:
                self._reject(holder, "unmask shares from a site that was not asked")
                continue
            wanted = {v for v in alive | dropped if holder in self.params.holders(v)}
            if not set(per_site) <= wanted or any(
                not isinstance(s, bytes) or len(s) != shamir.SHARE_BYTES for s in per_site.values()
            ):
                self._reject(holder, "unmask shares for the wrong sites or of the wrong size")
                continue
            if not crypto.verify(
                self.adverts[holder].identity,
                signature,
                reveal_message(self.params, holder, per_site),
            ):
                self._reject(holder, "unmask shares whose signature does not verify")
                continue
            liar = [
                v
                for v, share in sorted(per_site.items())
                if share_hash(self.params, v, holder, "b" if v in alive else "s", share)
                != self._dealt_hash(v, holder, "b" if v in alive else "s")
            ]
            if liar:
                self._reject(
                    holder,
                    f"revealed a share of site {liar[0]} that site {liar[0]} did not deal it "
                    "(its signed dealing record says otherwise); its shares were discarded",
                )
                continue
            for v, share in per_site.items():
                shares.setdefault(v, {})[holder] = share
        return shares

    def _cheated(self, site: int, what: str) -> None:
        """``site`` is proven to have cheated: every share of its secret matched its own
        signed dealing entries, so the shares it dealt are its own doing."""
        self.cheaters.add(site)
        self._reject(site, f"cheated: it {what} (its signed dealing entries prove it)")

    def _rebuild(self, shares: Mapping[int, bytes], what: str, dealer: int) -> bytes:
        t = self.params.threshold
        if len(shares) < t:
            named = sorted(u for u, why in self.rejected.items() if "revealed a share" in why)
            blame = f" (sites {named} revealed bad shares)" if named else ""
            raise SecAggAbort(f"only {len(shares)} verified shares of {what}, need {t}{blame}")
        try:
            return shamir.combine(shares, threshold=t)
        except SecAggError as err:
            # Every share matched its dealer's signed entry: the dealer dealt them off
            # one polynomial.
            self._cheated(
                dealer, "dealt shares that match its signed entries but lie on no one polynomial"
            )
            raise SecAggAbort(f"{what}: {err}; its dealer cheated") from None

    def receive_unmask(
        self, replies: Mapping[int, tuple[Mapping[int, bytes], bytes]]
    ) -> tuple[RingArray, tuple[int, ...]]:
        """Stage 7 -> done: rebuild masks from verified shares, remove them; the sum and
        whose inputs it holds. Every verified share lies on its dealer's polynomial
        unless the dealer cheated, which the commitment (b) or public key (s) shows."""
        self._expect("unmask", "done")
        assert self.total is not None
        dropped = self.members - self.alive
        shares = self._verified_shares(replies)
        bits, n = self.params.ring_bits, self.params.vector_length
        total = self.total.copy()
        for u in sorted(self.alive):
            seed = self._rebuild(shares.get(u, {}), f"site {u}'s self-mask seed", u)
            if commitment(self.params, u, seed) != self.commitments[u]:
                self._cheated(u, "dealt shares of a self-mask seed it did not commit to")
                raise SecAggAbort(
                    f"site {u} dealt shares that do not rebuild the self-mask seed it "
                    f"committed to: site {u} cheated"
                )
            total = total - crypto.expand_mask(seed, n, bits)
        for v in sorted(dropped):
            secret = self._rebuild(shares.get(v, {}), f"dropped site {v}'s key", v)
            if crypto.public_from_private(secret) != self.adverts[v].keys.s:
                self._cheated(v, "dealt shares of a key it did not advertise")
                raise SecAggAbort(
                    f"dropped site {v} dealt shares that do not rebuild the key it advertised"
                )
            for w in sorted(self.alive & set(self.params.neighbours(v))):
                pair = pair_mask(self.params, secret, self.adverts[w].keys.s, v, w)
                total = total - pair if w < v else total + pair  # undo w's sign(w, v) * pair
        result: RingArray = total & ring_mask(bits)
        return result, tuple(sorted(self.alive))
