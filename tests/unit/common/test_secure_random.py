"""SecureRandom: a ChaCha20 keystream under a fixed key, read back independently; 53-bit
uniforms; Bernoulli rates within binomial bounds; Gaussians by moments and a
Kolmogorov-Smirnov test at a million draws; determinism per key, fresh keystream per call,
and every bad argument refused.

The keys are fixed, so every statistic below is a fixed number: the bounds are 5 standard
errors (or p > 1e-3), loose enough that a correct sampler passes with a wide margin and
tight enough that a wrong scale, a shared pair or a lost bit fails."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from common.secure_random import SecureRandom

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
N = 1_000_000
MAX_RADIUS = math.sqrt(106 * math.log(2))  # sqrt(-2 ln 2^-53)


def keystream(key: bytes, call: int, nbytes: int) -> np.ndarray:
    """The ``call``-th call's stream, straight from ChaCha20, as little-endian uint64."""
    nonce = bytes(4) + call.to_bytes(12, "little")
    enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(nbytes)), dtype="<u8")


def words53(key: bytes, call: int, n: int) -> np.ndarray:
    """``k`` in [0, 2^53) of each word: its top 53 bits with the top one flipped (what an
    arithmetic shift of the signed word, plus 2^52, gives)."""
    return (keystream(key, call, 8 * n) >> np.uint64(11)) ^ np.uint64(1 << 52)


# ---- keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", [b"", bytes(16), bytes(31), bytes(33), "k" * 32, 32, None])
def test_a_key_that_is_not_32_bytes_is_refused(key: object) -> None:
    with pytest.raises(ValueError, match="32-byte key"):
        SecureRandom(key)  # type: ignore[arg-type]


def test_fresh_keys_are_random_and_the_key_is_never_shown() -> None:
    a, b = SecureRandom.fresh(), SecureRandom.fresh()
    assert not torch.equal(a.uniform(8), b.uniform(8))
    assert KEY.hex() not in repr(SecureRandom(KEY)) and "calls=0" in repr(SecureRandom(KEY))


def test_the_same_key_and_calls_give_the_same_draws_and_another_key_others() -> None:
    def draws(key: bytes) -> list[torch.Tensor]:
        r = SecureRandom(key)
        return [
            r.uniform(100),
            r.bernoulli(1700, 0.15),
            r.normal((40_000,), 1.5),  # several chunks
            r.normal((3, 7), 0.5, dtype=torch.float64),
        ]

    one, two, other = draws(KEY), draws(KEY), draws(OTHER)
    assert all(torch.equal(x, y) for x, y in zip(one, two, strict=True))
    assert not set(one[0].tolist()) & set(other[0].tolist())
    assert not bool((one[2] == other[2]).all())
    assert not bool((one[3] == other[3]).any())


# ---- the keystream -------------------------------------------------------------------


def test_uniforms_are_the_keystream_read_independently() -> None:
    r = SecureRandom(KEY)
    for call in range(3):
        expected = words53(KEY, call, 50).astype(np.float64) * 2.0**-53
        assert np.array_equal(r.uniform(50).numpy(), expected)


def test_each_call_takes_a_fresh_stream_whatever_the_last_one_used() -> None:
    a, b = SecureRandom(KEY), SecureRandom(KEY)
    first = a.uniform(1000)
    b.uniform(3)  # a shorter first call: the second call's stream is the same
    second_a, second_b = a.uniform(1000), b.uniform(1000)
    assert torch.equal(second_a, second_b)
    assert not set(first.tolist()) & set(second_a.tolist())  # no keystream reused


def test_normal_is_box_muller_of_the_keystream_in_the_documented_layout() -> None:
    """An independent float64 reference for n = 5: 3 columns of 4 pairs; column j's cosines
    make element j, its sines element j + 3 (the sixth is dropped)."""
    n, half, std = 5, 3, 2.5
    r = SecureRandom(KEY)
    got = r.normal((n,), std, dtype=torch.float64).numpy()
    u = words53(KEY, 0, 8 * half).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(1.0 - u[: 4 * half])).reshape(4, half)
    angle = (np.pi * (2.0 * u[4 * half :] - 1.0)).reshape(4, half)
    ref = np.concatenate([(radius * np.cos(angle)).sum(0), (radius * np.sin(angle)).sum(0)])
    np.testing.assert_allclose(got, ref[:n] * std / 2, rtol=1e-13, atol=1e-15)


# ---- uniforms and Bernoulli ----------------------------------------------------------


def test_uniforms_have_53_bits_and_the_moments_of_u01() -> None:
    u = SecureRandom(KEY).uniform(N).numpy()
    assert u.dtype == np.float64 and u.shape == (N,)
    assert 0.0 <= u.min() and u.max() < 1.0
    k = u * 2.0**53
    assert np.array_equal(k, np.floor(k))  # exact multiples of 2^-53
    bits = k.astype(np.uint64)
    for bit in (0, 1, 26, 52):  # the lowest bits are as random as the top one
        ones = int(((bits >> np.uint64(bit)) & np.uint64(1)).sum())
        assert abs(ones - N / 2) < 5 * math.sqrt(N / 4), bit
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / N)
    assert abs(u.var() - 1 / 12) < 5 * math.sqrt((1 / 80 - 1 / 144) / N)


