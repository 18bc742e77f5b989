"""SecAgg+ rounds end to end through both state machines: the unmasked total is the
modular sum of the alive sites' inputs (complete and sparse graphs, real encodings,
dropouts at every stage), a masked input looks uniform to the coordinator, a site never
reveals both secrets of a peer, and tampered, replayed and malformed messages are
refused."""

from __future__ import annotations

import random
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
from common.secagg import shamir
from common.secagg.coordinator import CoordinatorSession
from common.secagg.errors import SecAggAbort, SecAggError
from common.secagg.params import (
    SEALED_BYTES,
    PublicKeys,
    SecAggParams,
    UnmaskRequest,
    default_degree,
)
from common.secagg.site import SiteSession
from tests.unit.common.secagg.rounds import (
    KEYS,
    KEYS_ROUTED,
    MASKED,
    REQUESTS,
    SHARES,
    SHARES_ROUTED,
    UNMASK,
    Hook,
    Outcome,
    chi_square_top_bits,
    flip,
    lagrange_at_zero,
    make_params,
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
    out.assert_correct()


@pytest.mark.parametrize("n", [3, 5, 12])
def test_real_encodings_decode_to_the_mean_of_clipped_deltas(n: int) -> None:
    # Prepare: real float deltas, some beyond the clip norm; one site drops before its
    # masked input, one after it (that one stays in the sum).
    rng = np.random.default_rng(n)
    spec = EncodingSpec(clip_norm=1.0, bits=8, num_sites=n, seed=41 + n, dim=300)
    deltas = {u: rng.normal(0.0, 0.1 * u, spec.dim) for u in range(1, n + 1)}
    encoded = {u: encode(d, spec, np.random.default_rng(100 + u)) for u, d in deltas.items()}
    params = make_params(n, k=spec.ring_bits, length=spec.encoded_length)
    gone_before, gone_after = {n}, {n - 1} if n > 3 else set()

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


@pytest.mark.parametrize("gone", [{5}, {1, 3}])
def test_sites_dropping_after_masked_input_stay_in_the_sum(gone: set[int]) -> None:
    # Prepare: n = 5, t = 3: up to n - t = 2 sites may skip the unmask reply.
    params = make_params(5)
    assert params.threshold == 3

    # Execute
    out = run_round(params, drop={UNMASK: gone})

    # Assert
    assert out.alive == params.participants
    assert gone <= set(out.alive)
    out.assert_correct()


@pytest.mark.parametrize("gone", [{2}, {1, 5}])
def test_sites_dropping_before_masked_input_are_excluded_and_unmasked(gone: set[int]) -> None:
    # Prepare
    params = make_params(5)

    # Execute
    out = run_round(params, drop={MASKED: gone})

    # Assert: their pairwise masks (in the others' inputs) were rebuilt and removed.
    assert set(out.alive) == set(params.participants) - gone
    assert out.co.shared == set(params.participants)
    out.assert_correct()
    assert out.total is not None
    assert not np.array_equal(out.total, out.plain_sum(params.participants))


def test_dropouts_at_every_stage_together() -> None:
    # Prepare: n = 7, t = 4.
    params = make_params(7)
    assert params.threshold == 4

    # Execute
    out = run_round(params, drop={SHARES: {7}, MASKED: {1}, UNMASK: {4}})

    # Assert
    assert out.alive == (2, 3, 4, 5, 6)
    out.assert_correct()


@pytest.mark.parametrize(
    ("stage", "raised_by"),
    [
        (KEYS, "after advertise keys"),
        (SHARES, "after share keys"),
        (MASKED, "after masked input"),
        (UNMASK, "only 2 shares of site 1's self-mask seed"),
    ],
)
def test_too_many_dropouts_abort_at_that_stage(stage: str, raised_by: str) -> None:
    # Prepare: n = 5, t = 3; three sites vanish, leaving 2 < t holders.
    params = make_params(5)

    # Execute
    out = run_round(params, drop={stage: {3, 4, 5}})

    # Assert
    assert isinstance(out.error, SecAggAbort)
    assert raised_by in str(out.error)
    assert out.total is None


def test_sparse_graph_with_dropouts_at_every_stage() -> None:
    # Prepare: n = 30, degree 16, t = 9; a few sites vanish at each stage.
    params = make_params(30, k=24, length=32)
    assert params.degree < 29

    # Execute
    out = run_round(
        params, drop={KEYS: {30}, SHARES: {2, 17}, MASKED: {5, 11, 23}, UNMASK: {1, 8, 19}}
    )

    # Assert
    assert set(out.alive) == set(range(1, 31)) - {30, 2, 17, 5, 11, 23}
    assert {1, 8, 19} <= set(out.alive)
    out.assert_correct()


def test_sparse_graph_aborts_when_one_site_loses_its_holders() -> None:
    # Prepare: every neighbour of site 1 but t - 2 skips the masked input, so site 1's
    # secrets have t - 1 live holders (itself included) although most sites are alive.
    params = make_params(30, k=24, length=8)
    gone = set(params.neighbours(1)[: params.degree - (params.threshold - 2)])

    # Execute
    out = run_round(params, drop={MASKED: gone})

    # Assert
    assert isinstance(out.error, SecAggAbort)
    assert "after masked input" in str(out.error)
    assert f"{params.threshold - 1} live holders" in str(out.error)


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


def paused_at_unmask(n: int = 5, **drop: Collection[int]) -> Outcome:
    """A round whose sites have sent their masked inputs and await the unmask request."""
    out = run_round(make_params(n), drop={MASKED: drop.get("masked", ())}, until=REQUESTS)
    assert out.error is None
    return out


def test_a_site_answers_only_one_unmask_request() -> None:
    # Prepare
    out = paused_at_unmask()
    request = out.messages[REQUESTS][1]
    out.sessions[1].unmask(request)

    # Execute / Assert
    with pytest.raises(SecAggError, match="unmask is not allowed at stage 'done'"):
        out.sessions[1].unmask(request)


def test_unmask_request_naming_a_site_alive_and_dropped_is_refused() -> None:
    # Prepare
    out = paused_at_unmask()

    # Execute / Assert
    with pytest.raises(SecAggError, match=r"both alive and dropped: \[3\]"):
        out.sessions[1].unmask(UnmaskRequest(alive=(1, 2, 3, 4, 5), dropped=(3,)))
    assert out.sessions[1].stage == "masked"  # refused without revealing anything


def test_unmask_request_not_counting_the_site_as_alive_is_refused() -> None:
    # Prepare
    out = paused_at_unmask()

    # Execute / Assert
    with pytest.raises(SecAggError, match="does not count this site as alive"):
        out.sessions[1].unmask(UnmaskRequest(alive=(2, 3, 4, 5), dropped=(1,)))


def test_unmask_request_naming_unknown_sites_is_refused() -> None:
    # Prepare
    out = paused_at_unmask()

    # Execute / Assert
    with pytest.raises(SecAggError, match=r"unknown sites: \[9\]"):
        out.sessions[1].unmask(UnmaskRequest(alive=(1, 2, 3, 4, 5), dropped=(9,)))


def test_unmask_request_with_fewer_than_t_alive_aborts() -> None:
    # Prepare
    out = paused_at_unmask()

    # Execute / Assert
    with pytest.raises(SecAggAbort, match="only 2 masked inputs, threshold is 3"):
        out.sessions[1].unmask(UnmaskRequest(alive=(1, 2), dropped=(3, 4, 5)))


def test_unmask_reveals_the_b_share_of_alive_and_the_s_share_of_dropped_peers() -> None:
    # Prepare: site 2 shared its keys but sent no masked input.
    out = paused_at_unmask(masked={2})
    requests = out.messages[REQUESTS]
    assert set(requests) == {1, 3, 4, 5}

    # Execute
    replies = {u: out.sessions[u].unmask(requests[u]) for u in requests}

    # Assert: one share per peer, of 66 bytes; all together they rebuild b of every alive
    # site and the s key of the dropped one, and nothing else.
    t = out.params.threshold
    for holder, reply in replies.items():
        assert set(reply) == set(out.params.holders(holder))
        assert all(len(share) == shamir.SHARE_BYTES for share in reply.values())
    for v in out.params.participants:
        shares = {holder: reply[v] for holder, reply in replies.items()}
        secret = shamir.combine(shares, threshold=t)
        if v == 2:
            assert secret == out.sessions[v].s_private
            assert secret != out.sessions[v].b_seed
        else:
            assert secret == out.sessions[v].b_seed
            assert secret != out.sessions[v].s_private


@pytest.mark.parametrize("told_dropped", [{4}, {3, 4}, {2, 3, 4}, {1, 2, 3, 4}])
def test_a_lying_coordinator_rebuilds_at_most_one_secret_of_a_site(told_dropped: set[int]) -> None:
    # Prepare: site 5 sent its masked input; the coordinator tells some holders it is
    # alive (revealing b_5 shares) and the others that it dropped (revealing s_5 shares).
    out = paused_at_unmask()
    everyone = out.params.participants
    t = out.params.threshold
    requests = {
        u: UnmaskRequest(alive=tuple(v for v in everyone if v != 5), dropped=(5,))
        if u in told_dropped
        else UnmaskRequest(alive=everyone, dropped=())
        for u in everyone
    }

    # Execute
    replies = {u: out.sessions[u].unmask(r) for u, r in requests.items()}

    # Assert: a strict-majority threshold leaves it short of t shares of one of them.
    b_shares = {u: replies[u][5] for u in everyone if u not in told_dropped}
    s_shares = {u: replies[u][5] for u in told_dropped}
    assert len(b_shares) < t or len(s_shares) < t
    if len(b_shares) >= t:
        assert shamir.combine(b_shares, threshold=t) == out.sessions[5].b_seed
    if len(s_shares) >= t:
        assert shamir.combine(s_shares, threshold=t) == out.sessions[5].s_private


def test_site_refuses_masked_input_before_share_keys() -> None:
    # Prepare
    params = make_params(3)
    site, _ = SiteSession.start(params, 1)

    # Execute / Assert
    with pytest.raises(SecAggError, match="masked input is not allowed at stage 'advertised'"):
        site.masked_input({}, np.zeros(params.vector_length, dtype=np.uint64))


def test_site_refuses_unmask_before_masked_input() -> None:
    # Prepare
    out = run_round(make_params(3), until=SHARES_ROUTED)

    # Execute / Assert
    with pytest.raises(SecAggError, match="unmask is not allowed at stage 'shared'"):
        out.sessions[1].unmask(UnmaskRequest(alive=(1, 2, 3), dropped=()))


def test_site_refuses_to_share_keys_twice() -> None:
    # Prepare
    out = run_round(make_params(3), until=SHARES_ROUTED)

    # Execute / Assert
    with pytest.raises(SecAggError, match="share keys is not allowed at stage 'shared'"):
        out.sessions[1].share_keys(out.messages[KEYS_ROUTED][1])


def test_coordinator_refuses_masked_inputs_before_shares() -> None:
    # Prepare
    out = run_round(make_params(3), until=KEYS_ROUTED)

    # Execute / Assert
    with pytest.raises(SecAggError, match="coordinator expected stage 'share', got 'masked'"):
        out.co.receive_masked({})


@pytest.mark.parametrize("call", ["keys_again", "unmask_early"])
def test_coordinator_enforces_stage_order(call: str) -> None:
    # Prepare
    out = run_round(make_params(3), until=KEYS_ROUTED)

    # Execute / Assert
    with pytest.raises(SecAggError, match="coordinator expected stage 'share'"):
        if call == "keys_again":
            out.co.receive_keys(out.messages[KEYS])
        else:
            out.co.receive_unmask({})


# ---- 5. tampering and replays ---------------------------------------------------------


def tamper_one(stage_messages: dict[int, Any], receiver: int, sender: int, new: bytes) -> None:
    stage_messages[receiver] = {**stage_messages[receiver], sender: new}


@pytest.mark.parametrize("index", [0, 11, 12, 50, SEALED_BYTES - 1])
def test_flipped_bit_in_a_routed_share_is_refused_naming_the_sender(index: int) -> None:
    # Prepare
    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        tamper_one(routed, 3, 1, flip(routed[3][1], index))
        return routed

    # Execute
    out = run_round(make_params(5), tamper={SHARES_ROUTED: hook})

    # Assert
    assert isinstance(out.error, SecAggError)
    assert "sealed shares from site 1: ciphertext failed authentication" in str(out.error)
    assert out.sessions[3].stage == "shared"


def test_a_site_refusing_a_tampered_share_drops_out_and_the_round_completes() -> None:
    # Prepare: site 3 refuses site 1's tampered share and so sends no masked input.
    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        tamper_one(routed, 3, 1, flip(routed[3][1], 20))
        return routed

    # Execute
    out = run_round(make_params(5), tamper={SHARES_ROUTED: hook}, site_errors="drop")

    # Assert
    assert set(out.site_errors) == {3}
    assert "sealed shares from site 1" in str(out.site_errors[3])
    assert out.alive == (1, 2, 4, 5)
    out.assert_correct()


def test_share_routed_to_the_wrong_site_is_refused() -> None:
    # Prepare: site 1's share for site 2 is handed to site 3 as site 1's share for it.
    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        tamper_one(routed, 3, 1, routed[2][1])
        return routed

    # Execute
    out = run_round(make_params(5), tamper={SHARES_ROUTED: hook})

    # Assert
    assert isinstance(out.error, SecAggError)
    assert "sealed shares from site 1: ciphertext failed authentication" in str(out.error)


def test_shares_from_another_round_are_refused() -> None:
    # Prepare: round 1 and round 2 have different sessions (and fresh keys).
    first = run_round(make_params(3), until=SHARES_ROUTED)
    second = run_round(make_params(3), until=SHARES_ROUTED)
    assert first.params.session != second.params.session

    # Execute / Assert
    with pytest.raises(SecAggError, match="sealed shares from site 1: ciphertext failed"):
        second.sessions[2].masked_input(first.messages[SHARES_ROUTED][2], second.inputs[2])


def test_shares_replayed_into_a_session_reusing_the_same_keys_are_refused() -> None:
    # Prepare: even if every site re-used its round-1 key pairs in round 2, the round-1
    # ciphertexts do not open: keys and associated data are bound to the session.
    first = run_round(make_params(3), until=SHARES_ROUTED)
    params = make_params(3)
    sessions = {
        u: SiteSession(params, u, "advertised", s.c_private, s.s_private)
        for u, s in first.sessions.items()
    }
    routed = CoordinatorSession(params).receive_keys(first.messages[KEYS])
    for u, site in sessions.items():
        site.share_keys(routed[u])

    # Execute / Assert
    with pytest.raises(SecAggError, match="sealed shares from site 1: ciphertext failed"):
        sessions[2].masked_input(first.messages[SHARES_ROUTED][2], first.inputs[2])


@pytest.mark.parametrize("change", ["short", "long", "not bytes"])
def test_sealed_share_of_the_wrong_length_drops_the_sender(change: str) -> None:
    # Prepare
    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        blob = replies[2][4]
        bad = {"short": blob[:-1], "long": blob + b"\0", "not bytes": bytearray(blob)}[change]
        tamper_one(replies, 2, 4, bad)
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
        replies[2] = {v: blob for v, blob in replies[2].items() if v != 4}
        return replies

    # Execute
    out = run_round(make_params(5), tamper={SHARES: hook})

    # Assert
    assert out.co.rejected[2] == "shares addressed to the wrong set of sites"
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


def test_masked_input_from_a_site_that_did_not_share_is_ignored() -> None:
    # Prepare: site 2 skipped the share stage but sends a masked input anyway.
    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        replies[2] = replies[1]
        return replies

    # Execute
    out = run_round(make_params(5), drop={SHARES: {2}}, tamper={MASKED: hook})

    # Assert
    assert out.co.rejected[2] == "masked input from a site that did not share keys"
    assert out.alive == (1, 3, 4, 5)
    out.assert_correct()


def test_keys_from_a_non_participant_are_rejected() -> None:
    # Prepare
    params = make_params(5)
    _, intruder = SiteSession.start(make_params(10), 9)

    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        return {**replies, 9: intruder}

    # Execute
    out = run_round(params, tamper={KEYS: hook})

    # Assert
    assert out.co.rejected == {9: "keys from a site that is not a participant"}
    assert out.alive == params.participants
    out.assert_correct()


@pytest.mark.parametrize("reuse", ["both", "c", "s", "c as s"])
def test_duplicated_public_keys_are_rejected(reuse: str) -> None:
    # Prepare: site 4 advertises (part of) site 2's keys.
    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        two, four = replies[2], replies[4]
        replies[4] = {
            "both": two,
            "c": PublicKeys(two.c, four.s),
            "s": PublicKeys(four.c, two.s),
            "c as s": PublicKeys(four.c, two.c),
        }[reuse]
        return replies

    # Execute
    out = run_round(make_params(5), tamper={KEYS: hook})

    # Assert
    assert out.co.rejected == {4: "public key already advertised by site 2"}
    assert 4 not in out.co.keys
    assert out.alive == (1, 2, 3, 5)
    out.assert_correct()


LOW_ORDER_POINT = bytes(32)  # X25519's zero point: agree() refuses it


@pytest.mark.parametrize("which", ["c", "s"])
def test_a_low_order_public_key_is_refused_where_its_sender_is_known(which: str) -> None:
    # Prepare: a site advertising a low-order point would make every peer's key
    # agreement fail; the key is refused when parsed, so the sender is dropped alone.
    genuine = SiteSession.start(make_params(5), 5)[1]
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
        ("drop own", "did not return this site's own public keys"),
        ("swap own", "did not return this site's own public keys"),
        ("duplicate peer", "advertised a public key already in use"),
        ("non-neighbour", r"keys from sites that are not neighbours: \[99\]"),
    ],
)
def test_site_checks_the_routed_public_keys(change: str, message: str) -> None:
    # Prepare
    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        mine = dict(routed[1])
        if change == "drop own":
            del mine[1]
        elif change == "swap own":
            mine[1] = mine[2]
        elif change == "duplicate peer":
            mine[3] = mine[2]
        else:
            mine[99] = mine[2]
        routed[1] = mine
        return routed

    # Execute
    out = run_round(make_params(5), tamper={KEYS_ROUTED: hook})

    # Assert
    assert isinstance(out.error, SecAggError)
    assert re.search(message, str(out.error))


