"""The blockwise randomized Hadamard rotation: orthonormal, exactly invertible, each
block an explicit randomized Hadamard transform, bad arguments refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import hadamard

from common.quantize import (
    EncodingSpec,
)
from common.rotation import blockwise_rotate, blockwise_unrotate

FAST = settings(max_examples=40, deadline=None)
BLOCKS = st.sampled_from([1, 2, 4, 16, 4096])  # 4096 is the default


def spec(**kw: object) -> EncodingSpec:
    values: dict[str, object] = {"clip_norm": 1.0, "bits": 8, "num_sites": 10, "seed": 7, "dim": 20}
    values.update(kw)
    return EncodingSpec(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "block_size", "lengths"),
    [
        (1, 4, [1]),
        (5, 4, [4, 1]),
        (7, 4, [4, 4]),
        (18, 4, [4, 4, 4, 4, 2]),
        (100, 16, [16] * 6 + [4]),
        (33, 1, [1] * 33),
        (1000, 4096, [1024]),
        (4096 * 2 + 3, 4096, [4096, 4096, 4]),
        (10_000, 4096, [4096, 4096, 2048]),
    ],
)
def test_blockwise_rotation_preserves_norm_and_inverts(
    n: int, block_size: int, lengths: list[int]
) -> None:
    # Prepare
    x = np.random.default_rng(n).normal(size=n)

    # Execute
    y = blockwise_rotate(x, seed=3, block_size=block_size)
    back = blockwise_unrotate(y, seed=3, block_size=block_size, dim=n)

    # Assert: only the last block is padded, and only to its own power of two.
    assert y.shape == (sum(lengths),)
    assert spec(dim=n, block_size=block_size).block_lengths == tuple(lengths)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(back, x, atol=1e-12)


@FAST
@given(dim=st.integers(1, 300), block_size=BLOCKS, seed=st.integers(0, 2**63))
def test_blockwise_rotation_is_orthonormal(dim: int, block_size: int, seed: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    x, z = rng.normal(size=dim), rng.normal(size=dim)

    # Execute
    rx = blockwise_rotate(x, seed, block_size)
    rz = blockwise_rotate(z, seed, block_size)

    # Assert: inner products (so norms) kept; exact inverse; linear.
    s = spec(dim=dim, block_size=block_size)
    assert rx.shape == (s.padded_dim,)
    assert s.padded_dim == sum(s.block_lengths) and len(s.block_lengths) == s.num_blocks
    assert float(rx @ rz) == pytest.approx(float(x @ z), abs=1e-9)
    np.testing.assert_allclose(blockwise_unrotate(rx, seed, block_size, dim), x, atol=1e-12)
    np.testing.assert_allclose(blockwise_rotate(x + 2 * z, seed, block_size), rx + 2 * rz)


def test_each_block_is_its_own_randomized_hadamard() -> None:
    # Prepare: dim 21 in blocks of 8: two full blocks and a tail of 5 padded to 8.
    x = np.random.default_rng(0).normal(size=21)
    padded = np.concatenate([x, np.zeros(3)])

    # Execute
    y = blockwise_rotate(x, seed=9, block_size=8)

    # Assert: block i is H (signs_i * x_i) / sqrt(8), signs_i from default_rng([seed, i]).
    for i in range(3):
        signs = np.random.default_rng([9, i]).integers(0, 2, size=8) * 2.0 - 1.0
        block = padded[8 * i : 8 * (i + 1)]
        expected = hadamard(8) @ (signs * block) / math.sqrt(8)
        np.testing.assert_allclose(y[8 * i : 8 * (i + 1)], expected, atol=1e-12)
    assert not np.allclose(y, blockwise_rotate(x, seed=10, block_size=8))


def test_bad_blockwise_arguments_refused() -> None:
    # Prepare
    y = blockwise_rotate(np.ones(21), seed=1, block_size=8)

    # Execute / Assert
    with pytest.raises(ValueError, match="length 24"):
        blockwise_unrotate(y[:-1], seed=1, block_size=8, dim=21)
    with pytest.raises(ValueError, match="length 32"):
        blockwise_unrotate(y, seed=1, block_size=8, dim=29)
    with pytest.raises(ValueError, match="block_size"):
        blockwise_rotate(np.ones(21), seed=1, block_size=6)
    with pytest.raises(ValueError, match="block_size"):
        blockwise_unrotate(y, seed=1, block_size=0, dim=21)
    with pytest.raises(ValueError, match="seed"):
        blockwise_rotate(np.ones(21), seed=-1, block_size=8)
    with pytest.raises(ValueError, match="dim"):
        blockwise_unrotate(y, seed=1, block_size=8, dim=0)
