"""Partitioners: disjoint, covering, sorted, deterministic, and shaped as promised."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from common.data import (
    TextDataset,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_natural,
)

FAST = settings(max_examples=60, deadline=None)


def _check_valid(parts: Sequence[np.ndarray], n: int, num_partitions: int) -> None:
    assert len(parts) == num_partitions
    for p in parts:
        assert p.dtype == np.int64
        assert p.ndim == 1
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates within a part
    merged = np.concatenate(parts)
    assert len(merged) == n  # no duplicates across parts ...
    assert np.array_equal(np.sort(merged), np.arange(n))  # ... and full cover


def _same(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _dataset(labels: Sequence[int], groups: Sequence[str] | None) -> TextDataset:
    return TextDataset(
        name="toy",
        texts=tuple(f"t{i}" for i in range(len(labels))),
        labels=np.asarray(labels, dtype=np.int64),
        label_names=tuple(str(i) for i in range(max(labels) + 1)),
        groups=None if groups is None else tuple(groups),
    )


# --- iid ---------------------------------------------------------------------


@FAST
@given(data=st.data(), n=st.integers(1, 500), seed=st.integers(0, 2**32 - 1))
def test_iid_properties(data: st.DataObject, n: int, seed: int) -> None:
    # Prepare
    k = data.draw(st.integers(1, min(n, 20)))

    # Execute
    parts = partition_iid(n, k, seed=seed)
    again = partition_iid(n, k, seed=seed)

    # Assert
    _check_valid(parts, n, k)
    assert _same(parts, again)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_seed_changes_assignment() -> None:
    # Prepare / Execute
    a = partition_iid(100, 4, seed=0)
    b = partition_iid(100, 4, seed=1)

    # Assert
    assert not _same(a, b)


# --- dirichlet ---------------------------------------------------------------


@FAST
@given(
    labels=st.lists(st.integers(0, 4), min_size=20, max_size=400),
    k=st.integers(1, 8),
    alpha=st.floats(0.3, 10.0),
    min_size=st.integers(0, 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_properties(
    labels: list[int], k: int, alpha: float, min_size: int, seed: int
) -> None:
    # Prepare
    y = np.asarray(labels, dtype=np.int64)

    # Execute
    try:
        parts = partition_dirichlet(y, k, alpha=alpha, seed=seed, min_size=min_size)
    except ValueError:
        reject()  # documented failure: min_size unreachable within max_tries
    again = partition_dirichlet(y, k, alpha=alpha, seed=seed, min_size=min_size)

    # Assert
    _check_valid(parts, len(y), k)
    assert _same(parts, again)
    assert all(len(p) >= min_size for p in parts)


def test_dirichlet_small_alpha_skews_label_shares() -> None:
    # Prepare
    y = np.repeat(np.array([0, 1], dtype=np.int64), 1000)

    # Execute
    parts = partition_dirichlet(y, 10, alpha=0.5, seed=0)

    # Assert
    _check_valid(parts, len(y), 10)
    majority_shares = [max(np.mean(y[p] == 0), np.mean(y[p] == 1)) for p in parts]
    assert max(majority_shares) > 0.8


def test_dirichlet_unreachable_min_size_names_parameters() -> None:
    # Prepare
    y = np.zeros(30, dtype=np.int64)

    # Execute
    with pytest.raises(ValueError) as info:
        partition_dirichlet(y, 10, alpha=0.01, seed=0, min_size=3, max_tries=5)

    # Assert
    message = str(info.value)
    for fragment in ("min_size=3", "alpha=0.01", "num_partitions=10", "max_tries=5"):
        assert fragment in message


# --- natural -----------------------------------------------------------------


@FAST
@given(
    groups=st.lists(st.sampled_from("abcdefghijkl"), min_size=1, max_size=300),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_natural_properties(groups: list[str], seed: int, data: st.DataObject) -> None:
    # Prepare
    k = data.draw(st.integers(1, len(set(groups))))

    # Execute
    parts = partition_natural(groups, k, seed=seed)
    again = partition_natural(groups, k, seed=seed)

    # Assert
    _check_valid(parts, len(groups), k)
    assert _same(parts, again)
    owner: dict[str, int] = {}
    for part_id, p in enumerate(parts):
        assert len(p) >= 1
        for i in p:
            assert owner.setdefault(groups[int(i)], part_id) == part_id


def test_natural_balances_largest_first() -> None:
    # Prepare: group sizes 6, 3, 2, 1 onto 2 parts -> {6} and {3, 2, 1}.
    groups = ["a"] * 6 + ["b"] * 3 + ["c"] * 2 + ["d"]

    # Execute
    parts = partition_natural(groups, 2, seed=0)

    # Assert
    assert sorted(len(p) for p in parts) == [6, 6]


def test_natural_fewer_groups_than_partitions() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="distinct groups"):
        partition_natural(["a", "a", "b", "b"], 3, seed=0)


def test_natural_min_size_enforced() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="min_size=2"):
        partition_natural(["a"] * 8 + ["b"], 2, seed=0, min_size=2)


# --- dispatcher and argument validation --------------------------------------


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural"])
def test_dispatcher_matches_direct_calls(scheme: str) -> None:
    # Prepare
    labels = [0, 1] * 20
    groups = [f"g{i % 7}" for i in range(40)]
    ds = _dataset(labels, groups)

    # Execute
    parts = partition(ds, scheme, 4, seed=3, alpha=0.9)  # type: ignore[arg-type]

    # Assert
    direct = {
        "iid": lambda: partition_iid(40, 4, seed=3),
        "dirichlet": lambda: partition_dirichlet(ds.labels, 4, alpha=0.9, seed=3),
        "natural": lambda: partition_natural(groups, 4, seed=3),
    }[scheme]()
    assert _same(parts, direct)


def test_dispatcher_natural_without_groups() -> None:
    # Prepare
    ds = _dataset([0, 1, 0, 1], None)

    # Execute / Assert
    with pytest.raises(ValueError, match="no natural grouping column"):
        partition(ds, "natural", 2, seed=0)


def test_dispatcher_unknown_scheme() -> None:
    # Prepare
    ds = _dataset([0, 1, 0, 1], None)

    # Execute / Assert
    with pytest.raises(ValueError, match="unknown scheme"):
        partition(ds, "shards", 2, seed=0)  # type: ignore[arg-type]


def test_dispatcher_iid_min_size() -> None:
    # Prepare
    ds = _dataset([0, 1] * 5, None)

    # Execute / Assert
    with pytest.raises(ValueError, match="min_size=3"):
        partition(ds, "iid", 4, seed=0, min_size=3)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: partition_iid(10, 0, seed=0), "num_partitions"),
        (lambda: partition_iid(3, 4, seed=0), "num_partitions"),
        (lambda: partition_iid(0, 1, seed=0), "n"),
        (
            lambda: partition_dirichlet(np.zeros(10, np.int64), 2, alpha=0.0, seed=0),
            "alpha",
        ),
        (
            lambda: partition_dirichlet(np.zeros(10, np.int64), 2, alpha=-1.0, seed=0),
            "alpha",
        ),
        (
            lambda: partition_dirichlet(np.zeros(10, np.int64), 2, alpha=float("nan"), seed=0),
            "alpha",
        ),
        (
            lambda: partition_dirichlet(np.zeros(10, np.int64), 2, alpha=1.0, seed=0, max_tries=0),
            "max_tries",
        ),
        (
            lambda: partition_dirichlet(np.zeros(3, np.int64), 4, alpha=1.0, seed=0),
            "num_partitions",
        ),
        (lambda: partition_dirichlet(np.zeros(10), 2, alpha=1.0, seed=0), "labels"),
        (lambda: partition_natural(["a", "b"], 0, seed=0), "num_partitions"),
        (lambda: partition_natural(["a", "b"], 1, seed=0, min_size=-1), "min_size"),
    ],
)
def test_bad_arguments_name_the_argument(call: object, argument: str) -> None:
    # Prepare
    assert callable(call)

    # Execute
    with pytest.raises(ValueError) as info:
        call()

    # Assert
    assert argument in str(info.value)