def test_site_aborts_when_fewer_than_t_holders_advertised() -> None:
    # Prepare: the coordinator routes only two holders' keys to site 1 (t = 3).
    def hook(routed: dict[int, Any]) -> dict[int, Any]:
        routed[1] = {v: pk for v, pk in routed[1].items() if v in (1, 2)}
        return routed

    # Execute
    out = run_round(make_params(5), tamper={KEYS_ROUTED: hook})

    # Assert
    assert isinstance(out.error, SecAggAbort)
    assert "only 2 of 5 holders advertised keys, threshold is 3" in str(out.error)


@pytest.mark.parametrize("target", [1, 2], ids=["b share of alive", "s share of dropped"])
def test_tampered_unmask_share_with_more_than_t_shares_aborts(target: int) -> None:
    # Prepare: n = 5, t = 3; site 2 dropped before its masked input, so its s key is
    # rebuilt; every survivor answers, so each secret has 4 > t shares.
    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        tamper_one(replies, 4, target, flip(replies[4][target], -1))
        return replies

    # Execute
    out = run_round(make_params(5), drop={MASKED: {2}}, tamper={UNMASK: hook})

    # Assert
    assert isinstance(out.error, SecAggAbort)
    assert "shares are inconsistent" in str(out.error)
    assert out.total is None


