"""A reusable driver of one SecAgg+ round through both state machines (common/secagg/
site.py and coordinator.py), with hooks to drop sites or tamper with any stage's
messages; the protocol, parameter and site tests share it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import settings
from scipy.stats import chisquare

from common.quantize import (
    RingArray,
    unpack,
)
from common.secagg import shamir
from common.secagg.coordinator import CoordinatorSession
from common.secagg.errors import SecAggError
from common.secagg.params import (
    SecAggParams,
    pack_masked,
)
from common.secagg.roster import Roster
from common.secagg.site import SiteSession
from tests.support.reference import add_mod

FAST = settings(max_examples=25, deadline=None)

# Message stages of one round. A site that "drops" at a site->coordinator stage sends
# nothing at that stage (and, never routed to again, nothing later). A tamper hook
# may be applied to the messages of any stage, in either direction.
KEYS = "keys"  # stage 1, site -> coordinator: its signed Advert
KEYS_ROUTED = "keys_routed"  # coordinator -> site: every accepted Advert, by index
SHARES = "shares"  # stage 2, site -> coordinator: (sealed shares, dealing entries) by receiver
SHARES_ROUTED = "shares_routed"  # coordinator -> site: (sealed shares, entries) by sender
OPENED = "opened"  # stage 3, site -> coordinator: the dealers whose shares it refused
MEMBERS = "members"  # coordinator -> site: the round's sites (before training)
MASKED = "masked"  # stage 5, site -> coordinator: (packed masked input, commitment)
REQUESTS = "requests"  # coordinator -> site: the Survivors to sign
SIGNATURES = "signatures"  # stage 4, site -> coordinator: its signature on the Survivors
SIGNED = "signed"  # coordinator -> site: (Survivors, signatures by signer)
UNMASK = "unmask"  # stage 5, site -> coordinator: (shares per peer, signature)

Hook = Callable[[dict[int, Any]], dict[int, Any]]


# ---- identities --------------------------------------------------------------------------


def identity_keys(sites: Collection[int], seed: int = 0) -> dict[int, Ed25519PrivateKey]:
    """One Ed25519 identity key per site (deterministic: tests compare rounds)."""
    return {
        u: Ed25519PrivateKey.from_private_bytes(
            hashlib.sha256(f"test identity {seed} {u}".encode()).digest()
        )
        for u in sites
    }


def public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def roster_of(keys: Mapping[int, Ed25519PrivateKey]) -> Roster:
    return Roster({f"site-{u}": public(k) for u, k in keys.items()})


# ---- a reusable round driver ------------------------------------------------------------


@dataclass
class Outcome:
    """Everything one round left behind: the result or the error, and every message."""

    params: SecAggParams
    inputs: dict[int, RingArray]
    identities: dict[int, Ed25519PrivateKey]
    roster: Roster
    sessions: dict[int, SiteSession] = field(default_factory=dict)
    coordinator: CoordinatorSession | None = None
    messages: dict[str, dict[int, Any]] = field(default_factory=dict)  # after tampering
    total: RingArray | None = None
    alive: tuple[int, ...] = ()
    error: SecAggError | None = None
    site_errors: dict[int, SecAggError] = field(default_factory=dict)  # site_errors="drop"

    @property
    def co(self) -> CoordinatorSession:
        assert self.coordinator is not None
        return self.coordinator

    @property
    def graph_params(self) -> SecAggParams:
        """The round's parameters with the graph the adverts fixed."""
        return self.co.params if self.coordinator is not None else self.params

    def sign(self, u: int) -> Callable[[bytes], bytes]:
        return self.identities[u].sign

    def plain_sum(self, sites: Collection[int]) -> RingArray:
        """The modular sum of the inputs of ``sites``, computed in the clear."""
        zero = np.zeros(self.params.vector_length, dtype=np.uint64)
        bits = self.params.ring_bits
        return reduce(lambda a, u: add_mod(a, self.inputs[u], bits), sorted(sites), zero)

    def assert_correct(self) -> None:
        assert self.error is None, f"round failed: {self.error!r}"
        assert self.total is not None
        assert self.total.dtype == np.uint64
        assert np.array_equal(self.total, self.plain_sum(self.alive))


