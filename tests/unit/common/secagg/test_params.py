"""The public parameters of a round: unsafe thresholds and degrees refused, safe
defaults, JSON round trips, and a neighbour graph that is symmetric, regular and the
same for everyone who derives it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.secagg.errors import SecAggError
from common.secagg.params import (
    SecAggParams,
    default_degree,
    default_threshold,
)
from common.secagg.site import SiteSession
from tests.unit.common.secagg.rounds import (
    FAST,
    make_params,
)


def raw_params(participants: tuple[int, ...], threshold: int, degree: int, **kw: Any) -> None:
    fields: dict[str, Any] = {"session": "s", "ring_bits": 16, "vector_length": 8}
    fields.update(kw)
    SecAggParams(participants=participants, threshold=threshold, degree=degree, **fields)


@pytest.mark.parametrize(
    ("n", "degree", "threshold"),
    [
        (5, 4, 2),  # t <= holders / 2
        (4, 3, 2),  # t == holders / 2
        (30, 16, 8),  # t <= holders / 2, sparse
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
        raw_params((1, 2, 3), 2, 2, **field_values)


@pytest.mark.parametrize(
    ("n", "degree", "threshold"),
    [(2, 1, 2), (3, 2, 2), (5, 4, 3), (10, 9, 6), (30, 16, 9), (100, 20, 11)],
)
def test_defaults_are_safe(n: int, degree: int, threshold: int) -> None:
    # Execute
    params = make_params(n)

    # Assert
    assert (default_degree(n), params.degree) == (degree, degree)
    assert (default_threshold(degree + 1), params.threshold) == (threshold, threshold)


def test_default_threshold_can_be_raised_but_not_lowered() -> None:
    # Execute / Assert
    assert default_threshold(10, 0.8) == 8
    assert default_threshold(10, 0.1) == 6
    assert default_threshold(2, 0.0) == 2


@FAST
@given(n=st.integers(2, 60), k=st.integers(1, 64), length=st.integers(1, 10_000))
def test_params_json_round_trip(n: int, k: int, length: int) -> None:
    # Prepare
    params = make_params(n, k=k, length=length)

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
    ],
)
def test_params_from_malformed_json_are_refused(text: str) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match="secagg parameters are malformed"):
        SecAggParams.from_json(text)


def test_params_from_json_keep_the_validation() -> None:
    # Prepare
    text = make_params(5).to_json().replace('"threshold": 3', '"threshold": 2')

    # Execute / Assert
    with pytest.raises(SecAggError, match="threshold 2 is unsafe"):
        SecAggParams.from_json(text)


@st.composite
def sparse_graphs(draw: st.DrawFn) -> SecAggParams:
    n = draw(st.integers(5, 80))
    degree = 2 * draw(st.integers(1, (n - 2) // 2))
    session = draw(st.text(min_size=1, max_size=20))
    return make_params(n, degree=degree, session=session)


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


def test_neighbours_depend_on_the_session() -> None:
    # Prepare
    a, b = make_params(30, session="round-1"), make_params(30, session="round-2")

    # Execute / Assert
    assert [a.neighbours(u) for u in a.participants] != [b.neighbours(u) for u in b.participants]


def test_complete_graph_neighbours_are_everyone_else() -> None:
    # Prepare
    params = make_params(6)

    # Execute / Assert
    assert params.neighbours(3) == (1, 2, 4, 5, 6)


def test_neighbours_of_a_non_participant_are_refused() -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match="site 9 is not a participant"):
        make_params(5).neighbours(9)
    with pytest.raises(SecAggError, match="site 9 is not a participant"):
        SiteSession.start(make_params(5), 9)