def test_unmask_shares_for_the_wrong_sites_drop_that_reply() -> None:
    # Prepare: site 4 answers with an extra share for a site it does not hold (99).
    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        replies[4] = {**replies[4], 99: bytes(shamir.SHARE_BYTES)}
        return replies

    # Execute
    out = run_round(make_params(5), tamper={UNMASK: hook})

    # Assert: its reply is ignored; the others still hold enough shares.
    assert out.co.rejected[4] == "unmask shares for the wrong sites or of the wrong size"
    out.assert_correct()


TEN_SITES = EncodingSpec(clip_norm=1.0, bits=8, num_sites=10, seed=2024, dim=1000)


def ten_site_round_with_exactly_t_replies(**tamper: Hook) -> Outcome:
    """A realistic 10-site round (t = 6) where only sites 1..6 answer the unmask request:
    every secret is rebuilt from exactly t shares."""
    spec = TEN_SITES
    rng = np.random.default_rng(7)
    encoded = [
        encode(rng.normal(0.0, 0.05, spec.dim), spec, rng).values for _ in range(spec.num_sites)
    ]
    params = make_params(10, k=spec.ring_bits, length=spec.encoded_length)
    assert params.threshold == 6
    inputs = dict(zip(params.participants, encoded, strict=True))
    return run_round(params, inputs, drop={UNMASK: {7, 8, 9, 10}}, tamper=tamper)


