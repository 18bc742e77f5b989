"""A site's side of a secure round, as a small state machine whose state is kept
between the stages (Flower's node state): fresh keys in a signed advert; shares of its
secrets sealed to its holders with a signed dealing record; the shares dealt to it,
opened and checked; the round's final set of sites, admitted; all of this before it
trains. Then its masked input, one signature on the survivor set, and one signed
answer to one unmask request.

Nothing the coordinator relays is taken on its word: adverts must verify under keys
on the site's roster, dealt shares must match their dealer's signed record, and
shares are revealed only after enough holders signed the same survivor set."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from common.quantize import RingArray
from common.secagg import crypto, shamir
from common.secagg.errors import SecAggAbort, SecAggError
from common.secagg.params import (
    DEAL_BYTES,
    INDEX_BYTES,
    SEALED_BYTES,
    Advert,
    PublicKeys,
    SecAggParams,
    Signer,
    Survivors,
    commitment,
    deal_message,
    graph_seed,
    pair_info,
    pair_mask,
    reveal_message,
    ring_mask,
    share_ad,
    share_hash,
    survivors_message,
)
from common.secagg.roster import Roster


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def check_survivors(
    params: SecAggParams, index: int, survivors: Survivors, members: set[int], min_sites: int
) -> None:
    """The checks every site makes on a survivor set before signing it: it splits the
    round's sites (``members``) into alive and dropped, counts this site alive, holds
    at least ``t`` and the site's own minimum of alive sites (the sum the coordinator
    learns is over them), and their neighbour graph stays in one piece even without
    the colluders the round tolerates."""
    alive, dropped = set(survivors.alive), set(survivors.dropped)
    if list(survivors.alive) != sorted(alive) or list(survivors.dropped) != sorted(dropped):
        raise SecAggError("the survivor set must list sites once each, in order")
    if alive & dropped:
        raise SecAggError(f"sites both alive and dropped: {sorted(alive & dropped)}")
    if index not in alive:
        raise SecAggError("the survivor set does not count this site as alive")
    if alive | dropped != members:
        raise SecAggError(
            "the survivor set does not split the round's sites: it names "
            f"{sorted((alive | dropped) - members)} and leaves out {sorted(members - alive - dropped)}"
        )
    least = max(params.threshold, min_sites)
    if len(alive) < least:
        raise SecAggAbort(
            f"only {len(alive)} masked inputs; this site requires at least {least} (threshold "
            f"{params.threshold}, its own minimum {min_sites})"
        )
    pieces = params.pieces(alive)
    if pieces > 1:  # checked here too: the coordinator is the party guarded against
        raise SecAggAbort(
            f"the alive sites' neighbour graph falls into {pieces} pieces: revealing "
            "shares would unmask each piece on its own"
        )
    # Colluders' pairwise masks are known to the coordinator: honest groups joined only
    # through colluders would unmask on their own, a sum over part of the sites.
    if params.separable(alive, params.tolerated):
        raise SecAggAbort(
            f"{params.tolerated} colluding alive sites (the number this round tolerates) "
            "could cut the alive sites' neighbour graph: revealing shares could unmask the "
            "sum of part of them"
        )


@dataclass
class SiteSession:
    """A site's secrets and progress through one secure round (kept in node state).

    The identity key that signs is never part of it: each signing stage is handed a
    ``Signer`` (the site's state folder holds the key)."""

    params: SecAggParams
    index: int
    stage: str
    c_private: bytes
    s_private: bytes
    identity: bytes  # this site's raw Ed25519 public key
    b_seed: bytes = b""
    adverts: dict[int, Advert] = field(default_factory=dict)  # verified, by index
    received: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # (b, s) shares
    told: Survivors | None = None  # the survivor set this site signed
    min_sites: int = 2  # the fewest sites this site joins a sum of (its own setting)
    members: tuple[int, ...] = ()  # the round's sites, as admitted before training

    @classmethod
    def start(
        cls, params: SecAggParams, index: int, identity: bytes, sign: Signer
    ) -> tuple[SiteSession, Advert]:
        """Stage 1: fresh key pairs for this round, advertised under the site's identity."""
        if index not in params.participants:
            raise SecAggError(f"site {index} is not a participant of this round")
        if params.graph:
            raise SecAggError("the coordinator may not fix the neighbour graph")
        c, s = crypto.generate_keypair(), crypto.generate_keypair()
        session = cls(params, index, "advertised", c.private, s.private, identity)
        advert = Advert.make(params, index, identity, PublicKeys(c.public, s.public), sign)
        return session, advert

    def _expect(self, stage: str, action: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"{action} is not allowed at stage '{self.stage}'")

    def check_adverts(
        self, adverts: Mapping[int, Advert], roster: Roster, *, min_sites: int
    ) -> None:
        """Every advert the coordinator routed must verify under a roster key, each
        identity and key be used once, this site's own advert be the one it made, and
        at least ``min_sites`` sites (this one included) take part. Raises before the
        site has touched its data; on success the neighbour graph is fixed."""
        self._expect("advertised", "check adverts")
        participants = set(self.params.participants)
        if set(adverts) - participants:
            raise SecAggError(f"adverts of non-participants: {sorted(set(adverts) - participants)}")
        own = adverts.get(self.index)
        if (
            own is None
            or own.identity != self.identity
            or own.keys.c != crypto.public_from_private(self.c_private)
            or own.keys.s != crypto.public_from_private(self.s_private)
        ):
            raise SecAggError("the coordinator did not return this site's own advert")
        names: dict[bytes, int] = {}
        seen: set[bytes] = set()
        for v, advert in sorted(adverts.items()):
            if advert.index != v:
                raise SecAggError(f"the advert routed as site {v} is site {advert.index}'s")
            name = roster.name_of(advert.identity)
            if name is None:
                raise SecAggError(f"site {v}'s identity key is not on this site's roster")
            if not advert.verifies(self.params):
                raise SecAggError(f"site {v}'s advert ({name}) does not verify under its key")
            if advert.identity in names:
                raise SecAggError(f"{name} appears as both site {names[advert.identity]} and {v}")
            names[advert.identity] = v
            if advert.keys.c in seen or advert.keys.s in seen:
                raise SecAggError(f"site {v} advertised a public key already in use")
            seen.update((advert.keys.c, advert.keys.s))
        if len(adverts) < min_sites:
            raise SecAggAbort(
                f"only {len(adverts)} authenticated sites in the round, this site requires "
                f"at least {min_sites}"
            )
        params = self.params.with_graph(graph_seed(self.params, adverts))
        holders = [v for v in params.holders(self.index) if v in adverts]
        if len(holders) < params.threshold:
            raise SecAggAbort(
                f"only {len(holders)} of {params.degree + 1} holders advertised keys, "
                f"threshold is {params.threshold}"
            )
        self.params = params
        self.adverts = {v: adverts[v] for v in sorted(adverts)}
        self.min_sites = min_sites
        self.stage = "checked"

    def share_keys(self, sign: Signer) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Stage 2 (after ``check_adverts``): shares of ``b`` and ``s`` for every holder with a verified advert:
        sealed to each holder, and each bound by a signed dealing entry (the hashes of
        that holder's two shares) that the holder and the coordinator can check."""
        self._expect("checked", "share keys")
        self.b_seed = os.urandom(crypto.KEY_BYTES)
        holders_now = [v for v in self.params.holders(self.index) if v in self.adverts]
        t = self.params.threshold
        b_shares = shamir.split(self.b_seed, threshold=t, holders=holders_now)
        s_shares = shamir.split(self.s_private, threshold=t, holders=holders_now)
        sealed: dict[int, bytes] = {}
        dealt: dict[int, bytes] = {}
        for v in holders_now:
            hashes = share_hash(self.params, self.index, v, "b", b_shares[v]) + share_hash(
                self.params, self.index, v, "s", s_shares[v]
            )
            dealt[v] = hashes + sign(deal_message(self.params, self.index, v, hashes))
            if v == self.index:
                self.received[v] = (b_shares[v], s_shares[v])
                continue
            key = crypto.agree(
                self.c_private,
                self.adverts[v].keys.c,
                info=pair_info(self.params, self.index, v, "seal"),
            )
            plaintext = (
                self.index.to_bytes(INDEX_BYTES, "big")
                + v.to_bytes(INDEX_BYTES, "big")
                + b_shares[v]
                + s_shares[v]
            )
            sealed[v] = crypto.seal(
                key, plaintext, associated_data=share_ad(self.params, self.index, v)
            )
        self.stage = "shared"
        return sealed, dealt

    def open_shares(
        self, sealed: Mapping[int, bytes], dealt: Mapping[int, bytes]
    ) -> tuple[int, ...]:
        """Stage 3, before training: open the shares sent to this site and check each
        against its dealer's signed entry. Returns the dealers whose shares fail (a
        tampered seal, a missing or wrong entry): the site keeps none of theirs, and
        the coordinator must leave them out of the round before anyone trains."""
        self._expect("shared", "open shares")
        unexpected = set(sealed) - (set(self.params.neighbours(self.index)) & set(self.adverts))
        if unexpected:
            raise SecAggError(
                f"shares from sites that are not advertised holders: {sorted(unexpected)}"
            )
        received = dict(self.received)  # kept only once every routed share is opened
        refused: list[int] = []
        for u, blob in sorted(sealed.items()):
            shares = self._open(u, blob, dealt.get(u))
            if shares is None:
                refused.append(u)
            else:
                received[u] = shares
        self.received = received
        self.stage = "opened"
        return tuple(refused)

    def _open(self, u: int, blob: bytes, entry: bytes | None) -> tuple[bytes, bytes] | None:
        """Dealer ``u``'s two shares for this site, or None if they fail any check."""
        if not isinstance(blob, bytes) or len(blob) != SEALED_BYTES:
            return None
        key = crypto.agree(
            self.c_private,
            self.adverts[u].keys.c,
            info=pair_info(self.params, u, self.index, "seal"),
        )
        try:
            plain = crypto.open_sealed(
                key, blob, associated_data=share_ad(self.params, u, self.index)
            )
        except SecAggError:
            return None
        sender = int.from_bytes(plain[:INDEX_BYTES], "big")
        receiver = int.from_bytes(plain[INDEX_BYTES : 2 * INDEX_BYTES], "big")
        if (sender, receiver) != (u, self.index):
            return None
        body = plain[2 * INDEX_BYTES :]
        b_share, s_share = body[: shamir.SHARE_BYTES], body[shamir.SHARE_BYTES :]
        hashes = share_hash(self.params, u, self.index, "b", b_share) + share_hash(
            self.params, u, self.index, "s", s_share
        )
        if (
            not isinstance(entry, bytes)
            or len(entry) != DEAL_BYTES
            or entry[: len(hashes)] != hashes
            or not crypto.verify(
                self.adverts[u].identity,
                entry[len(hashes) :],
                deal_message(self.params, u, self.index, hashes),
            )
        ):
            return None
        return b_share, s_share

    def admit(self, members: tuple[int, ...]) -> None:
        """Stage 4, before training: the coordinator's final set of the round's sites
        (those whose shares every holder accepted). This site must be in it with each
        of its neighbours in it having dealt it valid shares, every member must keep
        ``t`` holders among the members, and there must be at least ``min_sites``."""
        self._expect("opened", "admit the round's sites")
        if list(members) != sorted(set(members)):
            raise SecAggError("the round's sites must be listed once each, in order")
        if self.index not in members:
            raise SecAggError("the round's sites do not include this site")
        unknown = set(members) - set(self.adverts)
        if unknown:
            raise SecAggError(
                f"the round's sites include sites without an advert: {sorted(unknown)}"
            )
        missing = set(self.params.neighbours(self.index)) & set(members) - set(self.received)
        if missing:
            raise SecAggError(
                f"the round includes sites whose shares this site refused or never received: "
                f"{sorted(missing)}"
            )
        if len(members) < self.min_sites:
            raise SecAggAbort(
                f"only {len(members)} sites remain in the round, this site requires at "
                f"least {self.min_sites}"
            )
        for u in members:
            live = len(set(self.params.holders(u)) & set(members))
            if live < self.params.threshold:
                raise SecAggAbort(
                    f"site {u} would have {live} live holders of its secrets, fewer than "
                    f"the threshold {self.params.threshold}"
                )
        self.members = tuple(members)
        self.stage = "admitted"

    def masked_input(self, encoded: RingArray) -> RingArray:
        """Stage 5, after training: mask ``encoded`` with the self mask and a pairwise
        mask for every neighbour among the round's sites."""
        self._expect("admitted", "masked input")
        if encoded.shape != (self.params.vector_length,) or encoded.dtype != np.uint64:
            raise SecAggError(
                f"encoded update must be {self.params.vector_length} uint64 ring elements"
            )
        mask = ring_mask(self.params.ring_bits)
        if encoded.size and int(encoded.max()) > int(mask):
            raise SecAggError(f"encoded update has values >= 2^{self.params.ring_bits}")
        total = encoded + crypto.expand_mask(
            self.b_seed, self.params.vector_length, self.params.ring_bits
        )
        for v in sorted(set(self.params.neighbours(self.index)) & set(self.members)):
            pair = pair_mask(self.params, self.s_private, self.adverts[v].keys.s, self.index, v)
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

    def consistency(self, survivors: Survivors, sign: Signer) -> bytes:
        """Stage 6, once: check the survivor set and sign it."""
        self._expect("masked", "sign the survivor set")
        check_survivors(self.params, self.index, survivors, set(self.members), self.min_sites)
        self.told = survivors
        self.stage = "signed"
        return sign(survivors_message(self.params, survivors))

    def unmask(
        self, survivors: Survivors, signatures: Mapping[int, bytes], sign: Signer
    ) -> tuple[dict[int, bytes], bytes]:
        """Stage 7, once: if at least ``t`` of this site's holders (itself included)
        signed the very survivor set it signed, reveal the ``b`` share of each alive
        holder-peer and the ``s`` share of each dropped one (never both), signed."""
        self._expect("signed", "unmask")
        if survivors != self.told:
            raise SecAggError("the unmask request's survivor set is not the one this site signed")
        message = survivors_message(self.params, survivors)
        mine = set(self.params.holders(self.index)) & set(survivors.alive)
        valid = {
            v
            for v, sig in signatures.items()
            if v in mine and crypto.verify(self.adverts[v].identity, sig, message)
        } | {self.index}
        if len(valid) < self.params.threshold:
            raise SecAggAbort(
                f"only {len(valid)} of this site's holders signed the survivor set it was "
                f"told, threshold is {self.params.threshold}: the coordinator may have told "
                "sites different sets"
            )
        self.stage = "done"
        alive, dropped = set(survivors.alive), set(survivors.dropped)
        out: dict[int, bytes] = {}
        for v, (b_share, s_share) in sorted(self.received.items()):
            if v in alive:
                out[v] = b_share
            elif v in dropped:
                out[v] = s_share
        return out, sign(reveal_message(self.params, self.index, out))

    # Persistence between the stages (Flower keeps it in the node's context state).
    def to_json(self) -> str:
        return json.dumps(
            {
                "params": self.params.to_json(),
                "index": self.index,
                "stage": self.stage,
                "c": _b64(self.c_private),
                "s": _b64(self.s_private),
                "identity": _b64(self.identity),
                "b": _b64(self.b_seed),
                "adverts": {str(v): _b64(a.to_bytes()) for v, a in self.adverts.items()},
                "received": {str(v): [_b64(b), _b64(s)] for v, (b, s) in self.received.items()},
                "told": None
                if self.told is None
                else [list(self.told.alive), list(self.told.dropped)],
                "min_sites": self.min_sites,
                "members": list(self.members),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SiteSession:
        try:
            raw = json.loads(text)
            told = raw["told"]
            return cls(
                params=SecAggParams.from_json(raw["params"]),
                index=int(raw["index"]),
                stage=str(raw["stage"]),
                c_private=_unb64(raw["c"]),
                s_private=_unb64(raw["s"]),
                identity=_unb64(raw["identity"]),
                b_seed=_unb64(raw["b"]),
                adverts={
                    int(v): Advert.from_bytes(int(v), _unb64(a), checked=True)
                    for v, a in raw["adverts"].items()
                },
                received={int(v): (_unb64(b), _unb64(s)) for v, (b, s) in raw["received"].items()},
                told=None
                if told is None
                else Survivors(tuple(map(int, told[0])), tuple(map(int, told[1]))),
                min_sites=int(raw["min_sites"]),
                members=tuple(map(int, raw["members"])),
            )
        except (ValueError, KeyError, TypeError, IndexError) as err:
            if isinstance(err, SecAggError):
                raise
            raise SecAggError(f"saved secagg session is unreadable: {err}") from None