class _Stop(Exception):
    """Raised by the driver to pause a round after a given stage."""


def random_inputs(params: SecAggParams, seed: int = 0) -> dict[int, RingArray]:
    rng = np.random.default_rng(seed)
    high = 1 << params.ring_bits
    return {
        u: rng.integers(0, high, params.vector_length, dtype=np.uint64) for u in params.participants
    }


def run_round(
    params: SecAggParams,
    inputs: Mapping[int, RingArray] | None = None,
    *,
    drop: Mapping[str, Collection[int]] | None = None,
    tamper: Mapping[str, Hook] | None = None,
    until: str | None = None,
    site_errors: str = "raise",
    roster: Roster | None = None,
    min_sites: int = 2,
) -> Outcome:
    """One honest round, but for the sites in ``drop[stage]`` (they do not answer that
    stage: KEYS, SHARES, OPENED, MASKED, SIGNATURES or UNMASK) and the hooks in
    ``tamper[stage]`` (applied to the messages of that stage, keyed by sender for
    site->coordinator stages and by receiver for coordinator->site ones). Every site
    holds ``roster`` (default: all participants' identity keys) and requires
    ``min_sites`` authenticated sites. Returns the total and ``alive``, or the first
    SecAggError raised by a site or the coordinator. With ``site_errors="drop"`` a site
    that raises is recorded in ``site_errors`` and just does not answer that stage (what
    a deployment sees). With ``until``, the round stops once that stage's messages are
    sent (the sessions wait for the next stage)."""
    drops = {stage: set(sites) for stage, sites in (drop or {}).items()}
    hooks = dict(tamper or {})
    identities = identity_keys(params.participants)
    out = Outcome(
        params,
        dict(inputs) if inputs is not None else random_inputs(params),
        identities,
        roster if roster is not None else roster_of(identities),
    )

    def send(stage: str, messages: dict[int, Any]) -> dict[int, Any]:
        kept = {u: m for u, m in messages.items() if u not in drops.get(stage, set())}
        if stage in hooks:
            kept = hooks[stage](kept)
        out.messages[stage] = kept
        if stage == until:
            raise _Stop
        return kept

    def answer(routed: dict[int, Any], act: Callable[[int, Any], Any]) -> dict[int, Any]:
        replies = {}
        for u, message in routed.items():
            try:
                replies[u] = act(u, message)
            except SecAggError as err:
                if site_errors == "raise":
                    raise
                out.site_errors[u] = err
        return replies

    def share(u: int, adverts: Any) -> Any:
        session = out.sessions[u]
        session.check_adverts(adverts, out.roster, min_sites=min_sites)
        return session.share_keys(out.sign(u))

    def open_shares(u: int, routed: Any) -> tuple[int, ...]:
        sealed, dealt = routed
        return out.sessions[u].open_shares(sealed, dealt)

    def masked_input(u: int, members: Any) -> tuple[bytes, bytes]:
        session = out.sessions[u]
        session.admit(members)  # before training, at a real site
        masked = session.masked_input(out.inputs[u])
        return pack_masked(masked, session.params), session.commitment

    try:
        adverts = {}
        for u in params.participants:
            out.sessions[u], adverts[u] = SiteSession.start(
                params, u, public(identities[u]), out.sign(u)
            )
        out.coordinator = co = CoordinatorSession(params)
        all_adverts = co.receive_adverts(send(KEYS, adverts))
        routed = send(KEYS_ROUTED, {u: dict(all_adverts) for u in all_adverts})
        shares = answer(routed, share)
        routed = send(SHARES_ROUTED, co.receive_shares(send(SHARES, shares)))
        opened = answer(routed, open_shares)
        members = co.receive_opened(send(OPENED, opened))
        routed = send(MEMBERS, dict.fromkeys(members, members))
        masked = answer(routed, masked_input)
        survivors = co.receive_masked(send(MASKED, masked))
        requests = send(REQUESTS, dict.fromkeys(survivors.alive, survivors))
        sigs = answer(requests, lambda u, m: out.sessions[u].consistency(m, out.sign(u)))
        signatures = co.receive_signatures(send(SIGNATURES, sigs))
        signed = send(SIGNED, {u: (survivors, dict(signatures)) for u in signatures})
        replies = answer(signed, lambda u, m: out.sessions[u].unmask(m[0], m[1], out.sign(u)))
        out.total, out.alive = co.receive_unmask(send(UNMASK, replies))
    except SecAggError as err:
        out.error = err
    except _Stop:
        pass
    return out