def test_tampered_b_share_with_exactly_t_shares_is_caught_by_the_commitment() -> None:
    # Prepare: holder 6's coefficient among holders 1..6 is -1, so flipping the lowest
    # bit of its share of site 1's self-mask seed moves the rebuilt seed by +-1: still a
    # valid 32-byte seed, and Shamir has no extra share to check it against; the site's
    # commitment to its seed (sent with its masked input) is what catches it.
    assert lagrange_at_zero(range(1, 7), 6) == shamir.PRIME - 1

    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        tamper_one(replies, 6, 1, flip(replies[6][1], -1))
        return replies

    # Execute
    out = ten_site_round_with_exactly_t_replies(unmask=hook)

    # Assert
    assert isinstance(out.error, SecAggAbort)
    assert "site 1's rebuilt self-mask seed does not match its commitment" in str(out.error)


def test_untampered_round_with_exactly_t_shares_decodes() -> None:
    # Execute
    out = ten_site_round_with_exactly_t_replies()

    # Assert
    out.assert_correct()
    assert out.total is not None
    mean, weight = decode_sum(out.total, TEN_SITES, len(out.alive))
    assert weight == 10
    assert mean.shape == (TEN_SITES.dim,)


def test_tampered_s_share_with_exactly_t_shares_aborts() -> None:
    # Prepare: site 10 drops before its masked input, sites 7..9 after it: site 10's key
    # is rebuilt from the t = 6 shares of holders 1..6, one of them tampered.
    spec = TEN_SITES
    params = make_params(10, k=spec.ring_bits, length=spec.encoded_length)

    def hook(replies: dict[int, Any]) -> dict[int, Any]:
        tamper_one(replies, 6, 10, flip(replies[6][10], -1))
        return replies

    # Execute
    out = run_round(params, drop={MASKED: {10}, UNMASK: {7, 8, 9}}, tamper={UNMASK: hook})

    # Assert: the rebuilt key is checked against the advertised public key.
    assert isinstance(out.error, SecAggAbort)
    assert "dropped site 10's rebuilt key does not match its public key" in str(out.error)


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


