"""SecAgg+ rounds end to end through both state machines: the unmasked total is the
modular sum of the alive sites' inputs (complete and sparse graphs, real encodings,
dropouts at every stage), a masked input looks uniform to the coordinator, a site signs
one survivor set and answers one unmask request, never revealing both secrets of a
peer, and tampered, replayed and malformed messages are refused: a share that fails its
holder's checks is a conflict nobody can settle, so it gets its dealer and that holder
left out before any site trains. The attacks of an active coordinator (issue 13) are in
test_active_coordinator.py."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

import numpy as np
import pytest

from common.quantize import (
    EncodingSpec,
    decode_sum,
    encode,
    error_bound,
)
from common.secagg import crypto, shamir
from common.secagg.errors import SecAggAbort, SecAggError
from common.secagg.params import (
    SEALED_BYTES,
    Advert,
    PublicKeys,
    Survivors,
    default_degree,
    reveal_message,
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
    SIGNATURES,
    SIGNED,
    UNMASK,
    Outcome,
    assert_left_out,
    chi_square_top_bits,
    flip,
    identity_keys,
    lagrange_at_zero,
    make_params,
    public,
    random_inputs,
    run_round,
    unpack_masked,
)

# ---- 1. correctness ---------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(2, 16), (3, 1), (3, 12), (5, 32), (5, 64)])
def test_complete_graph_total_is_the_modular_sum(n: int, k: int) -> None:
    # Prepare
    params = make_params(n, k=k)

    # Execute
    out = run_round(params)

    # Assert
    assert params.degree == n - 1
    assert out.alive == params.participants
    out.assert_correct()


def test_sparse_graph_total_is_the_modular_sum() -> None:
    # Prepare
    params = make_params(30, k=20)

    # Execute
    out = run_round(params)

    # Assert
    assert params.degree == default_degree(30) < 29
    assert out.alive == params.participants
    assert out.co.params.graph  # fixed by the adverts, the same at every site
    assert {s.params.graph for s in out.sessions.values()} == {out.co.params.graph}
    out.assert_correct()


@pytest.mark.parametrize("n", [3, 5, 12])
def test_real_encodings_decode_to_the_mean_of_clipped_deltas(n: int) -> None:
    # Prepare: real float deltas, some beyond the clip norm; as many sites drop as the
    # threshold allows (n - t: 0 of 3, 1 of 5, 3 of 12): one before its masked input
    # and, where a second may go, one after it (that one stays in the sum).
    rng = np.random.default_rng(n)
    spec = EncodingSpec(clip_norm=1.0, bits=8, num_sites=n, seed=41 + n, dim=300)
    deltas = {u: rng.normal(0.0, 0.1 * u, spec.dim) for u in range(1, n + 1)}
    encoded = {u: encode(d, spec, np.random.default_rng(100 + u)) for u, d in deltas.items()}
    params = make_params(n, k=spec.ring_bits, length=spec.encoded_length)
    spare = n - params.threshold
    gone_before = {n} if spare >= 1 else set()
    gone_after = {n - 1} if spare >= 2 else set()

    # Execute
    out = run_round(
        params,
        {u: e.values for u, e in encoded.items()},
        drop={MASKED: gone_before, UNMASK: gone_after},
    )

    # Assert
    out.assert_correct()
    assert set(out.alive) == set(params.participants) - gone_before
    assert all(e.clip_fraction == 0 for e in encoded.values())  # error_bound holds surely
    assert any(e.clipped for e in encoded.values())
    assert out.total is not None
    mean, weight = decode_sum(out.total, spec, len(out.alive))
    clipped = [
        d * min(1.0, 1.0 / float(np.linalg.norm(d))) for u, d in deltas.items() if u in out.alive
    ]
    assert weight == len(out.alive)
    assert np.linalg.norm(mean - np.mean(clipped, axis=0)) <= error_bound(
        spec, num_summands=len(out.alive)
    )
    plain, plain_weight = decode_sum(out.plain_sum(out.alive), spec, len(out.alive))
    assert np.array_equal(mean, plain)  # secure aggregation adds no error of its own
    assert plain_weight == weight


# ---- 2. dropouts --------------------------------------------------------------------------


@pytest.mark.parametrize("gone", [{7}, {1, 3}])
def test_sites_dropping_after_masked_input_stay_in_the_sum(gone: set[int]) -> None:
    # Prepare: n = 7, t = 5: up to n - t = 2 sites may skip the unmask reply.
    params = make_params(7)
    assert params.threshold == 5

    # Execute
    out = run_round(params, drop={UNMASK: gone})

    # Assert
    assert out.alive == params.participants
    assert gone <= set(out.alive)
    out.assert_correct()


@pytest.mark.parametrize("gone", [{2}, {1, 5}])
def test_sites_dropping_before_masked_input_are_excluded_and_unmasked(gone: set[int]) -> None:
    # Prepare: n = 7, t = 5.
    params = make_params(7)

    # Execute
    out = run_round(params, drop={MASKED: gone})

    # Assert: their pairwise masks (in the others' inputs) were rebuilt and removed.
    assert set(out.alive) == set(params.participants) - gone
    assert out.co.shared == set(params.participants)
    out.assert_correct()
    assert out.total is not None
    assert not np.array_equal(out.total, out.plain_sum(params.participants))


def test_a_site_skipping_the_consistency_round_stays_in_the_sum() -> None:
    # Prepare: n = 7, t = 5; site 3 sends its masked input but no signature (so it is
    # not asked to unmask); the other six reveal.
    params = make_params(7)

    # Execute
    out = run_round(params, drop={SIGNATURES: {3}})

    # Assert
    assert out.alive == params.participants
    assert 3 not in out.messages[SIGNED]
    out.assert_correct()


def test_dropouts_at_every_stage_together() -> None:
    # Prepare: n = 10 (complete graph), t = 7: n - t = 3 sites may go, one at each of
    # three stages: 8 sites stay alive and 7 of them answer the unmask request.
    params = make_params(10)
    assert (params.degree, params.threshold) == (9, 7)

    # Execute
    out = run_round(params, drop={SHARES: {10}, MASKED: {1}, UNMASK: {4}})

    # Assert
    assert out.alive == (2, 3, 4, 5, 6, 7, 8, 9)
    out.assert_correct()


@pytest.mark.parametrize(
    ("stage", "raised_by"),
    [
        (KEYS, "after advertise keys"),
        (SHARES, "after share keys"),
        (OPENED, "after opening shares, 3 sites remain, threshold is 4"),
        (MASKED, "after masked input"),
        (SIGNATURES, "after consistency, 3 sites remain, threshold is 4"),
        (UNMASK, "only 3 verified shares of site 1's self-mask seed, need 4"),
    ],
)
def test_too_many_dropouts_abort_at_that_stage(stage: str, raised_by: str) -> None:
    # Prepare: n = 5, t = 4; two sites vanish, leaving 3 < t holders.
    params = make_params(5)
    assert params.threshold == 4

    # Execute
    out = run_round(params, drop={stage: {4, 5}})

    # Assert
    assert isinstance(out.error, SecAggAbort)
    assert raised_by in str(out.error)
    assert out.total is None


def test_a_site_not_reporting_its_opened_shares_is_left_out_before_training() -> None:
    # Prepare: n = 5, t = 4; site 5 opens its shares but its report never arrives.
    params = make_params(5)

    # Execute
    out = run_round(params, drop={OPENED: {5}})

    # Assert: it is not one of the round's sites, so no site masks with it, it is not
    # counted as dropped, and no holder reveals a share of its secrets.
    assert set(out.messages[MEMBERS]) == {1, 2, 3, 4}
    assert set(out.messages[MEMBERS].values()) == {(1, 2, 3, 4)}
    assert 5 not in out.messages[MASKED]
    assert out.co.survivors == Survivors(alive=(1, 2, 3, 4), dropped=())
    assert all(5 not in shares for shares, _ in out.messages[UNMASK].values())
    assert out.sessions[5].stage == "opened"
    assert out.alive == (1, 2, 3, 4)
    out.assert_correct()


def test_sparse_graph_with_dropouts_at_every_stage() -> None:
    # Prepare: n = 30, degree 16, t = 12: each site's secrets survive the loss of any 5
    # of its 17 holders. The graph depends on the round's fresh keys, so the dropouts
    # are chosen to be safe for any graph: 5 sites in all, one or two per stage.
    params = make_params(30, k=24, length=32)
    assert (params.degree, params.threshold) == (16, 12)

    # Execute
    out = run_round(params, drop={KEYS: {30}, SHARES: {17}, MASKED: {5, 23}, UNMASK: {8}})

    # Assert
    assert set(out.alive) == set(range(1, 31)) - {30, 17, 5, 23}
    assert 8 in out.alive
    out.assert_correct()


def test_sparse_graph_aborts_when_one_site_loses_its_holders() -> None:
    # Prepare: pause before the coordinator reads the masked inputs (the graph is fixed
    # by then); every neighbour of site 1 but t - 2 sent none, so site 1's secrets have
    # t - 1 live holders (itself included) although most sites are alive.
    out = run_round(make_params(30, k=24, length=8), until=MASKED)
    params = out.co.params
    gone = set(params.neighbours(1)[: params.degree - (params.threshold - 2)])
    masked = {u: m for u, m in out.messages[MASKED].items() if u not in gone}

    # Execute / Assert
    with pytest.raises(SecAggAbort, match="after masked input") as caught:
        out.co.receive_masked(masked)
    assert f"site 1 has {params.threshold - 1} live holders" in str(caught.value)


# ---- 3. privacy of the masked input -----------------------------------------------------

# Masks come from OS entropy, so these tests cannot be seeded: under the null (uniform)
# hypothesis the p-value is itself uniform, so each ``p > 1e-6`` check fails by chance
# with probability 1e-6 (about 4e-6 for the whole section).
P_MIN = 1e-6
PRIVACY_K, PRIVACY_L = 12, 50_000


def test_masked_zero_input_is_uniform() -> None:
    # Prepare: the worst case, a constant input.
    params = make_params(3, k=PRIVACY_K, length=PRIVACY_L)
    inputs = {u: np.zeros(PRIVACY_L, dtype=np.uint64) for u in params.participants}

    # Execute
    out = run_round(params, inputs)

    # Assert: what the coordinator holds of site 1 passes for uniform in Z_(2^12).
    assert out.error is None
    y = unpack_masked(out, 1)
    assert chi_square_top_bits(y, PRIVACY_K) > P_MIN
    assert not np.any(out.total)  # and the round still sums to 0


def test_two_sites_masked_zero_inputs_differ() -> None:
    # Prepare
    params = make_params(2, k=PRIVACY_K, length=PRIVACY_L)
    inputs = {u: np.zeros(PRIVACY_L, dtype=np.uint64) for u in params.participants}

    # Execute
    out = run_round(params, inputs)

    # Assert: equal coordinates only by chance (1 in 4096).
    y1, y2 = unpack_masked(out, 1), unpack_masked(out, 2)
    assert np.mean(y1 == y2) < 0.002


def test_masked_input_hides_the_input() -> None:
    # Prepare: site 1 sends zeros, site 2 a very structured input (a ramp).
    params = make_params(3, k=PRIVACY_K, length=PRIVACY_L)
    inputs = random_inputs(params)
    inputs[1] = np.zeros(PRIVACY_L, dtype=np.uint64)
    inputs[2] = (np.arange(PRIVACY_L, dtype=np.uint64) // 13) % np.uint64(1 << PRIVACY_K)
    assert chi_square_top_bits(inputs[2], PRIVACY_K) < P_MIN  # the input itself is not

    # Execute
    out = run_round(params, inputs)

    # Assert
    out.assert_correct()
    assert chi_square_top_bits(unpack_masked(out, 1), PRIVACY_K) > P_MIN
    assert chi_square_top_bits(unpack_masked(out, 2), PRIVACY_K) > P_MIN


# ---- 4. safety rules ----------------------------------------------------------------------


def paused_at(stage: str, n: int = 5, masked: Collection[int] = ()) -> Outcome:
    """A round paused once ``stage``'s messages are sent: at REQUESTS the sites have sent
    their masked inputs and await the survivor set to sign; at SIGNED they have signed
    it and await the unmask request."""
    out = run_round(make_params(n), drop={MASKED: masked}, until=stage)
    assert out.error is None
    return out


def test_a_site_answers_only_one_unmask_request() -> None:
    # Prepare
    out = paused_at(SIGNED)
    survivors, signatures = out.messages[SIGNED][1]
    out.sessions[1].unmask(survivors, signatures, out.sign(1))

    # Execute / Assert
    with pytest.raises(SecAggError, match="unmask is not allowed at stage 'done'"):
        out.sessions[1].unmask(survivors, signatures, out.sign(1))


def test_a_site_signs_only_one_survivor_set() -> None:
    # Prepare
    out = paused_at(REQUESTS)
    out.sessions[1].consistency(out.messages[REQUESTS][1], out.sign(1))

    # Execute / Assert
    with pytest.raises(SecAggError, match="sign the survivor set is not allowed at stage 'signed'"):
        out.sessions[1].consistency(Survivors(alive=(1, 2, 3, 4), dropped=(5,)), out.sign(1))


def test_an_unmask_request_for_a_set_the_site_did_not_sign_is_refused() -> None:
    # Prepare
    out = paused_at(SIGNED)
    _, signatures = out.messages[SIGNED][1]

    # Execute / Assert
    with pytest.raises(SecAggError, match="not the one this site signed"):
        out.sessions[1].unmask(Survivors(alive=(1, 2, 3, 4), dropped=(5,)), signatures, out.sign(1))
    assert out.sessions[1].stage == "signed"  # refused without revealing anything


@pytest.mark.parametrize(
    ("alive", "dropped", "error", "message"),
    [
        ((1, 2, 3, 4, 5), (3,), SecAggError, r"both alive and dropped: \[3\]"),
        ((2, 3, 4, 5), (1,), SecAggError, "does not count this site as alive"),
        ((1, 2, 3, 4, 5), (9,), SecAggError, r"it names \[9\] and leaves out \[\]"),
        ((1, 2, 3, 4), (), SecAggError, r"it names \[\] and leaves out \[5\]"),
        ((1, 2, 3, 4), (6,), SecAggError, r"it names \[6\] and leaves out \[5\]"),
        ((2, 1, 3, 4, 5), (), SecAggError, "once each, in order"),
        ((1, 2, 2, 3, 4, 5), (), SecAggError, "once each, in order"),
        (
            (1, 2, 3),
            (4, 5),
            SecAggAbort,
            r"only 3 masked inputs; this site requires at least 4 \(threshold 4, its own "
            r"minimum 2\)",
        ),
    ],
)
def test_a_bad_survivor_set_is_refused_before_signing(
    alive: tuple[int, ...], dropped: tuple[int, ...], error: type[SecAggError], message: str
) -> None:
    # Prepare
    out = paused_at(REQUESTS)

    # Execute / Assert
    with pytest.raises(error, match=message):
        out.sessions[1].consistency(Survivors(alive=alive, dropped=dropped), out.sign(1))
    assert out.sessions[1].stage == "masked"  # refused without signing anything


def test_unmask_reveals_the_b_share_of_alive_and_the_s_share_of_dropped_peers() -> None:
    # Prepare: site 2 shared its keys but sent no masked input.
    out = paused_at(SIGNED, masked={2})
    signed = out.messages[SIGNED]
    assert set(signed) == {1, 3, 4, 5}
    params = out.co.params

    # Execute
    replies = {u: out.sessions[u].unmask(s, sigs, out.sign(u)) for u, (s, sigs) in signed.items()}

    # Assert: one share per peer, of 66 bytes, signed by the holder; all together they
    # rebuild b of every alive site and the s key of the dropped one, and nothing else.
    t = params.threshold
    for holder, (reply, signature) in replies.items():
        assert set(reply) == set(params.holders(holder))
        assert all(len(share) == shamir.SHARE_BYTES for share in reply.values())
        message = reveal_message(params, holder, reply)
        assert crypto.verify(public(out.identities[holder]), signature, message)
    for v in params.participants:
        shares = {holder: reply[v] for holder, (reply, _) in replies.items()}
        secret = shamir.combine(shares, threshold=t)
        if v == 2:
            assert secret == out.sessions[v].s_private
            assert secret != out.sessions[v].b_seed
        else:
            assert secret == out.sessions[v].b_seed
            assert secret != out.sessions[v].s_private


def test_site_refuses_to_share_or_mask_before_checking_the_adverts() -> None:
    # Prepare
    params = make_params(3)
    key = identity_keys([1])[1]
    site, _ = SiteSession.start(params, 1, public(key), key.sign)

    # Execute / Assert
    with pytest.raises(SecAggError, match="share keys is not allowed at stage 'advertised'"):
        site.share_keys(key.sign)
    with pytest.raises(SecAggError, match="open shares is not allowed at stage 'advertised'"):
        site.open_shares({}, {})
    with pytest.raises(SecAggError, match="admit the round's sites is not allowed at stage"):
        site.admit((1, 2, 3))
    with pytest.raises(SecAggError, match="masked input is not allowed at stage 'advertised'"):
        site.masked_input(np.zeros(params.vector_length, dtype=np.uint64))
    assert site.b_seed == b"" and not site.received and site.stage == "advertised"


def test_site_refuses_to_mask_before_admitting_the_rounds_sites() -> None:
    # Prepare: the shares are routed; no final set of the round's sites yet.
    out = run_round(make_params(3), until=SHARES_ROUTED)
    site = out.sessions[1]
    zeros = np.zeros(out.params.vector_length, dtype=np.uint64)

    # Execute / Assert: before opening its shares, and after, until it admits the set.
    with pytest.raises(
        SecAggError, match="admit the round's sites is not allowed at stage 'shared'"
    ):
        site.admit((1, 2, 3))
    with pytest.raises(SecAggError, match="masked input is not allowed at stage 'shared'"):
        site.masked_input(zeros)
    assert site.open_shares(*out.messages[SHARES_ROUTED][1]) == ()
    with pytest.raises(SecAggError, match="masked input is not allowed at stage 'opened'"):
        site.masked_input(zeros)
    with pytest.raises(SecAggError, match="open shares is not allowed at stage 'opened'"):
        site.open_shares(*out.messages[SHARES_ROUTED][1])
    site.admit((1, 2, 3))
    with pytest.raises(SecAggError, match="admit the round's sites is not allowed at stage"):
        site.admit((1, 2, 3))
    site.masked_input(zeros)
    assert site.stage == "masked"


def test_site_refuses_to_sign_or_unmask_before_masked_input() -> None:
    # Prepare: the round's sites are admitted, no masked input sent yet.
    out = run_round(make_params(3), until=SHARES_ROUTED)
    survivors = Survivors(alive=(1, 2, 3), dropped=())
    site = out.sessions[1]

    # Execute / Assert
    for step in ("shared", "opened", "admitted"):
        if step == "opened":
            site.open_shares(*out.messages[SHARES_ROUTED][1])
        elif step == "admitted":
            site.admit((1, 2, 3))
        with pytest.raises(
            SecAggError, match=f"sign the survivor set is not allowed at stage '{step}'"
        ):
            site.consistency(survivors, out.sign(1))
        with pytest.raises(SecAggError, match=f"unmask is not allowed at stage '{step}'"):
            site.unmask(survivors, {}, out.sign(1))


def test_site_refuses_to_unmask_before_signing_the_survivor_set() -> None:
    # Prepare
    out = paused_at(REQUESTS)

    # Execute / Assert
    with pytest.raises(SecAggError, match="unmask is not allowed at stage 'masked'"):
        out.sessions[1].unmask(out.messages[REQUESTS][1], {}, out.sign(1))


def test_site_refuses_to_check_adverts_or_share_keys_twice() -> None:
    # Prepare
    out = run_round(make_params(3), until=SHARES_ROUTED)

    # Execute / Assert
    with pytest.raises(SecAggError, match="check adverts is not allowed at stage 'shared'"):
        out.sessions[1].check_adverts(out.messages[KEYS_ROUTED][1], out.roster, min_sites=2)
    with pytest.raises(SecAggError, match="share keys is not allowed at stage 'shared'"):
        out.sessions[1].share_keys(out.sign(1))


def test_coordinator_refuses_masked_inputs_before_shares() -> None:
    # Prepare
    out = run_round(make_params(3), until=KEYS_ROUTED)

    # Execute / Assert
    with pytest.raises(SecAggError, match="coordinator expected stage 'share', got 'masked'"):
        out.co.receive_masked({})


def test_coordinator_refuses_masked_inputs_before_the_rounds_sites_are_fixed() -> None:
    # Prepare: the shares are routed; the holders' reports are not in yet.
    out = run_round(make_params(3), until=SHARES_ROUTED)

    # Execute / Assert
    with pytest.raises(SecAggError, match="coordinator expected stage 'open', got 'masked'"):
        out.co.receive_masked(out.messages[SHARES_ROUTED])
    with pytest.raises(SecAggError, match="coordinator expected stage 'open', got 'share'"):
        out.co.receive_shares({})


@pytest.mark.parametrize("call", ["keys_again", "signatures_early", "unmask_early"])
def test_coordinator_enforces_stage_order(call: str) -> None:
    # Prepare
    out = run_round(make_params(3), until=KEYS_ROUTED)

    # Execute / Assert
    with pytest.raises(SecAggError, match="coordinator expected stage 'share'"):
        if call == "keys_again":
            out.co.receive_adverts(out.messages[KEYS])
        elif call == "signatures_early":
            out.co.receive_signatures({})
        else:
            out.co.receive_unmask({})


# ---- 5. tampering and replays ---------------------------------------------------------


def tamper_routed(routed: dict[int, Any], receiver: int, sender: int, sealed: Any) -> None:
    """Replace the sealed shares ``sender`` dealt to ``receiver`` (SHARES_ROUTED)."""
    blobs, dealt = routed[receiver]
    routed[receiver] = ({**blobs, sender: sealed}, dealt)


def tamper_dealt(replies: dict[int, Any], sender: int, receiver: int, sealed: Any) -> None:
    """Replace the sealed shares ``sender`` deals to ``receiver`` (SHARES)."""
    blobs, dealt = replies[sender]
    replies[sender] = ({**blobs, receiver: sealed}, dealt)


@pytest.mark.parametrize("index", [0, 11, 12, 50, SEALED_BYTES - 1])
def test_flipped_bit_in_a_routed_share_is_refused_naming_the_sender(index: int) -> None:
    # Prepare
    out = run_round(make_params(5), until=SHARES_ROUTED)
    site = out.sessions[3]
    sealed, dealt = out.messages[SHARES_ROUTED][3]

    # Execute
    refused = site.open_shares({**sealed, 1: flip(sealed[1], index)}, dealt)

    # Assert: the holder names the dealer instead of raising, keeps none of its shares,
    # and will not take part in a round that keeps it.
    assert refused == (1,)
    assert set(site.received) == {2, 3, 4, 5}
    assert site.stage == "opened"
    with pytest.raises(SecAggError, match=r"refused or never received: \[1\]"):
        site.admit((1, 2, 3, 4, 5))
    assert site.stage == "opened"


def test_a_share_tampered_in_transit_leaves_dealer_and_holder_out_the_round_completes() -> None:
    # Prepare: n = 7, t = 5; site 1's share for site 3 is damaged on the way. (Site 3
    # used to raise and drop out only after every site had trained.)
    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        tamper_routed(routed, 3, 1, flip(routed[3][0][1], 20))
        return routed

    # Execute
    out = run_round(make_params(7), tamper={SHARES_ROUTED: hook}, site_errors="drop")

    # Assert: site 3 reported site 1; nobody can tell whether site 1, site 3 or the
    # routing was at fault, so the coordinator left both out before training, and the
    # other five (5 = t holders each) sum exactly.
    assert not out.site_errors
    assert out.messages[OPENED] == {1: (), 2: (), 3: (1,), 4: (), 5: (), 6: (), 7: ()}
    assert set(out.co.rejected) == {1, 3}
    assert_left_out(out, 1, {3})
    assert out.alive == (2, 4, 5, 6, 7)
    out.assert_correct()


def test_a_refused_routed_message_leaves_no_shares_behind() -> None:
    # Prepare
    out = run_round(make_params(5), until=SHARES_ROUTED)
    site = out.sessions[3]
    sealed, dealt = out.messages[SHARES_ROUTED][3]

    # Execute / Assert: a message with shares from a site that holds none of site 3's
    # is refused whole, and nothing of it is kept (not even the valid shares in it).
    with pytest.raises(SecAggError, match=r"not advertised holders: \[9\]"):
        site.open_shares({**sealed, 9: sealed[1]}, dealt)
    assert set(site.received) == {3} and site.stage == "shared"

    # Execute / Assert: site 5's share is damaged: refused, and only it is left out.
    assert site.open_shares({**sealed, 5: flip(sealed[5], 20)}, dealt) == (5,)
    assert set(site.received) == {1, 2, 3, 4}
    with pytest.raises(SecAggError, match=r"refused or never received: \[5\]"):
        site.admit((1, 2, 3, 4, 5))
    assert site.stage == "opened"
    site.admit((1, 2, 3, 4))
    assert site.members == (1, 2, 3, 4) and site.stage == "admitted"


def test_share_routed_to_the_wrong_site_is_refused() -> None:
    # Prepare: site 1's share for site 2 is handed to site 3 as site 1's share for it.
    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        tamper_routed(routed, 3, 1, routed[2][0][1])
        return routed

    # Execute (n = 7, t = 5: the round completes without the two sites left out)
    out = run_round(make_params(7), tamper={SHARES_ROUTED: hook})

    # Assert: it does not open at site 3 (bound to the pair); site 1 and site 3, in a
    # conflict nobody can settle, are left out.
    assert out.messages[OPENED][3] == (1,)
    assert_left_out(out, 1, {3})
    assert out.alive == (2, 4, 5, 6, 7)
    out.assert_correct()


@pytest.mark.parametrize(
    "change", ["missing", "another holder's", "signature broken", "short", "not bytes"]
)
def test_a_routed_share_without_its_dealing_entry_is_refused(change: str) -> None:
    # Prepare: the coordinator routes site 1's sealed share to site 3 without the
    # dealing entry that binds it: none, the one site 1 dealt site 2, one whose hashes
    # match but whose signature does not verify, a truncated one, or not bytes.
    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        blobs, dealt = routed[3]
        entry = dealt[1]
        entries = {u: e for u, e in dealt.items() if u != 1}
        if change != "missing":
            entries[1] = {
                "another holder's": routed[2][1][1],
                "signature broken": flip(entry, len(entry) - 1),
                "short": entry[:-1],
                "not bytes": bytearray(entry),
            }[change]
        routed[3] = (blobs, entries)
        return routed

    # Execute (n = 7, t = 5: the round completes without the two sites left out)
    out = run_round(make_params(7), tamper={SHARES_ROUTED: hook})

    # Assert: site 3 refuses site 1's share; both are left out.
    assert out.messages[OPENED][3] == (1,)
    assert_left_out(out, 1, {3})
    assert out.alive == (2, 4, 5, 6, 7)
    out.assert_correct()


def test_shares_from_another_round_are_refused() -> None:
    # Prepare: round 1 and round 2 have different sessions (and fresh keys).
    first = run_round(make_params(3), until=SHARES_ROUTED)
    second = run_round(make_params(3), until=SHARES_ROUTED)
    assert first.params.session != second.params.session
    sealed, dealt = first.messages[SHARES_ROUTED][2]

    # Execute
    refused = second.sessions[2].open_shares(sealed, dealt)

    # Assert
    assert refused == (1, 3)
    assert set(second.sessions[2].received) == {2}


def test_shares_replayed_into_a_session_reusing_the_same_keys_are_refused() -> None:
    # Prepare: even if every site re-used its round-1 key pairs in round 2 (advertised
    # afresh, under its identity), the round-1 ciphertexts do not open: keys and
    # associated data are bound to the session and the graph.
    first = run_round(make_params(3), until=SHARES_ROUTED)
    params = make_params(3)
    sessions, adverts = {}, {}
    for u, old in first.sessions.items():
        sessions[u] = SiteSession(
            params, u, "advertised", old.c_private, old.s_private, old.identity
        )
        keys = PublicKeys(
            crypto.public_from_private(old.c_private), crypto.public_from_private(old.s_private)
        )
        adverts[u] = Advert.make(params, u, old.identity, keys, first.sign(u))
    for u, site in sessions.items():
        site.check_adverts(adverts, first.roster, min_sites=3)
        site.share_keys(first.sign(u))
    sealed, dealt = first.messages[SHARES_ROUTED][2]

    # Execute
    refused = sessions[2].open_shares(sealed, dealt)

    # Assert
    assert refused == (1, 3)
    assert set(sessions[2].received) == {2}


@pytest.mark.parametrize("change", ["short", "long", "not bytes"])
def test_sealed_share_of_the_wrong_length_drops_the_sender(change: str) -> None:
    # Prepare
    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        blob = replies[2][0][4]
        bad = {"short": blob[:-1], "long": blob + b"\0", "not bytes": bytearray(blob)}[change]
        tamper_dealt(replies, 2, 4, bad)
        return replies

    # Execute
    out = run_round(make_params(5), tamper={SHARES: hook})

    # Assert
    assert f"{SEALED_BYTES} bytes" in out.co.rejected[2]
    assert 2 not in out.co.shared
    assert out.alive == (1, 3, 4, 5)
    out.assert_correct()


def test_shares_addressed_to_the_wrong_sites_drop_the_sender() -> None:
    # Prepare
    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        blobs, dealt = replies[2]
        replies[2] = ({v: blob for v, blob in blobs.items() if v != 4}, dealt)
        return replies

    # Execute
    out = run_round(make_params(5), tamper={SHARES: hook})

    # Assert
    assert out.co.rejected[2] == "shares addressed to the wrong set of sites"
    assert out.alive == (1, 3, 4, 5)
    out.assert_correct()


def test_a_dealing_entry_that_does_not_verify_drops_the_dealer() -> None:
    # Prepare: site 2's entry for site 4 is altered in transit (its signature breaks).
    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        blobs, dealt = replies[2]
        replies[2] = (blobs, {**dealt, 4: flip(dealt[4], 0)})
        return replies

    # Execute
    out = run_round(make_params(5), tamper={SHARES: hook})

    # Assert
    assert out.co.rejected == {2: "a dealing entry whose signature does not verify"}
    assert out.alive == (1, 3, 4, 5)
    out.assert_correct()


@pytest.mark.parametrize("change", ["one byte short", "one byte long", "padding bit set"])
def test_malformed_masked_input_drops_the_sender(change: str) -> None:
    # Prepare: 63 elements of 12 bits fill 94.5 bytes: the last byte has 4 padding bits.
    params = make_params(5, k=12, length=63)

    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        blob, bound = replies[2]
        replies[2] = (
            {
                "one byte short": blob[:-1],
                "one byte long": blob + b"\0",
                "padding bit set": flip(blob, -1, 7),
            }[change],
            bound,
        )
        return replies

    # Execute
    out = run_round(params, tamper={MASKED: hook})

    # Assert: site 2 counts as dropped, so its pairwise masks are removed.
    assert out.co.rejected[2].startswith("malformed masked input")
    assert 2 in out.co.shared
    assert out.alive == (1, 3, 4, 5)
    out.assert_correct()


@pytest.mark.parametrize("why", ["did not share", "was left out"])
def test_masked_input_from_a_site_that_is_not_in_the_round_is_ignored(why: str) -> None:
    # Prepare: n = 7, t = 5; site 2 skipped the share stage, or its share to site 3 was
    # refused (so it and site 3 are not among the round's sites), but a masked input
    # arrives in its name.
    def refuse(routed: dict[int, Any]) -> dict[int, Any]:
        tamper_routed(routed, 3, 2, flip(routed[3][0][2], 20))
        return routed

    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        replies[2] = replies[1]
        return replies

    # Execute
    if why == "did not share":
        out = run_round(make_params(7), drop={SHARES: {2}}, tamper={MASKED: hook})
    else:
        out = run_round(make_params(7), tamper={SHARES_ROUTED: refuse, MASKED: hook})

    # Assert
    assert 2 in out.messages[MASKED] and 2 not in out.co.alive
    if why == "did not share":
        assert out.co.rejected[2] == "masked input from a site that is not in the round"
        assert out.alive == (1, 3, 4, 5, 6, 7)
    else:
        assert_left_out(out, 2, {3})
        assert out.alive == (1, 4, 5, 6, 7)
    out.assert_correct()


def test_keys_from_a_non_participant_are_rejected() -> None:
    # Prepare
    params = make_params(5)
    key = identity_keys([9])[9]
    _, intruder = SiteSession.start(make_params(10), 9, public(key), key.sign)

    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        return {**replies, 9: intruder}

    # Execute
    out = run_round(params, tamper={KEYS: hook})

    # Assert
    assert out.co.rejected == {9: "an advert from a site that is not this participant"}
    assert out.alive == params.participants
    out.assert_correct()


def test_an_advert_whose_signature_does_not_verify_is_rejected() -> None:
    # Prepare: site 3's advert arrives with other keys under its original signature.
    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        a = replies[3]
        keys = PublicKeys(crypto.generate_keypair().public, crypto.generate_keypair().public)
        replies[3] = Advert(a.index, a.identity, keys, a.signature)
        return replies

    # Execute
    out = run_round(make_params(5), tamper={KEYS: hook})

    # Assert
    assert out.co.rejected == {3: "an advert whose signature does not verify"}
    assert out.alive == (1, 2, 4, 5)
    out.assert_correct()


@pytest.mark.parametrize("reuse", ["both", "c", "s", "c as s", "identity"])
def test_duplicated_public_keys_are_rejected(reuse: str) -> None:
    # Prepare: site 4 signs an advert of (part of) site 2's keys, or site 2's identity
    # key signs an advert for index 4 too.
    params = make_params(5)
    keys = identity_keys(params.participants)

    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        two, four = replies[2].keys, replies[4].keys
        signer = keys[2] if reuse == "identity" else keys[4]
        chosen = {
            "both": two,
            "c": PublicKeys(two.c, four.s),
            "s": PublicKeys(four.c, two.s),
            "c as s": PublicKeys(four.c, two.c),
            "identity": four,
        }[reuse]
        replies[4] = Advert.make(params, 4, public(signer), chosen, signer.sign)
        return replies

    # Execute
    out = run_round(params, tamper={KEYS: hook})

    # Assert
    assert out.co.rejected == {4: "a key already advertised by site 2"}
    assert 4 not in out.co.adverts
    assert out.alive == (1, 2, 3, 5)
    out.assert_correct()


LOW_ORDER_POINT = bytes(32)  # X25519's zero point: agree() refuses it


@pytest.mark.parametrize("which", ["c", "s"])
def test_a_low_order_public_key_is_refused_where_its_sender_is_known(which: str) -> None:
    # Prepare: a site advertising a low-order point would make every peer's key
    # agreement fail; the key is refused when parsed, so the sender is dropped alone.
    key = identity_keys([5])[5]
    genuine = SiteSession.start(make_params(5), 5, public(key), key.sign)[1].keys
    c, s_key = (LOW_ORDER_POINT, genuine.s) if which == "c" else (genuine.c, LOW_ORDER_POINT)

    # Execute / Assert
    with pytest.raises(SecAggError, match=f"{which} public key is invalid"):
        PublicKeys(c, s_key)


@pytest.mark.parametrize(
    ("c", "s", "message"),
    [
        (bytes(31), bytes(32), "c public key must be 32 bytes"),
        (bytes(32), b"\x01" * 33, "s public key must be 32 bytes"),
        (b"\x09" * 32, b"\x09" * 32, "the two public keys of a site must differ"),
    ],
)
def test_malformed_public_keys_are_refused(c: bytes, s: bytes, message: str) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match=message):
        PublicKeys(c, s)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop own", "did not return this site's own advert"),
        ("swap own", "did not return this site's own advert"),
        ("relabelled peer", "the advert routed as site 3 is site 2's"),
        ("duplicate keys", "site 3 advertised a public key already in use"),
        ("non-participant", r"adverts of non-participants: \[99\]"),
    ],
)
def test_site_checks_the_routed_adverts(change: str, message: str) -> None:
    # Prepare: a coordinator routes site 1 a doctored set of adverts ("duplicate keys":
    # site 3, say colluding, signed an advert of site 2's public keys).
    params = make_params(5)
    three = identity_keys(params.participants)[3]

    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        mine = dict(routed[1])
        if change == "drop own":
            del mine[1]
        elif change == "swap own":
            mine[1] = mine[2]
        elif change == "relabelled peer":
            mine[3] = mine[2]
        elif change == "duplicate keys":
            mine[3] = Advert.make(params, 3, public(three), mine[2].keys, three.sign)
        else:
            mine[99] = mine[2]
        routed[1] = mine
        return routed

    # Execute
    out = run_round(params, tamper={KEYS_ROUTED: hook})

    # Assert: refused before site 1 drew a seed or sealed anything.
    assert isinstance(out.error, SecAggError)
    assert re.search(message, str(out.error))
    assert out.sessions[1].stage == "advertised"
    assert out.sessions[1].b_seed == b""


def test_site_aborts_when_fewer_than_t_holders_advertised() -> None:
    # Prepare: the coordinator routes only two holders' adverts to site 1 (t = 4).
    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        routed[1] = {v: a for v, a in routed[1].items() if v in (1, 2)}
        return routed

    # Execute
    out = run_round(make_params(5), tamper={KEYS_ROUTED: hook})

    # Assert
    assert isinstance(out.error, SecAggAbort)
    assert "only 2 of 5 holders advertised keys, threshold is 4" in str(out.error)


@pytest.mark.parametrize("target", [1, 2], ids=["b share of alive", "s share of dropped"])
def test_an_unmask_share_altered_in_transit_is_rejected_and_the_round_completes(
    target: int,
) -> None:
    # Prepare: n = 7, t = 5; site 2 dropped before its masked input, so its s key is
    # rebuilt. The coordinator (or the network) alters one share holder 4 revealed; it
    # cannot re-sign the reply. (Before the holders signed their reveals and the dealers
    # their shares, this aborted the round with "shares are inconsistent"; now the
    # altered reply is set aside and the other five holders still suffice.)
    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        shares, signature = replies[4]
        replies[4] = ({**shares, target: flip(shares[target], -1)}, signature)
        return replies

    # Execute
    out = run_round(make_params(7), drop={MASKED: {2}}, tamper={UNMASK: hook})

    # Assert
    assert out.co.rejected == {4: "unmask shares whose signature does not verify"}
    assert out.alive == (1, 3, 4, 5, 6, 7)
    out.assert_correct()


def test_unmask_shares_for_the_wrong_sites_drop_that_reply() -> None:
    # Prepare: site 4 answers with an extra share for a site it does not hold (99).
    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        shares, signature = replies[4]
        replies[4] = ({**shares, 99: bytes(shamir.SHARE_BYTES)}, signature)
        return replies

    # Execute
    out = run_round(make_params(5), tamper={UNMASK: hook})

    # Assert: its reply is ignored; the others (4 = t) still hold enough shares.
    assert out.co.rejected == {4: "unmask shares for the wrong sites or of the wrong size"}
    out.assert_correct()


def test_unmask_shares_from_a_site_that_did_not_sign_are_ignored() -> None:
    # Prepare: n = 7; site 6 did not sign the survivor set, yet an unmask reply arrives
    # in its name.
    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        return {**replies, 6: replies[1]}

    # Execute
    out = run_round(make_params(7), drop={SIGNATURES: {6}}, tamper={UNMASK: hook})

    # Assert
    assert out.co.rejected == {6: "unmask shares from a site that was not asked"}
    out.assert_correct()


TEN_SITES = EncodingSpec(clip_norm=1.0, bits=8, num_sites=10, seed=2024, dim=1000)


def ten_site_round(**drop: Collection[int]) -> Outcome:
    """A realistic 10-site round (complete graph, t = 7) in which only sites 1..7 answer
    the unmask request: every secret is rebuilt from exactly t shares. ``drop`` adds
    dropouts at other stages (by stage name)."""
    spec = TEN_SITES
    rng = np.random.default_rng(7)
    encoded = [
        encode(rng.normal(0.0, 0.05, spec.dim), spec, rng).values for _ in range(spec.num_sites)
    ]
    params = make_params(10, k=spec.ring_bits, length=spec.encoded_length)
    assert params.threshold == 7
    inputs = dict(zip(params.participants, encoded, strict=True))
    gone = {stage: set(sites) for stage, sites in drop.items()}
    gone[UNMASK] = {8, 9, 10} - gone.get(MASKED, set())
    return run_round(params, inputs, drop=gone)


def test_untampered_round_with_exactly_t_shares_decodes() -> None:
    # Execute
    out = ten_site_round()

    # Assert
    out.assert_correct()
    assert len(out.messages[UNMASK]) == 7
    assert out.total is not None
    mean, weight = decode_sum(out.total, TEN_SITES, len(out.alive))
    assert weight == 10
    assert mean.shape == (TEN_SITES.dim,)


class CheatingDealer:
    """Makes site ``dealer`` deal one bad share: its ``secret`` ("b" or "s") share for
    ``holder`` moved by one (its lowest bit flipped), hashed and signed as it is dealt,
    so the holder and the coordinator accept it; only the rebuilt secret can show it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, dealer: int, secret: str, holder: int):
        real_split, real_share_keys = shamir.split, SiteSession.share_keys
        state = {"dealing": False, "calls": 0}
        which = 1 if secret == "b" else 2  # share_keys splits b first, then s

        def split(value: bytes, *, threshold: int, holders: Any) -> dict[int, bytes]:
            shares = real_split(value, threshold=threshold, holders=holders)
            if state["dealing"]:
                state["calls"] += 1
                if state["calls"] == which:
                    shares[holder] = flip(shares[holder], -1)
            return shares

        def share_keys(site: SiteSession, sign: Any) -> tuple[dict[int, bytes], dict[int, bytes]]:
            state["dealing"], state["calls"] = site.index == dealer, 0
            try:
                return real_share_keys(site, sign)
            finally:
                state["dealing"] = False

        monkeypatch.setattr(shamir, "split", split)
        monkeypatch.setattr(SiteSession, "share_keys", share_keys)


