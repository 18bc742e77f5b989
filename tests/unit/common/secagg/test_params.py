"""The public parameters of a round: thresholds below the active-security bound and bad
degrees refused, safe defaults and the colluders they tolerate, JSON round trips, and a
neighbour graph that is fixed only by the graph seed (not by the coordinator's session
string), symmetric, regular and the same for everyone who derives it."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.secagg.coordinator import CoordinatorSession
from common.secagg.errors import SecAggError
from common.secagg.params import (
    SecAggParams,
    active_threshold,
    default_degree,
    default_threshold,
    tolerated_colluders,
)
from common.secagg.site import SiteSession
from tests.unit.common.secagg.rounds import (
    FAST,
    identity_keys,
    make_params,
    public,
    roster_of,
)

SEEDS = st.binary(min_size=32, max_size=32)


def raw_params(participants: tuple[int, ...], threshold: int, degree: int, **kw: Any) -> None:
    fields: dict[str, Any] = {"session": "s", "ring_bits": 16, "vector_length": 8}
    fields.update(kw)
    SecAggParams(participants=participants, threshold=threshold, degree=degree, **fields)


@pytest.mark.parametrize(
    ("n", "degree", "threshold"),
    [
        (5, 4, 2),  # t <= holders / 2
        (4, 3, 2),  # t == holders / 2
        (5, 4, 3),  # a strict majority, but not more than 2/3 of the holders
        (10, 9, 6),  # ditto
        (30, 16, 8),  # t <= holders / 2, sparse
        (30, 16, 11),  # 11 <= 2 * 17 / 3, sparse
        (2, 1, 1),  # t < 2
        (5, 4, 0),
        (5, 4, 6),  # t > holders
        (30, 16, 18),
    ],
)
def test_params_refuse_an_unsafe_threshold(n: int, degree: int, threshold: int) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match=f"threshold {threshold} is unsafe for"):
        raw_params(tuple(range(1, n + 1)), threshold, degree)


@pytest.mark.parametrize(("n", "degree"), [(10, 3), (10, 7), (10, 0), (10, 10), (5, -2)])
def test_params_refuse_a_bad_degree(n: int, degree: int) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match="degree must be n - 1"):
        raw_params(tuple(range(1, n + 1)), 3, degree)


@pytest.mark.parametrize(
    ("participants", "message"),
    [
        ((), "at least 2 sites, got 0"),
        ((1,), "at least 2 sites, got 1"),
        ((1, 1, 2), "distinct integers"),
        ((1, 2, 2), "distinct integers"),
        ((0, 1, 2), "distinct integers"),
        ((1, 2, 2**31), "distinct integers"),
        ((True, 2, 3), "distinct integers"),
        ((1, 2.0, 3), "distinct integers"),
        ((2, 1, 3), "must be sorted"),
    ],
)
def test_params_refuse_bad_participants(participants: tuple[Any, ...], message: str) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match=message):
        raw_params(participants, 2, len(participants) - 1)


@pytest.mark.parametrize(
    ("field_values", "message"),
    [
        ({"session": ""}, "session must be a non-empty string"),
        ({"session": "x" * 201}, "session must be a non-empty string"),
        ({"ring_bits": 0}, "ring_bits must be in 1..64"),
        ({"ring_bits": 65}, "ring_bits must be in 1..64"),
        ({"vector_length": 0}, "vector_length must be >= 1"),
    ],
)
def test_params_refuse_bad_fields(field_values: dict[str, Any], message: str) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match=message):
        raw_params((1, 2, 3), 3, 2, **field_values)


@pytest.mark.parametrize(
    ("n", "degree", "threshold", "tolerated"),
    [
        (2, 1, 2, 0),  # the other site learns the victim's input from any sum
        (3, 2, 3, 1),  # capped at t - 2 (2t - holders - 1 = 2)
        (4, 3, 3, 1),
        (5, 4, 4, 2),
        (7, 6, 5, 2),
        (10, 9, 7, 3),
        (30, 16, 12, 6),
        (100, 20, 15, 8),
    ],
)
def test_defaults_are_safe(n: int, degree: int, threshold: int, tolerated: int) -> None:
    # Execute
    params = make_params(n)

    # Assert: t > 2/3 of the degree + 1 holders (Bonawitz et al. 2017, active server).
    assert (default_degree(n), params.degree) == (degree, degree)
    assert (default_threshold(degree + 1), params.threshold) == (threshold, threshold)
    assert 3 * params.threshold > 2 * (degree + 1)
    assert params.tolerated == tolerated_colluders(degree + 1, threshold) == tolerated


def test_default_threshold_can_be_raised_but_not_lowered() -> None:
    # Execute / Assert: 7 = 2 * 10 // 3 + 1 is the floor for 10 holders.
    assert default_threshold(10, 0.8) == 8
    assert default_threshold(10, 0.1) == 7
    assert default_threshold(10, 1.0) == 10
    assert default_threshold(2, 0.0) == 2


def _split_attack_works(holders: int, threshold: int, colluders: int) -> bool:
    """Whether an active coordinator with ``colluders`` colluding holders of a victim can
    get ``threshold`` shares of both its secrets: it splits the honest holders into
    those told the victim is alive (they, the victim among them, sign that set and
    reveal b shares) and those told it dropped (s shares); each group needs ``threshold``
    signatures on its own set and ``threshold`` shares, the colluders counting in both."""
    honest = holders - colluders
    return any(
        alive_group >= 1  # the victim is always told it is alive
        and alive_group + colluders >= threshold
        and honest - alive_group + colluders >= threshold
        for alive_group in range(honest + 1)
    )


def _small_sum_attack_works(holders: int, threshold: int, colluders: int) -> bool:
    """Whether the coordinator can keep only the victim and the colluders alive and
    still have every check pass: that survivor set must hold ``threshold`` sites (and
    each survivor ``threshold`` signing holders), so ``colluders + 1 >= threshold``.
    The honest protocol then unmasks a sum of the victim's input and the colluders'
    own, which they subtract."""
    return colluders <= holders - 1 and colluders + 1 >= threshold


def _attack_works(holders: int, threshold: int, colluders: int) -> bool:
    return _split_attack_works(holders, threshold, colluders) or _small_sum_attack_works(
        holders, threshold, colluders
    )


@pytest.mark.parametrize("holders", range(2, 31))
def test_tolerated_colluders_is_the_largest_number_the_attack_fails_with(holders: int) -> None:
    # Execute / Assert: for every valid threshold, by brute force over the splits and
    # the survivor sets of the victim and colluders alone. The bound is tight for every
    # threshold: one more colluder (still at most holders - 1, the victim is honest)
    # breaks the victim by one attack or the other.
    for threshold in range(active_threshold(holders), holders + 1):
        c = tolerated_colluders(holders, threshold)
        assert c <= threshold - 2
        assert not any(_attack_works(holders, threshold, k) for k in range(c + 1))
        assert c + 1 <= holders - 1
        assert _attack_works(holders, threshold, c + 1)


@pytest.mark.parametrize("holders", range(2, 31))
def test_the_cap_at_t_minus_2_is_what_stops_the_small_sum_attack(holders: int) -> None:
    # Execute / Assert: where the split attack alone would tolerate more (t = holders:
    # 2t - holders - 1 = holders - 1 > t - 2), the survivor set of the victim and t - 1
    # colluders is what breaks it; with at most t - 2 colluders every survivor set of
    # t sites holds at least two honest inputs.
    for threshold in range(active_threshold(holders), holders + 1):
        split_only = max(0, 2 * threshold - holders - 1)
        c = tolerated_colluders(holders, threshold)
        if split_only > threshold - 2:
            assert c == threshold - 2
            assert not _split_attack_works(holders, threshold, threshold - 1)
            assert _small_sum_attack_works(holders, threshold, threshold - 1)
        assert threshold - c >= 2  # honest sites in any survivor set of t


@pytest.mark.parametrize("holders", range(2, 61))
def test_the_active_threshold_tolerates_a_third_of_the_holders(holders: int) -> None:
    # Execute
    t = active_threshold(holders)

    # Assert: the least threshold above 2/3; it tolerates fewer than a third colluding
    # (at least one once there are 3 holders; none of 2, where the other site learns
    # the victim's input from the sum), and one less would tolerate fewer.
    assert 3 * t > 2 * holders and (t == 2 or 3 * (t - 1) <= 2 * holders)
    if holders == 2:
        assert tolerated_colluders(holders, t) == 0
    else:
        assert tolerated_colluders(holders, t) >= max(1, (holders - 1) // 3)
    if t > 2:
        assert tolerated_colluders(holders, t - 1) < tolerated_colluders(holders, t)


@FAST
@given(
    n=st.integers(2, 60),
    k=st.integers(1, 64),
    length=st.integers(1, 10_000),
    seed=st.none() | SEEDS,
)
def test_params_json_round_trip(n: int, k: int, length: int, seed: bytes | None) -> None:
    # Prepare: as the coordinator sends them, or with the graph the adverts fixed.
    params = make_params(n, k=k, length=length)
    if seed is not None:
        params = params.with_graph(seed)

    # Execute
    again = SecAggParams.from_json(params.to_json())

    # Assert
    assert again == params


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "null",
        "[]",
        '{"session": "x"}',
        '{"session": "x", "participants": 5, "threshold": 2, "degree": 1, '
        '"ring_bits": 8, "vector_length": 4}',
        '{"session": "x", "participants": [1, 2], "threshold": "two", "degree": 1, '
        '"ring_bits": 8, "vector_length": 4}',
        '{"session": "x", "participants": [1, 2], "threshold": 2, "degree": 1, '
        '"ring_bits": 8, "vector_length": 4, "graph": 7}',
    ],
)
def test_params_from_malformed_json_are_refused(text: str) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match="secagg parameters are malformed"):
        SecAggParams.from_json(text)


def test_params_from_json_keep_the_validation() -> None:
    # Prepare
    text = make_params(5).to_json().replace('"threshold": 4', '"threshold": 3')
    assert '"threshold": 3' in text

    # Execute / Assert
    with pytest.raises(SecAggError, match="threshold 3 is unsafe"):
        SecAggParams.from_json(text)


@pytest.mark.parametrize("graph", ["ab" * 31, "AB" * 32, "ab" * 31 + "-x", " " + "a" * 63])
def test_params_refuse_a_malformed_graph_seed(graph: str) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match="graph seed must be 64 lowercase hex digits"):
        raw_params((1, 2, 3), 3, 2, graph=graph)


def test_the_graph_is_fixed_once_and_bound_into_the_context() -> None:
    # Prepare
    params = make_params(30)
    fixed = params.with_graph(bytes(range(32)))

    # Execute / Assert
    assert params.graph == "" and fixed.graph == bytes(range(32)).hex()
    assert fixed.context != params.context and fixed.context.startswith(params.context)
    with pytest.raises(SecAggError, match="already fixed"):
        fixed.with_graph(bytes(32))


@pytest.mark.parametrize(
    "change",
    [
        {"participants": (1, 2, 3, 4, 6)},
        {"threshold": 5},
        {"ring_bits": 17},
        {"vector_length": 65},
    ],
    ids=lambda change: next(iter(change)),
)
def test_params_differing_only_in_public_fields_do_not_mix(change: dict[str, Any]) -> None:
    # Attack (review F6): the coordinator hands two sites parameters for the same
    # session that differ in one public field (other participants, a lower threshold,
    # another ring), so that what one site signs could pass at the other. The context
    # hashes every public parameter, so nothing signed under one verifies under the
    # other.
    ours = make_params(5, session="one session")
    theirs = replace(ours, **change)
    assert theirs.session == ours.session and theirs != ours
    keys = identity_keys((1, 2))
    roster = roster_of(keys)

    # Execute
    site_1, advert_1 = SiteSession.start(ours, 1, public(keys[1]), keys[1].sign)
    site_2, advert_2 = SiteSession.start(theirs, 2, public(keys[2]), keys[2].sign)

    # Assert
    assert ours.context != theirs.context
    assert advert_1.verifies(ours) and not advert_1.verifies(theirs)
    assert advert_2.verifies(theirs) and not advert_2.verifies(ours)
    with pytest.raises(SecAggError, match=r"site 2's advert \(site-2\) does not verify"):
        site_1.check_adverts({1: advert_1, 2: advert_2}, roster, min_sites=2)
    with pytest.raises(SecAggError, match=r"site 1's advert \(site-1\) does not verify"):
        site_2.check_adverts({1: advert_1, 2: advert_2}, roster, min_sites=2)
    assert (site_1.stage, site_2.stage) == ("advertised", "advertised")
    co = CoordinatorSession(ours)
    with pytest.raises(SecAggError, match="only 1 sites advertised keys"):
        co.receive_adverts({1: advert_1, 2: advert_2})
    assert co.rejected == {2: "an advert whose signature does not verify"}


@st.composite
def sparse_graphs(draw: st.DrawFn) -> SecAggParams:
    n = draw(st.integers(5, 80))
    degree = 2 * draw(st.integers(1, (n - 2) // 2))
    session = draw(st.text(min_size=1, max_size=20))
    return make_params(n, degree=degree, session=session).with_graph(draw(SEEDS))


@FAST
@given(params=sparse_graphs())
def test_sparse_neighbours_are_symmetric_regular_and_deterministic(params: SecAggParams) -> None:
    # Execute
    graph = {u: params.neighbours(u) for u in params.participants}

    # Assert
    again = SecAggParams.from_json(params.to_json())
    for u, near in graph.items():
        assert len(near) == params.degree
        assert u not in near
        assert all(u in graph[v] for v in near)
        assert params.holders(u) == tuple(sorted((*near, u)))
        assert params.neighbours(u) == near == again.neighbours(u)


def test_neighbours_depend_on_the_graph_seed_not_the_session() -> None:
    # Prepare: the coordinator picks the session; the sites' adverts pick the seed.
    params = make_params(30, session="round-1")
    a, b = params.with_graph(bytes(32)), params.with_graph(b"\x01" * 32)
    c = make_params(30, session="round-2").with_graph(bytes(32))

    # Execute
    graphs = [[p.neighbours(u) for u in p.participants] for p in (a, b, c)]

    # Assert
    assert graphs[0] != graphs[1]
    assert graphs[0] == graphs[2]


def test_sparse_neighbours_are_refused_before_the_graph_is_fixed() -> None:
    # Prepare
    params = make_params(30)
    assert params.degree < 29

    # Execute / Assert
    with pytest.raises(SecAggError, match="graph is not fixed before the adverts are in"):
        params.neighbours(1)
    with pytest.raises(SecAggError, match="graph is not fixed"):
        params.pieces(params.participants)


@pytest.mark.parametrize("n", [8, 11])
def test_pieces_counts_the_arcs_a_cut_ring_falls_into(n: int) -> None:
    # Prepare: degree 2 is a ring on the seed's permutation.
    params = make_params(n, degree=2).with_graph(bytes(32))
    ring = [params.participants[0]]
    while len(ring) < n:
        ring.append(next(v for v in params.neighbours(ring[-1]) if v not in ring[-2:]))

    # Execute / Assert
    assert params.pieces(params.participants) == 1
    assert params.pieces(set(ring) - {ring[0]}) == 1
    assert params.pieces(set(ring) - {ring[0], ring[4]}) == 2
    assert params.pieces(set(ring) - {ring[0], ring[2], ring[4]}) == 3
    assert all(params.pieces(set(ring) - set(gone)) == 1 for gone in itertools.pairwise(ring))


def test_complete_graph_neighbours_are_everyone_else() -> None:
    # Prepare
    params = make_params(6)

    # Execute / Assert
    assert params.neighbours(3) == (1, 2, 4, 5, 6)


def test_neighbours_of_a_non_participant_are_refused() -> None:
    # Prepare
    key = identity_keys([9])[9]

    # Execute / Assert
    with pytest.raises(SecAggError, match="site 9 is not a participant"):
        make_params(5).neighbours(9)
    with pytest.raises(SecAggError, match="site 9 is not a participant"):
        SiteSession.start(make_params(5), 9, public(key), key.sign)
