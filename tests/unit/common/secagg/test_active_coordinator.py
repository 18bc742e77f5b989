"""The attacks of an active coordinator on secure aggregation (issue 13), each played
against the real state machines and refused:

a. key substitution: the coordinator hands a site adverts of keys it made itself, adds
   a site of its own, lists one identity twice, or routes fewer sites than a site
   requires; the site refuses while checking the adverts, before it has drawn a seed,
   sealed a share or touched its data;
b. inconsistent unmask requests: with colluding sites, it tells some holders a victim is
   alive and others that it dropped; the consistency round and the active threshold
   leave it short of one of the victim's two secrets whenever the colluders number at
   most ``params.tolerated`` (capped at t - 2: with t - 1 colluders, the victim and
   they alone would make a survivor set of t sites whose sum gives the victim away);
c. a partition by dropouts at a low degree: a survivor set whose alive sites fall into
   pieces is signed by no site, and the coordinator's own rules abort first;
d. a lying share: a holder that reveals a share its dealer did not deal is named (and
   only it) and the round completes whenever enough verified shares remain; a dealer
   whose signed dealing record does not match the share it sealed is reported by the
   holder before any site trains. Nobody can settle such a refusal, so it is a
   conflict: a site in two or more is left out alone, the two sites of a lone conflict
   are both left out, and the round completes without them (a coordinator damaging an
   honest dealer's share gets that dealer and its holder left out, and nothing else);
d'. the round's sites: a site trains only for a final set of sites that is well formed,
   includes it, holds only dealers whose shares it accepted, meets its own minimum and
   leaves every site t holders; and it signs no survivor set below that minimum;
e. a forged consistency round: without ``t`` genuine signatures on the set it signed, a
   site reveals nothing;
f. the graph is not the coordinator's to choose: it is seeded by the sites' signed
   fresh keys;
g. colluders bridging a cut: a survivor set whose honest sites the tolerated colluders
   could cut apart is signed by no site, and the coordinator's own rules abort first;
h. refusals as conflicts (review A1): one malicious site refusing honest dealers'
   shares removes itself and at most one honest site, never a round.
"""

from __future__ import annotations

import copy
import itertools
import os
import random
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.quantize import RingArray, unpack
from common.secagg import crypto, shamir
from common.secagg.errors import SecAggAbort, SecAggError
from common.secagg.params import (
    INDEX_BYTES,
    Advert,
    PublicKeys,
    SecAggParams,
    Survivors,
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
from common.secagg.site import SiteSession
from tests.unit.common.secagg.rounds import (
    KEYS,
    KEYS_ROUTED,
    MASKED,
    MEMBERS,
    OPENED,
    REQUESTS,
    SHARES,
    SHARES_ROUTED,
    SIGNED,
    UNMASK,
    Outcome,
    assert_left_out,
    flip,
    identity_keys,
    make_params,
    public,
    random_inputs,
    roster_of,
    run_round,
)

# ---- a. authenticated participation ---------------------------------------------------


@dataclass
class ForgedSite:
    """Keys the coordinator makes for a site it impersonates: an identity of its own (or
    a claimed one it cannot sign for) and fresh X25519 pairs, in a signed advert."""

    advert: Advert
    signer: Ed25519PrivateKey
    c: crypto.KeyPair
    s: crypto.KeyPair

    @classmethod
    def make(cls, params: SecAggParams, index: int, claimed: bytes | None = None) -> ForgedSite:
        signer = Ed25519PrivateKey.generate()
        c, s = crypto.generate_keypair(), crypto.generate_keypair()
        identity = public(signer) if claimed is None else claimed
        keys = PublicKeys(c.public, s.public)
        return cls(Advert.make(params, index, identity, keys, signer.sign), signer, c, s)


VICTIM = 1


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        ("its own", "site 2's identity key is not on this site's roster"),
        ("the neighbour's", r"site 2's advert \(site-2\) does not verify under its key"),
    ],
)
def test_a_substituted_neighbour_advert_is_refused_before_the_victim_shares(
    identity: str, message: str
) -> None:
    # Attack: the coordinator replaces, in the victim's view only, its neighbour 2's
    # advert by keys it generated itself, signed with a key it holds (not on the roster)
    # or claiming site 2's identity (which it cannot sign for). Unauthenticated, the
    # victim would seal its shares of b and s to the coordinator (see the next test).
    params = make_params(5)
    site_2 = public(identity_keys(params.participants)[2])

    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        claimed = site_2 if identity == "the neighbour's" else None
        forged = ForgedSite.make(params, 2, claimed).advert
        routed[VICTIM] = {**routed[VICTIM], 2: forged}
        return routed

    # Execute
    out = run_round(params, tamper={KEYS_ROUTED: hook}, site_errors="drop")

    # Assert: the victim refused while checking the adverts and dealt nothing; the
    # others (4 = t holders each) complete the round without it.
    assert set(out.site_errors) == {VICTIM}
    assert not isinstance(out.site_errors[VICTIM], SecAggAbort)
    assert re.search(message, str(out.site_errors[VICTIM]))
    victim = out.sessions[VICTIM]
    assert victim.stage == "advertised"
    assert victim.b_seed == b"" and not victim.received and not victim.adverts
    assert VICTIM not in out.messages[SHARES]
    assert out.alive == (2, 3, 4, 5)
    out.assert_correct()


def test_without_the_roster_check_key_substitution_recovers_the_victims_input() -> None:
    # The attack the roster check stops, played to the end: the coordinator answers the
    # victim's advert with four of its own (one per peer). The victim refuses them; a
    # site that took them on the coordinator's word (as before issue 13: the check is
    # bypassed here by setting its state by hand) seals its shares of b and s to the
    # coordinator, which then strips every mask from the victim's masked input.
    params = make_params(5)
    key = identity_keys(params.participants)[VICTIM]
    victim, own = SiteSession.start(params, VICTIM, public(key), key.sign)
    forged = {v: ForgedSite.make(params, v) for v in params.participants if v != VICTIM}
    adverts = {VICTIM: own, **{v: f.advert for v, f in forged.items()}}
    roster = roster_of(identity_keys(params.participants))

    # The defence.
    with pytest.raises(SecAggError, match="site 2's identity key is not on this site's roster"):
        victim.check_adverts(adverts, roster, min_sites=5)
    assert victim.stage == "advertised" and victim.b_seed == b""

    # The attack, had the adverts been taken on trust.
    graph = params.with_graph(graph_seed(params, adverts))
    victim.params, victim.adverts, victim.stage = graph, dict(adverts), "checked"
    sealed, _ = victim.share_keys(key.sign)
    sealed_in, dealt_in = {}, {}
    for v, f in forged.items():  # the forged sites deal to the victim, so it goes on
        fake = SiteSession(graph, v, "checked", f.c.private, f.s.private, f.advert.identity)
        fake.adverts = dict(adverts)
        their_sealed, their_dealt = fake.share_keys(f.signer.sign)
        sealed_in[v], dealt_in[v] = their_sealed[VICTIM], their_dealt[VICTIM]
    x = random_inputs(params, seed=5)[VICTIM]
    assert victim.open_shares(sealed_in, dealt_in) == ()  # the forged dealings check out
    victim.admit(params.participants)
    y = victim.masked_input(x)
    b_shares = {}
    for v, f in forged.items():  # every share the victim sealed opens to the coordinator
        seal_key = crypto.agree(f.c.private, own.keys.c, info=pair_info(graph, VICTIM, v, "seal"))
        plain = crypto.open_sealed(seal_key, sealed[v], associated_data=share_ad(graph, VICTIM, v))
        b_shares[v] = plain[2 * INDEX_BYTES : 2 * INDEX_BYTES + shamir.SHARE_BYTES]
    b_seed = shamir.combine(b_shares, threshold=graph.threshold)
    recovered = y - crypto.expand_mask(b_seed, params.vector_length, params.ring_bits)
    for v, f in forged.items():  # the pairwise masks are agreed with its own s keys
        recovered = recovered - pair_mask(graph, f.s.private, own.keys.s, VICTIM, v)
    recovered = recovered & ring_mask(params.ring_bits)

    assert np.array_equal(recovered, x)