def test_a_bad_b_share_dealt_among_exactly_t_is_caught_by_the_commitment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: holder 7's coefficient among holders 1..7 is 1, so moving the share site 1
    # dealt it moves the rebuilt seed by +-1: still a valid 32-byte seed, and Shamir has
    # no extra share to check it against. Site 1 signed the bad share's hash, so holder
    # 7 and the coordinator accept it; the site's commitment to its seed (sent with its
    # masked input) is what catches it, and it blames the dealer.
    assert lagrange_at_zero(range(1, 8), 7) == 1
    CheatingDealer(monkeypatch, dealer=1, secret="b", holder=7)

    # Execute
    out = ten_site_round()

    # Assert
    assert isinstance(out.error, SecAggAbort)
    assert "site 1 dealt shares that do not rebuild the self-mask seed it committed to" in str(
        out.error
    )
    # No holder is blamed for the dealer's share; the dealer is, proven by its own
    # signed entries, and the coordinator will not ask it again.
    assert set(out.co.rejected) == out.co.cheaters == {1}
    assert out.co.rejected[1].startswith("cheated: it dealt shares of a self-mask seed")


def test_a_bad_b_share_dealt_among_more_than_t_makes_the_shares_inconsistent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: as above, but all 10 holders answer: the extra shares show it.
    CheatingDealer(monkeypatch, dealer=1, secret="b", holder=7)

    # Execute
    out = run_round(make_params(10))

    # Assert
    assert isinstance(out.error, SecAggAbort)
    assert "site 1's self-mask seed: shares are inconsistent" in str(out.error)
    assert str(out.error).endswith("; its dealer cheated")
    assert set(out.co.rejected) == out.co.cheaters == {1}