def _ring_order(params: SecAggParams) -> list[int]:
    """The public permutation the neighbour graph is laid out on (params.neighbours)."""
    order = list(params.participants)
    random.Random(params.session).shuffle(order)
    return order


def test_dropouts_that_cut_the_neighbour_graph_abort_before_any_share_is_revealed() -> None:
    # Attack (issue 13): with degree 2, two dropouts (an active coordinator causes them by
    # ignoring replies) cut the ring into two arcs whose masks cancel on their own; with
    # one colluder in an arc of two, the victim's update was recovered.
    params = make_params(8, degree=2)
    order = _ring_order(params)

    out = run_round(params, drop={MASKED: {order[0], order[4]}})

    assert isinstance(out.error, SecAggAbort)
    assert "falls into 2 pieces" in str(out.error)
    assert UNMASK not in out.messages  # no site revealed anything


def test_a_site_refuses_an_unmask_request_whose_alive_sites_fall_apart() -> None:
    # The coordinator is the party guarded against: each site checks too.
    params = make_params(8, degree=2)
    order = _ring_order(params)
    out = run_round(params, drop={MASKED: {order[0], order[4]}}, until=MASKED)
    alive = tuple(sorted(set(order) - {order[0], order[4]}))
    request = UnmaskRequest(alive=alive, dropped=(order[0], order[4]))

    with pytest.raises(SecAggAbort, match="falls into 2 pieces"):
        out.sessions[order[1]].unmask(request)
