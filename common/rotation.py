"""The blockwise randomized Hadamard rotation of an update (and its inverse).

The vector is cut into ``ceil(dim / block_size)`` consecutive blocks, all of exactly
``block_size`` coordinates but the last, which is zero-padded only to the next power of
two at or above its own length (not to ``block_size``). Block ``i`` gets its own random
signs (``np.random.default_rng([seed, i])``, a public per-round ``seed``) and its own
orthonormal Walsh-Hadamard transform, which spreads that block's energy: a block of
padded length ``L`` and L2 norm ``r`` gets coordinates of about ``r / sqrt(L)``. The
padding costs at most the last block's rounding up (dim 139,138 at block size 4096:
139,264 coordinates, not 2^18 = 262,144). common/quantize.py quantizes the result.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

# Coordinates per rotation block: 34 blocks for dim 139,138, padded by 126 zeros.
BLOCK_SIZE = 4096

FloatArray = npt.NDArray[np.float64]


def check_int(name: str, value: object, minimum: int) -> int:
    """Refuse bools and non-integers too: ``True`` must not pass as a site count."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def check_block_size(block_size: object) -> int:
    size = check_int("block_size", block_size, 1)
    if size & (size - 1):
        raise ValueError(f"block_size must be a power of two, got {size}")
    return size


def block_layout(dim: int, block_size: int) -> tuple[int, ...]:
    """Padded block lengths: full blocks of block_size, the rest to its next power of 2."""
    full, rest = divmod(dim, block_size)
    return (block_size,) * full + ((next_power_of_two(rest),) if rest else ())


def as_vector(name: str, x: object) -> FloatArray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be real-valued, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or infinity")
    return out


def _fwht_rows(x: FloatArray) -> FloatArray:
    """Orthonormal Walsh-Hadamard transform (Sylvester order) of each row of a 2-D array:
    log2(n) vectorized stages over all rows at once."""
    rows, n = x.shape
    y = x.copy()
    h = 1
    while h < n:
        pairs = y.reshape(rows, -1, 2, h)
        top, bottom = pairs[:, :, 0, :], pairs[:, :, 1, :]
        y = np.stack((top + bottom, top - bottom), axis=2).reshape(rows, n)
        h *= 2
    out: FloatArray = y / math.sqrt(n)
    return out


def _block_signs(n: int, seed: int, index: int) -> FloatArray:
    """Block ``index``'s public random signs: its own stream from (seed, index)."""
    rng = np.random.default_rng([seed, index])
    return rng.integers(0, 2, size=n).astype(np.float64) * 2.0 - 1.0


def _blockwise(v: FloatArray, lengths: tuple[int, ...], seed: int, *, inverse: bool) -> FloatArray:
    """Apply each block's sign flip and FWHT (forward: signs first; inverse: FWHT first).

    ``v`` is already padded: it is the concatenation of the blocks, ``lengths`` long.
    """
    out = np.empty_like(v)
    start = 0
    index = 0
    while index < len(lengths):
        n = lengths[index]
        same = 1  # consecutive blocks of one length go through one batched FWHT
        while index + same < len(lengths) and lengths[index + same] == n:
            same += 1
        stop = start + same * n
        signs = np.stack([_block_signs(n, seed, index + j) for j in range(same)])
        rows = v[start:stop].reshape(same, n)
        done = signs * _fwht_rows(rows) if inverse else _fwht_rows(signs * rows)
        out[start:stop] = done.reshape(-1)
        start, index = stop, index + same
    return out


def blockwise_rotate(x: npt.ArrayLike, seed: int, block_size: int = BLOCK_SIZE) -> FloatArray:
    """Randomized Hadamard per block: orthonormal, so norms are preserved.

    ``x`` is cut into blocks of ``block_size`` (the last may be shorter and is padded to
    the next power of two of its own length); block ``i`` is sign-flipped with
    ``default_rng([seed, i])`` and Walsh-Hadamard transformed. The result is the
    concatenation, ``sum(padded block lengths)`` long.
    """
    v = as_vector("x", x)
    check_int("seed", seed, 0)
    size = check_block_size(block_size)
    lengths = block_layout(v.shape[0], size)
    padded = np.zeros(sum(lengths), dtype=np.float64)
    padded[: v.shape[0]] = v  # only the last block is padded, so its zeros come last
    return _blockwise(padded, lengths, seed, inverse=False)


def blockwise_unrotate(y: npt.ArrayLike, seed: int, block_size: int, dim: int) -> FloatArray:
    """Undo blockwise_rotate for a vector of length ``dim`` (padding dropped)."""
    v = as_vector("y", y)
    check_int("seed", seed, 0)
    size = check_block_size(block_size)
    check_int("dim", dim, 1)
    lengths = block_layout(dim, size)
    if v.shape[0] != sum(lengths):
        raise ValueError(
            f"y must have length {sum(lengths)} (dim {dim} in blocks of {size}), got {v.shape[0]}"
        )
    return _blockwise(v, lengths, seed, inverse=True)[:dim]