def test_a_bad_s_share_dealt_among_exactly_t_is_caught_by_the_public_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: site 10 drops before its masked input, sites 8 and 9 after it: site 10's
    # key is rebuilt from the t = 7 shares of holders 1..7, one of them dealt bad.
    CheatingDealer(monkeypatch, dealer=10, secret="s", holder=7)

    # Execute
    out = ten_site_round(masked={10})

    # Assert: the rebuilt key is checked against the advertised public key.
    assert isinstance(out.error, SecAggAbort)
    assert "dropped site 10 dealt shares that do not rebuild the key it advertised" in str(
        out.error
    )


def test_decode_sum_refuses_uniform_garbage_totals_at_ten_sites() -> None:
    # Prepare: totals as a wrong self mask leaves them, uniform in Z_(2^k); seeded.
    spec = TEN_SITES
    rng = np.random.default_rng(11)
    garbage = rng.integers(0, 1 << spec.ring_bits, (200, spec.encoded_length), dtype=np.uint64)

    # Execute
    refused = []
    for i, total in enumerate(garbage):
        summands = 6 + i % 5
        try:
            decode_sum(total, spec, summands)
        except ValueError as err:
            refused.append(str(err))
        # A garbage total that happens to carry the right weight still fails the range
        # check: each coordinate lies within +-summands * 127 with chance <= 0.62.
        total[-1] = summands
        with pytest.raises(ValueError, match="beyond"):
            decode_sum(total, spec, summands)

    # Assert: the weight check alone catches all but 1 in 4096.
    assert len(refused) == len(garbage)
    assert all("impossible" in msg or "beyond" in msg for msg in refused)