def assert_left_out(out: Outcome, dealer: int, holders: Collection[int]) -> None:
    """``dealer``'s shares were refused by ``holders`` (and only they). Each refusal is
    a conflict nobody can settle: a dealer refused by two or more holders is left out
    alone; a single refusal leaves out both the dealer and that holder. Either way
    before anyone trained: the parties left out are named, no member masked with them
    or counts them in the survivor set, they were never admitted (so never masked) nor
    counted alive, no holder kept the dealer's shares and none revealed one."""
    co = out.co
    holders = sorted(holders)
    left = {dealer} if len(holders) >= 2 else {dealer, *holders}
    if len(holders) >= 2:
        assert f"in conflict over dealt shares with sites {holders}" in co.rejected[dealer]
    else:
        why = f"holder {holders[0]} refused the shares dealer {dealer} dealt it"
        assert why in co.rejected[dealer] and why in co.rejected[holders[0]]
    assert all("left out before training" in co.rejected[u] for u in left)
    assert co.reports[dealer] == holders
    members = tuple(sorted(co.members))
    assert not left & set(members)
    assert out.messages[MEMBERS] == dict.fromkeys(members, members)
    for u in members:
        assert not left & set(out.sessions[u].members)
    for u in left:
        assert out.sessions[u].stage == "opened"  # never admitted: it did not mask
        assert u not in co.alive
    for u in holders:
        assert dealer in out.messages[OPENED][u]
        assert dealer not in out.sessions[u].received
    if co.survivors is not None:
        assert not left & set(co.survivors.alive + co.survivors.dropped)
    for shares, _ in out.messages.get(UNMASK, {}).values():
        assert dealer not in shares


def make_params(n: int, *, k: int = 16, length: int = 64, **kwargs: Any) -> SecAggParams:
    return SecAggParams.create(range(1, n + 1), ring_bits=k, vector_length=length, **kwargs)


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def lagrange_at_zero(xs: Collection[int], x: int) -> int:
    """Holder ``x``'s Lagrange coefficient at 0 among ``xs``: the secret is
    sum(lambda_x * y_x) over any threshold-sized set of shares."""
    p = shamir.PRIME
    num, den = 1, 1
    for other in xs:
        if other != x:
            num = num * (-other) % p
            den = den * (x - other) % p
    return num * pow(den, -1, p) % p


def chi_square_top_bits(values: RingArray, ring_bits: int, top_bits: int = 6) -> float:
    """p-value of the chi-square test that the top bits of ``values`` are uniform."""
    buckets = (values >> np.uint64(ring_bits - top_bits)).astype(np.int64)
    counts = np.bincount(buckets, minlength=1 << top_bits)
    return float(chisquare(counts).pvalue)


def unpack_masked(out: Outcome, site: int) -> RingArray:
    """What the coordinator received from ``site`` in the masked-input stage."""
    return unpack(out.messages[MASKED][site][0], out.params.ring_bits, out.params.vector_length)