def test_a_site_the_coordinator_adds_of_its_own_is_refused() -> None:
    # Attack: a federation of five (the roster); the coordinator, which also registers
    # the nodes, runs a sixth participant under a key of its own.
    params = make_params(6)
    roster = roster_of({u: k for u, k in identity_keys(params.participants).items() if u != 6})

    # Execute
    out = run_round(params, roster=roster, site_errors="drop")

    # Assert: every genuine site refuses the round before sharing anything.
    for u in range(1, 6):
        assert "site 6's identity key is not on this site's roster" in str(out.site_errors[u])
        assert out.sessions[u].stage == "advertised"
    assert out.messages[SHARES] == {}
    assert isinstance(out.error, SecAggAbort)
    assert out.total is None


def test_one_roster_identity_at_two_indices_is_refused() -> None:
    # Attack: site 2's identity key (a colluding site's, or one the coordinator stole)
    # also signs an advert for index 4, so the coordinator counts one site twice (which
    # would take two of a victim's holders with one key).
    params = make_params(5)
    two = identity_keys(params.participants)[2]

    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        sybil = ForgedSite.make(params, 4)
        twice = Advert.make(params, 4, public(two), sybil.advert.keys, two.sign)
        return {u: {**adverts, 4: twice} for u, adverts in routed.items()}

    # Execute
    out = run_round(params, tamper={KEYS_ROUTED: hook}, site_errors="drop")

    # Assert
    for u in (1, 2, 3, 5):
        assert "site-2 appears as both site 2 and 4" in str(out.site_errors[u])
        assert out.sessions[u].stage == "advertised"
    assert "did not return this site's own advert" in str(out.site_errors[4])
    assert out.messages[SHARES] == {}


@pytest.mark.parametrize("min_sites", [5, 4])
def test_a_site_refuses_a_round_with_fewer_authenticated_sites_than_it_requires(
    min_sites: int,
) -> None:
    # Prepare: site 5's advert is not routed (lost, or held back by the coordinator):
    # four authenticated sites remain, enough for t = 4 but not for a site that requires
    # five.
    params = make_params(5)

    # Execute
    out = run_round(params, drop={KEYS: {5}}, min_sites=min_sites, site_errors="drop")

    # Assert: it learns this before it has drawn a seed or touched its data.
    if min_sites == 5:
        for u in range(1, 5):
            error = out.site_errors[u]
            assert isinstance(error, SecAggAbort)
            assert "only 4 authenticated sites in the round, this site requires at least 5" in str(
                error
            )
            assert out.sessions[u].stage == "advertised" and out.sessions[u].b_seed == b""
        assert out.messages[SHARES] == {}
        assert out.total is None
    else:
        assert not out.site_errors
        assert out.alive == (1, 2, 3, 4)
        out.assert_correct()


def test_a_site_refuses_a_survivor_set_with_fewer_alive_sites_than_it_requires() -> None:
    # Attack (review F3): a site requires 5 sites in any sum it joins, t is 4. Its
    # minimum was checked on the adverts only, so the coordinator could ignore one
    # masked input and unmask a sum of 4. Now a site checks max(t, its minimum) on the
    # survivor set too (the coordinator does not know the site's minimum: its own rule,
    # 4 >= t, lets the set through).
    out = run_round(make_params(5), drop={MASKED: {5}}, min_sites=5, until=REQUESTS)
    assert out.co.params.threshold == 4
    survivors = out.co.survivors
    assert survivors == Survivors(alive=(1, 2, 3, 4), dropped=(5,))

    # Execute / Assert: every alive site refuses to sign, so nothing is revealed.
    for u in survivors.alive:
        with pytest.raises(SecAggAbort) as caught:
            out.sessions[u].consistency(survivors, out.sign(u))
        assert (
            "only 4 masked inputs; this site requires at least 5 (threshold 4, its own "
            "minimum 5)" in str(caught.value)
        )
        assert out.sessions[u].stage == "masked" and out.sessions[u].told is None

    # A site requiring 4 signs that very set; the round completes.
    again = run_round(make_params(5), drop={MASKED: {5}}, min_sites=4)
    assert again.alive == (1, 2, 3, 4)
    again.assert_correct()


# ---- b. inconsistent unmask requests ----------------------------------------------------


@dataclass
class Split:
    """What an inconsistent unmask round left the coordinator with, of the victim."""

    b_shares: dict[int, bytes] = field(default_factory=dict)
    s_shares: dict[int, bytes] = field(default_factory=dict)
    refused: dict[int, SecAggError] = field(default_factory=dict)


def inconsistent_unmask(
    out: Outcome,
    sessions: Mapping[int, SiteSession],
    victim: int,
    told_dropped: Collection[int],
    colluders: Collection[int],
) -> Split:
    """The coordinator tells the honest sites in ``told_dropped`` that ``victim``
    dropped, every other honest site (the victim among them) that all are alive. The
    ``colluders`` sign both sets (with their identity keys) and hand over both of their
    shares of the victim. The coordinator forwards to each honest site every signature
    on the set it was told, and collects what the honest sites reveal. ``sessions`` wait
    for the survivor set (stage 'masked')."""
    params = out.co.params
    everyone = params.participants
    alive = Survivors(alive=everyone, dropped=())
    dropped = Survivors(alive=tuple(v for v in everyone if v != victim), dropped=(victim,))
    honest = [u for u in everyone if u not in colluders]
    told = {u: dropped if u in told_dropped else alive for u in honest}
    signatures: dict[Survivors, dict[int, bytes]] = {alive: {}, dropped: {}}
    for u in honest:
        signatures[told[u]][u] = sessions[u].consistency(told[u], out.sign(u))
    split = Split()
    for c in colluders:
        for survivors, signed in signatures.items():
            signed[c] = out.sign(c)(survivors_message(params, survivors))
        split.b_shares[c], split.s_shares[c] = sessions[c].received[victim]
    for u in honest:
        try:
            shares, _ = sessions[u].unmask(told[u], signatures[told[u]], out.sign(u))
        except SecAggAbort as err:
            split.refused[u] = err
            continue
        (split.s_shares if told[u] is dropped else split.b_shares)[u] = shares[victim]
    return split