@pytest.mark.parametrize("p", [0.001, 0.15, 0.5, 0.9])
def test_bernoulli_rate_is_within_a_binomial_bound(p: float) -> None:
    coins = SecureRandom(KEY).bernoulli(N, p)
    assert coins.dtype == torch.bool and coins.shape == (N,)
    assert stats.binomtest(int(coins.sum()), N, p).pvalue > 1e-3


def test_bernoulli_compares_the_uniforms_and_its_extremes_are_exact() -> None:
    a, b = SecureRandom(KEY), SecureRandom(KEY)
    assert torch.equal(a.bernoulli(5000, 0.3), b.uniform(5000) < 0.3)
    assert not bool(a.bernoulli(5000, 0.0).any()) and bool(a.bernoulli(5000, 1.0).all())
    assert a.bernoulli(0, 0.5).shape == (0,)


@pytest.mark.parametrize("p", [-0.01, 1.01, math.nan])
def test_a_probability_outside_0_1_is_refused(p: float) -> None:
    with pytest.raises(ValueError, match="p must lie"):
        SecureRandom(KEY).bernoulli(10, p)


# ---- Gaussians -----------------------------------------------------------------------


def test_normal_has_the_moments_tails_and_cdf_of_a_gaussian() -> None:
    z = SecureRandom(KEY).normal((N,), 1.0, dtype=torch.float64).numpy()
    assert abs(z.mean()) < 5 / math.sqrt(N)
    assert abs(z.std() - 1.0) < 5 / math.sqrt(2 * N)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    beyond3 = int((np.abs(z) > 3).sum())  # P = 0.0027
    p3 = 2 * stats.norm.sf(3)
    assert abs(beyond3 - N * p3) < 5 * math.sqrt(N * p3 * (1 - p3))
    assert np.abs(z).max() <= 4 * MAX_RADIUS / 2  # the bound the docstring states
    # the partners of a Box-Muller pair (element j and j + n/2) are uncorrelated
    half = N // 2
    assert abs(np.corrcoef(z[:half], z[half:])[0, 1]) < 5 / math.sqrt(half)
    # and so are neighbours
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 / math.sqrt(N)


def test_normal_scales_with_std() -> None:
    one = SecureRandom(KEY).normal((200_000,), 1.0, dtype=torch.float64)
    three = SecureRandom(KEY).normal((200_000,), 3.0, dtype=torch.float64)
    torch.testing.assert_close(three, 3 * one, rtol=1e-15, atol=0.0)
    assert abs(float(three.std()) - 3.0) < 3 * 5 / math.sqrt(2 * 200_000)
    tiny = SecureRandom(KEY).normal((1000,), 1e-300, dtype=torch.float64)
    assert bool((tiny != 0).all())  # no underflow from squaring the scale


def test_normal_shape_dtype_and_device() -> None:
    r = SecureRandom(KEY)
    x = r.normal((3, 5), 1.0)
    assert x.shape == (3, 5) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert r.normal(7, 1.0).shape == (7,)
    assert r.normal((), 1.0).shape == ()
    assert r.normal((4,), 1.0, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert r.normal((4,), 1.0, device=torch.device("cpu")).device.type == "cpu"
    # float32 is the float64 draw rounded once
    a, b = SecureRandom(KEY), SecureRandom(KEY)
    torch.testing.assert_close(
        a.normal((1001,), 2.0), b.normal((1001,), 2.0, dtype=torch.float64).float(), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="floating-point"):
        r.normal((4,), 1.0, dtype=torch.int64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_normal_on_cuda_is_the_cpu_draw_moved() -> None:
    on_gpu = SecureRandom(KEY).normal((1000,), 1.0, device="cuda")
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), SecureRandom(KEY).normal((1000,), 1.0))


def test_std_zero_and_empty_shapes_draw_nothing() -> None:
    r = SecureRandom(KEY)
    zero = r.normal((4, 3), 0.0, dtype=torch.float64)
    assert zero.shape == (4, 3) and zero.dtype == torch.float64 and not bool(zero.any())
    assert r.normal((0, 5), 1.0).shape == (0, 5)
    assert r.uniform(0).shape == (0,)
    assert torch.equal(r.uniform(16), SecureRandom(KEY).uniform(16))  # still the first call


@pytest.mark.parametrize("std", [-1.0, math.nan, math.inf])
def test_a_bad_std_is_refused(std: float) -> None:
    with pytest.raises(ValueError, match="std must be"):
        SecureRandom(KEY).normal((4,), std)


def test_a_negative_count_is_refused() -> None:
    with pytest.raises(ValueError, match="n must be"):
        SecureRandom(KEY).uniform(-1)
    with pytest.raises(ValueError, match="n must be"):
        SecureRandom(KEY).bernoulli(-1, 0.5)
