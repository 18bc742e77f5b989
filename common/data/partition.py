"""Deterministic dataset partitioners for federated simulation.

Every partitioner returns sorted int64 index arrays that are disjoint and cover
``range(n)``, and depends only on its arguments (seed included), so a
simulation run can be reproduced exactly.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from common.data.dataset import TextDataset

__all__ = ["partition", "partition_dirichlet", "partition_iid", "partition_natural"]

Scheme = Literal["iid", "dirichlet", "natural"]
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "natural")


def _check_common(n: int, num_partitions: int, min_size: int) -> None:
    """Argument checks shared by all schemes, naming the offending argument."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (dataset is empty), got {n}")
    if num_partitions > n:
        raise ValueError(f"num_partitions={num_partitions} exceeds the number of examples n={n}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if min_size * num_partitions > n:
        raise ValueError(
            f"min_size={min_size} is impossible: num_partitions={num_partitions} x min_size > n={n}"
        )


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Sorted int64 copies, the shape every partitioner promises."""
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_iid(n: int, num_partitions: int, *, seed: int) -> list[np.ndarray]:
    """Uniformly random split into near-equal parts (sizes differ by at most one)."""
    _check_common(n, num_partitions, 0)
    perm = np.random.default_rng(seed).permutation(n)
    return _finish(np.array_split(perm, num_partitions))


def partition_dirichlet(
    labels: np.ndarray,
    num_partitions: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each label's examples go to parts in Dirichlet(alpha) proportions.

    Small ``alpha`` gives strongly non-IID sites. Draws are repeated (from the
    same seeded generator, so still deterministic) until every part has at
    least ``min_size`` examples.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    _check_common(len(y), num_partitions, min_size)

    rng = np.random.default_rng(seed)
    by_label = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(max_tries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for members in by_label:
            shuffled = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(np.int64)
            for bucket, chunk in zip(buckets, np.split(shuffled, cuts), strict=True):
                bucket.append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return _finish(parts)
    raise ValueError(
        f"could not give every partition >= min_size={min_size} examples with alpha={alpha}, "
        f"num_partitions={num_partitions}, n={len(y)} in max_tries={max_tries} draws; "
        "raise alpha or max_tries, or lower num_partitions or min_size"
    )


def partition_natural(
    groups: Sequence[str],
    num_partitions: int,
    *,
    seed: int,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split along a natural grouping (e.g. movie) so no group spans two sites.

    Groups are shuffled by ``seed`` and then placed largest-first onto the
    currently smallest part (ties: lowest part index) to keep sizes balanced.
    """
    n = len(groups)
    _check_common(n, num_partitions, min_size)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    names = list(members)  # first-appearance order: deterministic before shuffling
    if len(names) < num_partitions:
        raise ValueError(f"only {len(names)} distinct groups for num_partitions={num_partitions}")

    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[int(i)] for i in order]
    shuffled.sort(key=lambda g: len(members[g]), reverse=True)  # stable: shuffle breaks ties

    heap = [(0, p) for p in range(num_partitions)]
    buckets: list[list[int]] = [[] for _ in range(num_partitions)]
    for g in shuffled:
        size, p = heapq.heappop(heap)
        buckets[p].extend(members[g])
        heapq.heappush(heap, (size + len(members[g]), p))

    smallest = min(len(b) for b in buckets)
    if smallest < min_size:
        raise ValueError(
            f"natural partition has a part of {smallest} examples < min_size={min_size} "
            f"(num_partitions={num_partitions}, {len(names)} groups)"
        )
    return _finish([np.asarray(b, dtype=np.int64) for b in buckets])


def partition(
    dataset: TextDataset,
    scheme: Scheme,
    num_partitions: int,
    *,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Partition ``dataset`` with the named scheme (``alpha`` only affects "dirichlet")."""
    if scheme == "iid":
        _check_common(len(dataset), num_partitions, min_size)
        return partition_iid(len(dataset), num_partitions, seed=seed)
    if scheme == "dirichlet":
        return partition_dirichlet(
            dataset.labels, num_partitions, alpha=alpha, seed=seed, min_size=min_size
        )
    if scheme == "natural":
        if dataset.groups is None:
            raise ValueError(
                f"dataset {dataset.name!r} has no natural grouping column; use 'iid' or 'dirichlet'"
            )
        return partition_natural(dataset.groups, num_partitions, seed=seed, min_size=min_size)
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