def fresh(out: Outcome) -> dict[int, SiteSession]:
    """Copies of a paused round's sessions (each signs and unmasks only once)."""
    return {u: copy.deepcopy(s) for u, s in out.sessions.items()}


def test_inconsistent_unmask_with_one_colluder_is_refused() -> None:
    # Attack (issue 13, item 2): five sites, site 5 colludes. The coordinator tells the
    # victim and site 2 that all are alive and sites 3 and 4 that the victim dropped:
    # b shares from {1, 2, 5} and s shares from {3, 4, 5}, enough at the old threshold
    # of 3 to strip every mask from the victim's input.
    out = run_round(make_params(5), until=REQUESTS)
    params = out.co.params
    assert (params.threshold, params.tolerated) == (4, 2)

    # Execute
    split = inconsistent_unmask(out, out.sessions, victim=1, told_dropped={3, 4}, colluders={5})

    # Assert: each honest site sees 3 < t = 4 signatures on the set it signed (its own,
    # its group's and the colluder's), so none reveals anything.
    assert set(split.refused) == {1, 2, 3, 4}
    for u, err in split.refused.items():
        assert "only 3 of this site's holders signed the survivor set it was told" in str(err)
        assert out.sessions[u].stage == "signed"
    assert set(split.b_shares) == set(split.s_shares) == {5}


@pytest.mark.parametrize("told_dropped", [{4}, {3, 4}, {2, 3, 4}, {1, 2, 3, 4}])
def test_a_lying_coordinator_without_colluders_rebuilds_at_most_one_secret(
    told_dropped: set[int],
) -> None:
    # Prepare: site 5 sent its masked input; the coordinator tells some holders it is
    # alive (b_5 shares) and the others that it dropped (s_5 shares).
    out = run_round(make_params(5), until=REQUESTS)
    t = out.co.params.threshold

    # Execute
    split = inconsistent_unmask(out, out.sessions, 5, told_dropped, colluders=())

    # Assert: only a group of t sites that signed the same set reveals, and the shares
    # revealed are the real ones.
    assert len(split.b_shares) < t or len(split.s_shares) < t
    if len(split.b_shares) >= t:
        assert shamir.combine(split.b_shares, threshold=t) == out.sessions[5].b_seed
    if len(split.s_shares) >= t:
        assert shamir.combine(split.s_shares, threshold=t) == out.sessions[5].s_private
    for u in split.refused:
        group = told_dropped if u in told_dropped else set(range(1, 6)) - told_dropped
        assert len(group) < t, f"site {u} refused although {len(group)} signed its set"


@pytest.mark.parametrize("n", [5, 7])
def test_with_the_tolerated_colluders_no_split_of_the_honest_holders_works(n: int) -> None:
    # Attack: c = params.tolerated colluding sites (2 of 5, t = 4; 2 of 7, t = 5), every
    # choice of them and every split of the other honest holders between "the victim is
    # alive" and "the victim dropped" (a holder told nothing would only take shares
    # away). Each group needs t signatures on its own set and t shares, the colluders
    # counting in both: 2t - c > n leaves one group short.
    out = run_round(make_params(n), until=REQUESTS)
    params = out.co.params
    t, c = params.threshold, params.tolerated
    assert c == 2 and 2 * t - c > n
    victim = 1
    others = [u for u in params.participants if u != victim]
    cases, got_b, got_s = 0, 0, 0

    # Execute / Assert
    for colluders in itertools.combinations(others, c):
        honest = [u for u in others if u not in colluders]
        for k in range(len(honest) + 1):
            for told_dropped in itertools.combinations(honest, k):
                split = inconsistent_unmask(out, fresh(out), victim, told_dropped, colluders)
                cases += 1
                assert len(split.b_shares) < t or len(split.s_shares) < t, (
                    f"colluders {colluders}, told dropped {told_dropped}: both secrets"
                )
                got_b += len(split.b_shares) >= t
                got_s += len(split.s_shares) >= t
    assert cases == len(list(itertools.combinations(others, c))) * 2 ** (n - 1 - c)
    # Not vacuous: a split that tells (almost) everyone one story gets that secret.
    assert got_b > 0 and got_s > 0


def test_one_colluder_more_than_tolerated_gets_the_victims_input() -> None:
    # The bound is tight (so the harness above would see a break): with c + 1 = 3
    # colluders of 5, the coordinator tells the victim all are alive and site 2 that
    # the victim dropped; each of them sees 1 + 3 = 4 = t signatures on its set and
    # reveals, and the coordinator strips every mask from the victim's masked input.
    out = run_round(make_params(5), until=REQUESTS)
    params = out.co.params
    t, victim = params.threshold, 1
    assert params.tolerated + 1 == 3

    # Execute
    split = inconsistent_unmask(out, out.sessions, victim, told_dropped={2}, colluders={3, 4, 5})

    # Assert
    assert not split.refused
    b_seed = shamir.combine(split.b_shares, threshold=t)
    s_private = shamir.combine(split.s_shares, threshold=t)
    x: RingArray = unpack(out.messages[MASKED][victim][0], params.ring_bits, params.vector_length)
    x = x - crypto.expand_mask(b_seed, params.vector_length, params.ring_bits)
    for v in params.neighbours(victim):
        x = x - pair_mask(params, s_private, out.co.adverts[v].keys.s, victim, v)
    assert np.array_equal(x & ring_mask(params.ring_bits), out.inputs[victim])


@pytest.mark.parametrize(("n", "degree"), [(3, 2), (8, 2)])
def test_over_the_cap_the_victim_and_t_minus_1_colluders_alone_give_its_input_away(
    n: int, degree: int
) -> None:
    # Why tolerated colluders are capped at t - 2: here t = holders = 3, where the
    # split attack alone would tolerate 2t - holders - 1 = 2. With 2 = t - 1 colluders
    # (the victim's two neighbours), the coordinator keeps only the victim and them
    # alive (of 3 sites, every site; of 8 on a ring, it ignores 5 honest masked
    # inputs): t sites, one piece, t signing holders of the victim, so every check
    # passes, and the sum of the alive inputs less the colluders' own is the victim's.
    out = run_round(make_params(n, degree=degree), until=REQUESTS)
    params = out.co.params
    t, victim = params.threshold, VICTIM
    assert (t, params.degree + 1, params.tolerated) == (3, 3, 1)
    assert 2 * t - (params.degree + 1) - 1 == 2 > params.tolerated
    colluders = params.neighbours(victim)
    alive = tuple(sorted((victim, *colluders)))
    dropped = tuple(u for u in params.participants if u not in alive)
    forged = Survivors(alive=alive, dropped=dropped)
    sessions = fresh(out)

    if n == 8:
        # On the ring the victim refuses such a set anyway: one colluder (the tolerated
        # number) in the middle of three alive sites could cut them apart.
        with pytest.raises(SecAggAbort, match="could cut the alive sites' neighbour graph"):
            sessions[victim].consistency(forged, out.sign(victim))
        return

    # Execute: the victim (and the colluders) sign; with t signatures the victim
    # reveals its b share; the coordinator unmasks the sum of the alive inputs.
    signatures = {u: sessions[u].consistency(forged, out.sign(u)) for u in alive}
    shares, _ = sessions[victim].unmask(forged, signatures, out.sign(victim))
    b_shares = {victim: shares[victim]} | {c: sessions[c].received[victim][0] for c in colluders}
    seeds = {victim: shamir.combine(b_shares, threshold=t)}
    seeds |= {c: sessions[c].b_seed for c in colluders}
    total = np.zeros(params.vector_length, dtype=np.uint64)
    for u in alive:
        total = total + unpack(out.messages[MASKED][u][0], params.ring_bits, params.vector_length)
        total = total - crypto.expand_mask(seeds[u], params.vector_length, params.ring_bits)
    for c in colluders:  # their masks with the ignored sites, from their own s keys
        for w in set(params.neighbours(c)) & set(dropped):
            pair = pair_mask(params, sessions[c].s_private, out.co.adverts[w].keys.s, c, w)
            total = total - pair if c < w else total + pair
    total = total & ring_mask(params.ring_bits)

    # Assert
    assert seeds[victim] == out.sessions[victim].b_seed
    assert np.array_equal(total, out.plain_sum(alive))
    x = total
    for c in colluders:
        x = x - out.inputs[c]
    assert np.array_equal(x & ring_mask(params.ring_bits), out.inputs[victim])

    # With the cap respected (one colluder), the victim and its colluder alone are
    # fewer than t: the victim refuses that set, and any set of t it signs holds
    # another honest site's input.
    assert t - (params.tolerated + 1) >= 1
    capped = Survivors(
        alive=tuple(sorted((victim, colluders[0]))),
        dropped=tuple(u for u in params.participants if u not in (victim, colluders[0])),
    )
    with pytest.raises(SecAggAbort, match="only 2 masked inputs; this site requires at least 3"):
        fresh(out)[victim].consistency(capped, out.sign(victim))


# ---- c. a partition by dropouts at a low degree -------------------------------------------


def ring_order(params: SecAggParams) -> list[int]:
    """The permutation the neighbour graph is laid out on (``params.neighbours``): drawn
    from the graph seed, known once the adverts are in."""
    order = list(params.participants)
    random.Random(bytes.fromhex(params.graph)).shuffle(order)
    return order


def cut(params: SecAggParams) -> set[int]:
    """Two runs of degree / 2 sites, half the ring apart: without them the alive sites
    fall into two arcs whose masks cancel on their own."""
    order, half = ring_order(params), params.degree // 2
    at = len(order) // 2
    return set(order[:half]) | set(order[at : at + half])


@pytest.mark.parametrize(("n", "degree"), [(8, 2), (11, 4)])
def test_the_ring_order_is_the_graphs(n: int, degree: int) -> None:
    # Prepare
    out = run_round(make_params(n, degree=degree), until=KEYS_ROUTED)
    params = out.co.params

    # Execute
    order = ring_order(params)

    # Assert
    for i, u in enumerate(order):
        near = {order[(i + d) % n] for d in range(-degree // 2, degree // 2 + 1) if d}
        assert set(params.neighbours(u)) == near
    assert params.pieces(set(order) - cut(params)) == 2


@pytest.mark.parametrize(("n", "degree"), [(8, 2), (11, 4)])
def test_dropouts_that_cut_the_neighbour_graph_abort_before_any_share_is_revealed(
    n: int, degree: int
) -> None:
    # Attack (issue 13, item 3): at a low degree, dropouts (an active coordinator causes
    # them by ignoring replies) cut the ring into two arcs whose masks cancel on their
    # own; with one colluder in an arc of two, the victim's update was recovered. The
    # coordinator learns the graph only from the adverts, so it picks the cut then.
    # A cut needs degree / 2 consecutive sites gone, which leaves the site next to them
    # degree / 2 + 1 < t live holders: with t > 2/3 of the holders the coordinator's
    # holder rule aborts before its pieces check is reached (that check, and each
    # site's own, below, guard against a coordinator that skips the rule).
    out = run_round(make_params(n, degree=degree), until=MASKED)
    params = out.co.params
    gone = cut(params)
    assert params.pieces(set(params.participants) - gone) == 2

    # Execute
    with pytest.raises(SecAggAbort, match="after masked input") as caught:
        out.co.receive_masked({u: m for u, m in out.messages[MASKED].items() if u not in gone})

    # Assert: no survivor set was sent, no site signed or revealed anything.
    assert f"live holders of its secrets, fewer than the threshold {params.threshold}" in str(
        caught.value
    )
    assert out.co.survivors is None
    assert {s.stage for s in out.sessions.values()} == {"masked"}


@pytest.mark.parametrize(("n", "degree"), [(8, 2), (11, 4)])
def test_no_site_signs_a_survivor_set_whose_alive_sites_fall_apart(n: int, degree: int) -> None:
    # Attack: the coordinator is the party guarded against, so it skips its own checks
    # and asks the sites to sign a survivor set that cuts the graph in two.
    out = run_round(make_params(n, degree=degree), until=REQUESTS)
    params = out.co.params
    gone = cut(params)
    alive = tuple(sorted(set(params.participants) - gone))
    forged = Survivors(alive=alive, dropped=tuple(sorted(gone)))
    assert len(alive) >= params.threshold

    # Execute / Assert: each alive site refuses to sign it.
    for u in alive:
        with pytest.raises(SecAggAbort, match="falls into 2 pieces"):
            out.sessions[u].consistency(forged, out.sign(u))
        assert out.sessions[u].stage == "masked"


# ---- d. a lying share -------------------------------------------------------------------


def honest_replies(out: Outcome, holders: Collection[int] | None = None) -> dict[int, Any]:
    """The unmask replies of a round paused at SIGNED (of ``holders``, default all)."""
    return {
        u: out.sessions[u].unmask(survivors, signatures, out.sign(u))
        for u, (survivors, signatures) in out.messages[SIGNED].items()
        if holders is None or u in holders
    }


def lie(out: Outcome, replies: dict[int, Any], liar: int, about: int) -> None:
    """``liar`` flips a byte of the share of ``about`` it reveals and signs its reply
    with its own key, as a malicious site can."""
    shares, _ = replies[liar]
    forged = {**shares, about: flip(shares[about], -1)}
    replies[liar] = (forged, out.sign(liar)(reveal_message(out.co.params, liar, forged)))


def finish(out: Outcome, replies: Mapping[int, Any]) -> None:
    try:
        out.total, out.alive = out.co.receive_unmask(replies)
    except SecAggError as err:
        out.error = err


@pytest.mark.parametrize(
    ("n", "masked", "liars", "about"),
    [
        (5, (), (3,), 1),  # a b share, 4 = t honest shares left
        (7, (2,), (4,), 1),  # a b share with a dropout, 5 = t left
        (7, (2,), (4,), 2),  # the dropped site's s share, 5 = t left
        (7, (), (3, 6), 1),  # two liars, 5 = t left
    ],
)
def test_a_lying_holder_is_named_and_the_round_completes(
    n: int, masked: tuple[int, ...], liars: tuple[int, ...], about: int
) -> None:
    # Attack (issue 13, item 4): one malicious site aborted every secure round, after
    # every site had trained, by flipping one byte of one revealed share, and the error
    # blamed an honest holder. Now every share is bound by its dealer's signed record.
    out = run_round(make_params(n), drop={MASKED: masked}, until=SIGNED)
    replies = honest_replies(out)
    for liar in liars:
        lie(out, replies, liar, about)

    # Execute
    finish(out, replies)

    # Assert: the liars, and only they, are named; the sum is exact.
    assert set(out.co.rejected) == set(liars)
    for liar in liars:
        reason = out.co.rejected[liar]
        assert f"revealed a share of site {about} that site {about} did not deal it" in reason
    assert out.alive == tuple(u for u in range(1, n + 1) if u not in masked)
    out.assert_correct()


@pytest.mark.parametrize(
    ("n", "masked", "answering"),
    [
        (5, (2,), None),  # 4 alive holders, one lies: 3 < t = 4 left
        (7, (), (1, 2, 3, 4, 5)),  # exactly t = 5 answer, one lies
    ],
)
def test_a_lying_holder_with_too_few_honest_shares_left_aborts_naming_it(
    n: int, masked: tuple[int, ...], answering: tuple[int, ...] | None
) -> None:
    # Prepare: site 3 lies about site 1's b share; the other verified shares number
    # t - 1, so site 1's self mask cannot be removed.
    out = run_round(make_params(n), drop={MASKED: masked}, until=SIGNED)
    t = out.co.params.threshold
    replies = honest_replies(out, answering)
    lie(out, replies, 3, 1)

    # Execute
    finish(out, replies)

    # Assert
    assert isinstance(out.error, SecAggAbort)
    assert f"only {t - 1} verified shares of site 1's self-mask seed, need {t}" in str(out.error)
    assert "(sites [3] revealed bad shares)" in str(out.error)
    assert set(out.co.rejected) == {3}
    assert out.total is None


def deal_unlike_signed(
    monkeypatch: pytest.MonkeyPatch, dealer: int, holders: Collection[int] | None = None
) -> None:
    """Makes site ``dealer`` sign, for each of ``holders`` (default: all but itself), a
    dealing entry whose b hash is of a share it did not seal: the entry verifies under
    its key, so the coordinator cannot tell; only the holder, opening the share, can."""
    real = SiteSession.share_keys

    def share_keys(site: SiteSession, sign: Any) -> tuple[dict[int, bytes], dict[int, bytes]]:
        sealed, dealt = real(site, sign)
        if site.index == dealer:
            for v in dealt:
                if v != dealer and (holders is None or v in holders):
                    other = share_hash(site.params, dealer, v, "b", os.urandom(shamir.SHARE_BYTES))
                    hashes = other + dealt[v][32:64]
                    dealt[v] = hashes + sign(deal_message(site.params, dealer, v, hashes))
        return sealed, dealt

    monkeypatch.setattr(SiteSession, "share_keys", share_keys)


def record_training(monkeypatch: pytest.MonkeyPatch) -> dict[int, tuple[int, ...]]:
    """Which sites masked (trained for) an input, and with which round's sites."""
    trained: dict[int, tuple[int, ...]] = {}
    real = SiteSession.masked_input

    def masked_input(site: SiteSession, encoded: RingArray) -> RingArray:
        trained[site.index] = site.members
        return real(site, encoded)

    monkeypatch.setattr(SiteSession, "masked_input", masked_input)
    return trained


@pytest.mark.parametrize("who", ["the dealer", "the coordinator"])
def test_a_dealt_share_not_matching_its_signed_entry_leaves_the_dealer_out_before_training(
    who: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack: the dealer (site 2) signs a dealing entry for holder 3 that does not match
    # the share it sealed (so a later, honest reveal would look like a lie by holder 3),
    # or the coordinator alters the entry in transit. Holder 3 checks the share it
    # opened against the entry and names the dealer; only it can tell (it cannot tell
    # which of the two cheated), and nobody can tell whether it told the truth.
    def alter(routed: dict[int, Any]) -> dict[int, Any]:
        blobs, entries = routed[3]
        routed[3] = (blobs, {**entries, 2: flip(entries[2], 0)})
        return routed

    if who == "the dealer":
        deal_unlike_signed(monkeypatch, dealer=2, holders={3})
    trained = record_training(monkeypatch)

    # Execute (n = 7, t = 5)
    tamper = {SHARES_ROUTED: alter} if who == "the coordinator" else {}
    out = run_round(make_params(7), tamper=tamper, site_errors="drop")

    # Assert: the coordinator took the entry (it verifies, or was altered past its
    # check); holder 3 refused it without raising; site 2 and site 3, in one conflict
    # nobody can settle, were both left out before any site trained, and the other
    # five (5 = t holders each) sum exactly.
    assert 2 in out.co.shared
    assert not out.site_errors
    assert out.messages[OPENED] == {1: (), 2: (), 3: (2,), 4: (), 5: (), 6: (), 7: ()}
    assert set(out.co.rejected) == {2, 3}
    assert_left_out(out, 2, {3})
    assert trained == dict.fromkeys((1, 4, 5, 6, 7), (1, 4, 5, 6, 7))
    assert out.alive == (1, 4, 5, 6, 7)
    out.assert_correct()


@pytest.mark.parametrize("n", [5, 10])
def test_one_dealer_sealing_shares_unlike_its_signed_entries_cannot_abort_the_round_after_training(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack (review finding): one malicious site aborted the round after every site
    # had trained, by sealing to every holder shares that do not match the dealing
    # entries it signed (the coordinator cannot see the shares, the holders raised only
    # when they masked). Now every holder reports it before training; the coordinator
    # leaves it out, and the round completes without it.
    deal_unlike_signed(monkeypatch, dealer=2)
    trained = record_training(monkeypatch)
    paused = run_round(make_params(n), until=MEMBERS)
    holders = set(paused.co.params.neighbours(2))

    # Assert: when the round's sites go out, no site has trained (each waits at
    # 'opened') and the dealer is already left out.
    assert {s.stage for s in paused.sessions.values()} == {"opened"}
    assert not trained
    assert 2 not in paused.co.members
    assert paused.co.reports[2] == sorted(holders)

    # Execute
    out = run_round(make_params(n))

    # Assert
    rest = tuple(u for u in range(1, n + 1) if u != 2)
    assert set(out.co.rejected) == {2}
    assert_left_out(out, 2, holders)
    assert trained == dict.fromkeys(rest, rest)
    assert out.alive == rest
    out.assert_correct()


def test_a_coordinator_tampering_a_routed_share_only_denies_the_dealer_and_its_holder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Attack: the coordinator damages honest site 1's sealed share for honest site 3.
    # Holder 3 cannot tell the coordinator from the dealer, and the coordinator cannot
    # tell whether holder 3 lied, so both are left out: a denial of service the
    # coordinator can always do (it can drop any site's messages), but neither trains
    # or sends a masked input, no site masks with them, and none of site 1's secrets'
    # shares is revealed.
    trained = record_training(monkeypatch)

    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        blobs, entries = routed[3]
        routed[3] = ({**blobs, 1: flip(blobs[1], 30)}, entries)
        return routed

    # Execute (n = 7, t = 5)
    out = run_round(make_params(7), tamper={SHARES_ROUTED: hook})

    # Assert
    assert_left_out(out, 1, {3})
    assert set(out.co.rejected) == {1, 3}
    for u in (1, 3):
        assert u not in trained and u not in out.messages[MASKED]
        assert out.sessions[u].b_seed and out.sessions[u].stage == "opened"
    assert all(1 not in shares for shares, _ in out.messages[UNMASK].values())
    assert out.alive == (2, 4, 5, 6, 7)
    out.assert_correct()


# ---- d'. the round's sites, admitted before training --------------------------------


def withhold(receiver: int, dealer: int, how: str) -> Any:
    """A SHARES_ROUTED hook: ``dealer``'s share for ``receiver`` is damaged ("refused")
    or not routed at all ("never received", entry and all)."""

    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        blobs, entries = routed[receiver]
        if how == "refused":
            blobs = {**blobs, dealer: flip(blobs[dealer], 20)}
        else:
            blobs = {u: b for u, b in blobs.items() if u != dealer}
            entries = {u: e for u, e in entries.items() if u != dealer}
        routed[receiver] = (blobs, entries)
        return routed

    return hook


@pytest.mark.parametrize(
    ("members", "how", "min_sites", "error", "message"),
    [
        ((2, 1, 3, 4, 5), None, 2, SecAggError, "must be listed once each, in order"),
        ((1, 2, 2, 3, 4, 5), None, 2, SecAggError, "must be listed once each, in order"),
        ((2, 3, 4, 5), None, 2, SecAggError, "do not include this site"),
        ((1, 2, 3, 4, 5, 9), None, 2, SecAggError, r"sites without an advert: \[9\]"),
        ((1, 2, 3, 4, 5), "refused", 2, SecAggError, r"refused or never received: \[5\]"),
        ((1, 2, 3, 4, 5), "never received", 2, SecAggError, r"or never received: \[5\]"),
        (
            (1, 2, 3, 4),
            None,
            5,
            SecAggAbort,
            "only 4 sites remain in the round, this site requires at least 5",
        ),
        (
            (1, 2, 3),
            None,
            2,
            SecAggAbort,
            "site 1 would have 3 live holders of its secrets, fewer than the threshold 4",
        ),
    ],
    ids=[
        "out of order",
        "twice",
        "without itself",
        "unknown site",
        "refused dealer",
        "dealer never received",
        "fewer than its minimum",
        "fewer than t holders",
    ],
)
def test_a_site_refuses_a_bad_set_of_the_rounds_sites_before_training(
    members: tuple[int, ...], how: str | None, min_sites: int, error: type, message: str
) -> None:
    # Attack: the coordinator sends site 1 a final set of the round's sites it must not
    # train for: malformed, without it, with a site it never saw, with a dealer whose
    # shares it refused or never got (it could not vouch for that dealer's secrets),
    # smaller than its own minimum, or leaving a site fewer than t holders.
    tamper = {SHARES_ROUTED: withhold(1, 5, how)} if how else {}
    out = run_round(make_params(5), tamper=tamper, min_sites=min_sites, until=OPENED)
    site = out.sessions[1]
    assert site.stage == "opened"
    assert out.messages[OPENED][1] == ((5,) if how == "refused" else ())

    # Execute / Assert
    with pytest.raises(error, match=message):
        site.admit(members)
    assert site.stage == "opened" and site.members == ()


def test_a_site_refuses_a_set_that_leaves_another_site_short_of_t_holders() -> None:
    # Attack: on a sparse graph (8 sites, degree 4, t = 4), the coordinator leaves out
    # both ring neighbours of one site, x: x keeps 3 < t live holders, so its secrets
    # could not be rebuilt (or, with colluders, only by them). Every other member keeps
    # 4; each site names x.
    out = run_round(make_params(8, degree=4), until=OPENED)
    params = out.co.params
    assert params.threshold == 4
    order = ring_order(params)
    x, gone = order[0], {order[1], order[-1]}
    members = tuple(sorted(set(params.participants) - gone))

    # Execute / Assert
    for u in members:
        with pytest.raises(SecAggAbort, match=f"site {x} would have 3 live holders"):
            out.sessions[u].admit(members)
        assert out.sessions[u].stage == "opened" and out.sessions[u].members == ()
    # The coordinator's own rule refuses it too, were these two's reports lost.
    with pytest.raises(SecAggAbort, match=f"after opening shares, site {x} has 3 live"):
        out.co.receive_opened({u: out.messages[OPENED][u] for u in members})


# ---- e. a forged consistency round --------------------------------------------------------


@pytest.mark.parametrize(
    "forgery", ["none", "garbage", "coordinator's key", "too few", "another round"]
)
def test_without_t_genuine_signatures_no_site_reveals(forgery: str) -> None:
    # Attack: the coordinator forwards no signatures, made-up ones, its own, too few
    # genuine ones (t - 2 besides the site's), or genuine ones from another round.
    out = run_round(make_params(5), until=SIGNED)
    params = out.co.params
    t = params.threshold
    other = run_round(make_params(5), until=SIGNED)

    def forged(u: int, survivors: Survivors, genuine: dict[int, bytes]) -> dict[int, bytes]:
        peers = [v for v in survivors.alive if v != u]
        if forgery == "none":
            return {}
        if forgery == "garbage":
            return {v: os.urandom(64) for v in peers}
        if forgery == "coordinator's key":
            mine = Ed25519PrivateKey.generate()
            return {v: mine.sign(survivors_message(params, survivors)) for v in peers}
        if forgery == "too few":
            return {v: genuine[v] for v in peers[: t - 2]}
        return dict(other.messages[SIGNED][u][1])

    # Execute / Assert
    for u, (survivors, genuine) in out.messages[SIGNED].items():
        with pytest.raises(SecAggAbort, match="holders signed the survivor set it was told"):
            out.sessions[u].unmask(survivors, forged(u, survivors, genuine), out.sign(u))
        assert out.sessions[u].stage == "signed"  # nothing revealed
    # The genuine signatures still open the round.
    finish(out, honest_replies(out))
    out.assert_correct()


# ---- f. the graph is not the coordinator's to choose -----------------------------------


def test_the_same_parameters_give_a_different_graph_each_round() -> None:
    # Prepare: the coordinator re-uses one session string (and so could search for one
    # whose graph surrounds a victim with its own sites, as before issue 13).
    params = make_params(30)

    # Execute
    rounds = [run_round(params, until=SHARES) for _ in range(2)]

    # Assert: the seed hashes the sites' fresh signed keys; every site derived the
    # coordinator's graph.
    graphs = [r.co.params for r in rounds]
    assert graphs[0].session == graphs[1].session
    assert graphs[0].graph != graphs[1].graph
    assert [graphs[0].neighbours(u) for u in params.participants] != [
        graphs[1].neighbours(u) for u in params.participants
    ]
    for r in rounds:
        assert {s.params.graph for s in r.sessions.values()} == {r.co.params.graph}
        assert r.co.params.graph == graph_seed(params, r.messages[KEYS]).hex()


def test_a_site_refuses_parameters_with_the_graph_already_fixed() -> None:
    # Prepare: parameters arrive with a graph the coordinator chose.
    params = make_params(30)
    chosen = SecAggParams.from_json(params.with_graph(bytes(32)).to_json())
    key = identity_keys([1])[1]

    # Execute / Assert
    with pytest.raises(SecAggError, match="the coordinator may not fix the neighbour graph"):
        SiteSession.start(chosen, 1, public(key), key.sign)


def test_adverts_routed_as_another_sites_are_refused() -> None:
    # The graph seed hashes each advert under its index: the coordinator cannot reorder
    # the sites by relabelling their adverts (each is signed for its own index).
    params = make_params(5)

    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        swapped = dict(routed[1])
        swapped[2], swapped[3] = (
            Advert(2, swapped[3].identity, swapped[3].keys, swapped[3].signature),
            Advert(3, swapped[2].identity, swapped[2].keys, swapped[2].signature),
        )
        routed[1] = swapped
        return routed

    # Execute
    out = run_round(params, tamper={KEYS_ROUTED: hook})

    # Assert
    assert isinstance(out.error, SecAggError)
    assert "site 2's advert (site-3) does not verify under its key" in str(out.error)
    assert out.sessions[1].stage == "advertised"


# ---- g. colluders bridging a cut (second review) -------------------------------------


def _bridged_round(k_len: int) -> tuple[Any, dict[int, SiteSession], Any, set[int]]:
    """50 sites (degree 18, t = 13, 6 colluders tolerated), every session real. On the
    public ring: an honest arc K of ``k_len`` sites, then on each side 3 colluders and
    6 sites whose masked inputs the coordinator ignores. The alive graph is in one
    piece only through the colluders, whose pairwise masks the coordinator knows: K's
    masks would cancel on their own, giving the coordinator K's sum."""
    from common.secagg.coordinator import CoordinatorSession
    from common.secagg.params import pack_masked

    params = make_params(50, k=16, length=64)
    ids = identity_keys(params.participants)
    roster = roster_of(ids)
    inputs = random_inputs(params, seed=1)
    sessions, adverts = {}, {}
    for u in params.participants:
        sessions[u], adverts[u] = SiteSession.start(params, u, public(ids[u]), ids[u].sign)
    co = CoordinatorSession(params)
    routed = co.receive_adverts(adverts)
    dealt = {}
    for u in params.participants:
        sessions[u].check_adverts(dict(routed), roster, min_sites=10)
        dealt[u] = sessions[u].share_keys(ids[u].sign)
    to = co.receive_shares(dealt)
    members = co.receive_opened({u: sessions[u].open_shares(*to[u]) for u in to})
    graph = co.params
    order, _ = graph._ring
    half = graph.degree // 2
    n = len(order)
    colluders = {order[(k_len + j) % n] for j in range(3)} | {order[(-1 - j) % n] for j in range(3)}
    ignored = {order[(k_len + j) % n] for j in range(3, half)}
    ignored |= {order[(-1 - j) % n] for j in range(3, half)}
    masked = {}
    for u in graph.participants:
        sessions[u].admit(members)
        masked[u] = (
            pack_masked(sessions[u].masked_input(inputs[u]), graph),
            sessions[u].commitment,
        )
    assert (
        max(len(set(graph.holders(u)) & colluders) for u in graph.participants) <= graph.tolerated
    )
    return co, sessions, {u: m for u, m in masked.items() if u not in ignored}, colluders


@pytest.mark.parametrize("k_len", [7, 18])
def test_colluders_bridging_a_cut_are_refused_before_any_share_is_revealed(k_len: int) -> None:
    # Attack (second review, B1): the alive sites' graph was checked to be in one piece,
    # colluders included; with 6 colluders (the tolerance) and 12 ignored inputs the
    # coordinator learnt the sum of a 7-site honest arc although every site required 10.
    co, sessions, kept, colluders = _bridged_round(k_len)
    from common.secagg.params import Survivors

    # The coordinator's own rule refuses it ...
    with pytest.raises(SecAggAbort, match="could cut the alive sites' neighbour graph"):
        co.receive_masked(kept)
    # ... and so does every honest site, shown the same survivor set by a coordinator
    # that skips its own rule.
    members = set(co.members)
    alive = tuple(sorted(kept))
    told = Survivors(alive=alive, dropped=tuple(sorted(members - set(kept))))
    for u in sorted(set(alive) - colluders):
        with pytest.raises(SecAggAbort, match="could cut the alive sites' neighbour graph"):
            sessions[u].consistency(told, lambda data: b"")
        assert sessions[u].stage == "masked"  # nothing signed, nothing revealed


def test_separable_agrees_with_removing_every_small_set_of_alive_sites() -> None:
    # The ring test against brute force: remove every set of at most c alive sites and
    # look for pieces.
    rng = random.Random(2)
    positives = 0
    for _ in range(150):
        n, degree = rng.choice([14, 15, 16, 18]), rng.choice([4, 6, 8])
        params = make_params(n, degree=degree).with_graph(os.urandom(32))
        alive = [u for u in params.participants if rng.random() < 0.6]
        c = rng.randint(0, 2)
        brute = any(
            len(set(alive) - set(gone)) >= 2 and params.pieces(set(alive) - set(gone)) > 1
            for k in range(c + 1)
            for gone in itertools.combinations(alive, k)
        )
        positives += brute
        assert params.separable(alive, c) == brute
    assert positives > 20  # both answers were exercised


# ---- h. refusals as conflicts (review A1) ----------------------------------------------


def refuse(malicious: int, dealers: Collection[int]) -> Any:
    """An OPENED hook: site ``malicious`` opened its shares honestly but reports that it
    refused those of ``dealers`` (a lie nobody can check: only it saw the shares)."""

    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        replies[malicious] = tuple(sorted(dealers))
        return replies

    return hook


@pytest.mark.parametrize(("n", "degree"), [(5, None), (10, None), (12, 8)])
def test_a_holder_refusing_every_dealer_leaves_only_itself_out(
    n: int, degree: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack (review A1): a refused dealer used to be left out, named as the cheat, on
    # its refusing holder's word alone. One malicious site refusing every dealer so left
    # every honest site out, aborted every round and blamed the honest dealers. Now each
    # refusal is a conflict: the malicious site is in one with each of its dealers, so
    # it alone is left out, and the honest dealers (one conflict each) stay in.
    malicious = 3
    trained = record_training(monkeypatch)
    params = make_params(n) if degree is None else make_params(n, degree=degree)

    # Execute: it refuses everyone, itself and sites it holds no shares of included
    # (the coordinator counts only refusals of dealers it holds shares of).
    out = run_round(params, tamper={OPENED: refuse(malicious, range(1, n + 1))})

    # Assert: the round completes over every other site, exactly.
    rest = tuple(u for u in range(1, n + 1) if u != malicious)
    dealers = sorted(out.co.params.neighbours(malicious))
    assert out.error is None
    assert set(out.co.rejected) == {malicious}
    reason = out.co.rejected[malicious]
    assert f"in conflict over dealt shares with sites {dealers}" in reason
    assert "left out before training" in reason
    assert all(out.co.reports[v] == [malicious] for v in dealers)
    assert all(out.messages[OPENED][v] == () for v in rest)
    assert out.co.members == set(rest)
    assert trained == dict.fromkeys(rest, rest)
    assert out.sessions[malicious].stage == "opened" and malicious not in out.co.alive
    assert all(malicious not in shares for shares, _ in out.messages[UNMASK].values())
    assert out.alive == rest
    out.assert_correct()


@pytest.mark.parametrize("n", [7, 10])
def test_a_holder_refusing_one_honest_dealer_leaves_out_both_and_the_round_completes(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack (review A1): malicious site 3 refuses honest site 1's shares, and only
    # those. Nobody can tell which of the two lies, so both are left out: a denial of
    # service of one honest site for one round, which names it as unverifiable, not as
    # a cheat. The round completes over the others (n = 7: 5 = t holders each).
    trained = record_training(monkeypatch)

    # Execute
    out = run_round(make_params(n), tamper={OPENED: refuse(3, {1})})

    # Assert
    # (Site 3 kept site 1's shares: it lied. assert_left_out assumes honest refusals.)
    rest = tuple(u for u in range(1, n + 1) if u not in (1, 3))
    assert set(out.co.rejected) == {1, 3}
    assert out.co.rejected[1] == out.co.rejected[3]
    reason = out.co.rejected[1]
    assert "holder 3 refused the shares dealer 1 dealt it" in reason
    assert "which cannot be checked" in reason
    assert "both left out before training" in reason
    assert out.co.reports == {1: [3]}
    assert out.messages[MEMBERS] == dict.fromkeys(rest, rest)
    assert out.co.survivors == Survivors(alive=rest, dropped=())
    for u in (1, 3):
        assert out.sessions[u].stage == "opened" and u not in out.co.alive
        assert all(u not in shares for shares, _ in out.messages[UNMASK].values())
    assert trained == dict.fromkeys(rest, rest)
    assert out.alive == rest
    out.assert_correct()


def test_a_holder_refusing_two_honest_dealers_leaves_only_itself_out() -> None:
    # Attack: two refusals put the malicious holder in two conflicts, and each honest
    # dealer in one: it alone is left out (n = 5: 4 = t holders each remain).
    out = run_round(make_params(5), tamper={OPENED: refuse(3, {1, 2})})

    # Assert
    assert set(out.co.rejected) == {3}
    assert "in conflict over dealt shares with sites [1, 2]" in out.co.rejected[3]
    assert out.co.reports == {1: [3], 2: [3]}
    assert out.alive == (1, 2, 4, 5)
    out.assert_correct()


@pytest.mark.parametrize("how", ["sealed garbage", "entries unlike the shares"])
@pytest.mark.parametrize("n", [5, 10])
def test_a_dealer_dealing_bad_shares_to_all_its_holders_is_left_out_alone(
    n: int, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attack: malicious dealer 2 deals every holder a share that fails its checks (a
    # sealed share that does not open, or one unlike its signed entry). Every honest
    # holder refuses it: 2 is in a conflict with each, each of them in one, so 2 alone
    # is left out and every honest holder stays in the round.
    def garbage(replies: dict[int, Any]) -> dict[int, Any]:
        blobs, entries = replies[2]
        replies[2] = ({v: flip(b, 40) for v, b in blobs.items()}, entries)
        return replies

    if how == "entries unlike the shares":
        deal_unlike_signed(monkeypatch, dealer=2)
    tamper = {SHARES: garbage} if how == "sealed garbage" else {}

    # Execute
    out = run_round(make_params(n), tamper=tamper, site_errors="drop")

    # Assert
    holders = sorted(out.co.params.neighbours(2))
    rest = tuple(u for u in range(1, n + 1) if u != 2)
    assert not out.site_errors
    assert all(out.messages[OPENED][v] == (2,) for v in holders)
    assert set(out.co.rejected) == {2}
    assert f"in conflict over dealt shares with sites {holders}" in out.co.rejected[2]
    assert_left_out(out, 2, holders)
    assert out.alive == rest
    out.assert_correct()
