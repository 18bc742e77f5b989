"""Update encoding: an orthonormal blockwise rotation, an unbiased quantizer, a ring sum
that never wraps, and every bad argument refused by name."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.quantize import (
    MAX_RING_BITS,
    EncodingSpec,
    check_sum,
    decode_sum,
    encode,
    error_bound,
    pack,
    signed_lift,
    to_ring,
    unpack,
)
from common.rotation import blockwise_rotate, blockwise_unrotate
from tests.support.reference import add_mod

FAST = settings(max_examples=40, deadline=None)
SLACK = 1e-9  # float64 rounding in the rotations, far below any bound tested
BLOCKS = st.sampled_from([1, 2, 4, 16, 4096])  # 4096 is the default
MODEL_DIM = 139_138  # the model's parameter count


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def spec(**kw: object) -> EncodingSpec:
    values: dict[str, object] = {
        "clip_norm": 1.0,
        "bits": 8,
        "num_sites": 10,
        "seed": 7,
        "dim": 20,
    }
    values.update(kw)
    return EncodingSpec(**values)  # type: ignore[arg-type]


def clip(x: np.ndarray, c: float) -> np.ndarray:
    n = float(np.linalg.norm(x))
    return x * (c / n) if n > c else x


def ring_sum(encodings: Sequence[np.ndarray], ring_bits: int) -> np.ndarray:
    total = encodings[0]
    for values in encodings[1:]:
        total = add_mod(total, values, ring_bits)
    return total


def test_model_dim_encoding_size() -> None:
    # Prepare
    full, rest = divmod(MODEL_DIM, 4096)
    fp32_bytes = 4 * MODEL_DIM

    # Execute
    sizes = {bits: spec(dim=MODEL_DIM, bits=bits, num_sites=10) for bits in (4, 8, 16)}

    # Assert: 33 full blocks and a tail of 3970 padded to 4096 (not to 2^18), + weight.
    assert (full, rest) == (33, 3970)
    expected_length = 33 * 4096 + next_pow2(MODEL_DIM - 33 * 4096) + 1
    assert expected_length == 139_265
    assert all(s.encoded_length == expected_length for s in sizes.values())
    assert sizes[8].num_blocks == 34 and sizes[8].block_lengths[-1] == 4096
    # 10 sites: sums within +-10 * (2^(b-1) - 1) need b + 4 bits (1270 < 2^11 at b = 8).
    assert [sizes[b].ring_bits for b in (4, 8, 16)] == [8, 12, 20]
    assert sizes[8].encoded_bytes == -(-12 * expected_length // 8)
    assert sizes[8].encoded_bytes < 0.376 * fp32_bytes
    assert sizes[4].encoded_bytes == expected_length < 0.251 * fp32_bytes
    assert sizes[16].encoded_bytes == -(-20 * expected_length // 8) < 0.626 * fp32_bytes
    global_rotation = spec(dim=MODEL_DIM, bits=8, num_sites=10, block_size=2**18)
    assert global_rotation.encoded_length == 2**18 + 1  # the old, doubled size


# ---- the ring --------------------------------------------------------------------


def test_ring_arithmetic_wraps_at_64_and_masks_below() -> None:
    # Prepare
    top = np.array([2**64 - 1, 2**63], dtype=np.uint64)
    two = np.array([2, 2**63], dtype=np.uint64)

    # Execute
    wrapped = add_mod(top, two, 64)
    masked = add_mod(np.array([250], dtype=np.uint64), np.array([10], dtype=np.uint64), 8)

    # Assert
    assert wrapped.tolist() == [1, 0]
    assert masked.tolist() == [4]
    values = np.array([-3, 0, 5, -(2**63)], dtype=np.int64)
    assert signed_lift(to_ring(values, 64), 64).tolist() == values.tolist()
    assert signed_lift(to_ring(values[:3], 16), 16).tolist() == [-3, 0, 5]


@FAST
@given(
    bits=st.sampled_from([4, 8, 16]),
    num_sites=st.integers(1, 2**40),
    weight_bound=st.integers(1, 2**20),
)
def test_ring_is_wide_enough_for_any_sum(bits: int, num_sites: int, weight_bound: int) -> None:
    # Prepare / Execute
    s = spec(bits=bits, num_sites=num_sites, weight_bound=weight_bound)

    # Assert
    assert s.ring_bits <= MAX_RING_BITS
    assert num_sites * s.max_level < 2 ** (s.ring_bits - 1)
    assert num_sites * weight_bound < 2**s.ring_bits
    # ... and no narrower ring would do.
    narrower = s.ring_bits - 1
    assert num_sites * s.max_level >= 2 ** (narrower - 1) or num_sites * weight_bound >= 2**narrower


@pytest.mark.parametrize(("bits", "num_sites"), [(4, 8), (8, 128), (16, 128), (4, 300)])
@pytest.mark.parametrize("block_size", [4096, 4])
def test_sum_at_the_extremes_never_wraps(bits: int, num_sites: int, block_size: int) -> None:
    # Prepare: every rotated coordinate is +-1/4 after the L2 clip, twice the
    # headroom range (headroom / sqrt(block length)), so each one is clipped to
    # +-max_level.
    headroom = 0.5 * math.sqrt(min(block_size, 16) / 16)
    s = spec(bits=bits, num_sites=num_sites, dim=16, headroom=headroom, block_size=block_size)
    pattern = np.random.default_rng(1).choice([-100.0, 100.0], size=16)
    delta = blockwise_unrotate(pattern, s.seed, block_size, 16)
    rng = np.random.default_rng(2)
    encodings = [encode(delta, s, rng) for _ in range(num_sites)]

    # Execute
    total = ring_sum([e.values for e in encodings], s.ring_bits)
    mean, weight = decode_sum(total, s, num_sites)
    single, _ = decode_sum(encodings[0].values, s, 1)

    # Assert
    assert all(e.clip_fraction == 1.0 for e in encodings)
    lifted = [signed_lift(e.values[:-1], s.ring_bits).tolist() for e in encodings]
    exact = [sum(column) for column in zip(*lifted, strict=True)]  # Python ints: no wrap
    assert signed_lift(total[:-1], s.ring_bits).tolist() == exact
    assert np.abs(signed_lift(total[:-1], s.ring_bits)).max() == num_sites * s.max_level
    assert weight == num_sites
    np.testing.assert_allclose(mean, single, atol=1e-12)


# ---- encode / decode -------------------------------------------------------------


@FAST
@given(
    dim=st.integers(1, 300),
    m=st.integers(1, 10),
    bits=st.sampled_from([4, 8, 16]),
    norms=st.lists(st.floats(0.0, 3.0), min_size=10, max_size=10),
    seed=st.integers(0, 2**32 - 1),
    block_size=BLOCKS,
)
def test_decoded_mean_within_error_bound(
    dim: int, m: int, bits: int, norms: list[float], seed: int, block_size: int
) -> None:
    # Prepare
    s = spec(
        bits=bits, num_sites=10, dim=dim, seed=seed % 1000, clip_norm=1.5, block_size=block_size
    )
    rng = np.random.default_rng(seed)
    deltas = [rng.normal(size=dim) / max(math.sqrt(dim), 1e-12) * norms[i] * 1.5 for i in range(m)]

    # Execute
    encodings = [encode(d, s, rng) for d in deltas]
    mean, weight = decode_sum(ring_sum([e.values for e in encodings], s.ring_bits), s, m)

    # Assert
    assume(all(e.clip_fraction == 0.0 for e in encodings))
    truth = np.mean([clip(d, s.clip_norm) for d in deltas], axis=0)
    assert weight == m
    assert [e.clipped for e in encodings] == [np.linalg.norm(d) > s.clip_norm for d in deltas]
    assert all(len(e.values) == s.padded_dim + 1 for e in encodings)
    assert all(int(e.values.max()) < 2**s.ring_bits for e in encodings)
    assert np.linalg.norm(mean - truth) <= error_bound(s, num_summands=m) * (1 + SLACK)


@pytest.mark.parametrize("block_size", [4096, 16])
def test_error_shrinks_as_bits_grow(block_size: int) -> None:
    # Prepare
    data = np.random.default_rng(11)
    deltas = [data.normal(size=200) * 0.1 for _ in range(5)]
    truth = np.mean([clip(d, 1.0) for d in deltas], axis=0)

    # Execute
    errors = []
    for bits in (4, 8, 16):
        s = spec(bits=bits, dim=200, block_size=block_size)
        rng = np.random.default_rng(12)
        trials = []
        for _ in range(20):
            total = ring_sum([encode(d, s, rng).values for d in deltas], s.ring_bits)
            trials.append(np.linalg.norm(decode_sum(total, s, 5)[0] - truth))
        errors.append(float(np.mean(trials)))

    # Assert
    assert errors[0] > errors[1] > errors[2] > 0.0


@pytest.mark.parametrize("block_size", [4096, 4])
def test_quantization_is_unbiased(block_size: int) -> None:
    # Prepare: coarse 4-bit levels, so a biased rounding would show.
    s = spec(bits=4, dim=6, num_sites=1, block_size=block_size)
    x = np.array([0.3, -0.2, 0.05, 0.0, -0.45, 0.1])
    rng = np.random.default_rng(21)
    trials = 2000

    # Execute
    decoded = np.array([decode_sum(encode(x, s, rng).values, s, 1)[0] for _ in range(trials)])

    # Assert: each decoded coordinate has std <= 1/(2 scale) for its block's scale
    # (unit-norm rows of the inverse rotation, rounding variance <= 1/4 level^2):
    # 5 standard errors of the mean.
    tolerance = 5.0 / (2.0 * float(s.coordinate_scales.min()) * math.sqrt(trials))
    np.testing.assert_allclose(decoded.mean(axis=0), x, atol=tolerance)
    assert np.abs(decoded - x).max() > 10 * tolerance  # each single decode is coarse


def test_one_block_may_carry_the_whole_clip_norm() -> None:
    # Prepare: dim 97 in blocks of 16: six full blocks and a 1-long tail. One delta
    # lives in a single full block, the other is a spike in the tail; both have the
    # full clip norm. A range of headroom * clip_norm / sqrt(padded_dim) (3 / sqrt(97))
    # would clip the first; one of headroom * clip_norm / sqrt(16) from the largest block
    # alone would clip the tail spike (its one coordinate is the whole norm, 1 > 3/4).
    s = spec(dim=97, block_size=16, bits=16, num_sites=2, headroom=3.0)
    rng = np.random.default_rng(51)
    in_block = np.zeros(97)
    in_block[32:48] = rng.normal(size=16)
    in_block /= np.linalg.norm(in_block)
    in_tail = np.zeros(97)
    in_tail[96] = -1.0

    # Execute
    encodings = [encode(d, s, rng) for d in (in_block, in_tail)]
    mean, _ = decode_sum(ring_sum([e.values for e in encodings], s.ring_bits), s, 2)

    # Assert
    assert s.block_lengths == (16,) * 6 + (1,)
    assert [e.clip_fraction for e in encodings] == [0.0, 0.0]
    truth = (in_block + in_tail) / 2
    assert np.linalg.norm(mean - truth) <= error_bound(s, num_summands=2) * (1 + SLACK)
    assert np.abs(blockwise_rotate(in_block, s.seed, 16)).max() > 3.0 / math.sqrt(s.padded_dim)
    assert s.coordinate_scales[-1] == pytest.approx(s.scale / 4.0)  # sqrt(1 / 16)


@FAST
@given(dim=st.integers(1, 20_000), block_size=BLOCKS, bits=st.sampled_from([4, 8, 16]))
def test_error_bound_is_the_per_block_rounding_sum(dim: int, block_size: int, bits: int) -> None:
    # Prepare / Execute
    s = spec(dim=dim, block_size=block_size, bits=bits, clip_norm=2.0, headroom=3.0)
    scales = s.coordinate_scales

    # Assert: one level per coordinate, summed in squares, is the per-site bound; with
    # one block it is the single-rotation bound sqrt(padded_dim) / scale.
    assert scales.shape == (s.padded_dim,)
    assert error_bound(s) == pytest.approx(math.sqrt(float(np.sum(scales**-2.0))), rel=1e-12)
    assert error_bound(s) == pytest.approx(math.sqrt(s.num_blocks) * 3.0 * 2.0 / s.max_level)
    if s.num_blocks == 1:
        assert error_bound(s) == pytest.approx(math.sqrt(s.padded_dim) / s.scale)
        assert s.padded_dim == next_pow2(dim)


def test_model_dim_round_trip() -> None:
    # Prepare
    s = spec(dim=MODEL_DIM, bits=8, num_sites=10, clip_norm=1.0)
    data = np.random.default_rng(61)
    deltas = [data.normal(size=MODEL_DIM) * 0.004 for _ in range(3)]
    rng = np.random.default_rng(62)

    # Execute
    encodings = [encode(d, s, rng) for d in deltas]
    mean, weight = decode_sum(ring_sum([e.values for e in encodings], s.ring_bits), s, 3)

    # Assert
    assert all(e.clip_fraction == 0.0 for e in encodings)
    assert all(e.values.shape == (139_265,) for e in encodings)
    truth = np.mean([clip(d, 1.0) for d in deltas], axis=0)
    assert weight == 3
    assert np.linalg.norm(mean - truth) <= error_bound(s, num_summands=3) * (1 + SLACK)


def test_weight_travels_in_the_sum() -> None:
    # Prepare
    s = spec(weight_bound=100, dim=50, bits=16)
    data = np.random.default_rng(31)
    deltas = [data.normal(size=50) * 0.05 for _ in range(4)]
    weights = [3, 100, 17, 1]
    rng = np.random.default_rng(32)

    # Execute
    encodings = [encode(d, s, rng, weight=w) for d, w in zip(deltas, weights, strict=True)]
    mean, total_weight = decode_sum(ring_sum([e.values for e in encodings], s.ring_bits), s, 4)

    # Assert
    assert all(e.clip_fraction == 0.0 for e in encodings)
    assert total_weight == sum(weights)
    truth = sum(w * clip(d, 1.0) for d, w in zip(deltas, weights, strict=True)) / sum(weights)
    bound = error_bound(s, num_summands=4, total_weight=sum(weights))
    assert np.linalg.norm(mean - truth) <= bound * (1 + SLACK)
    assert np.linalg.norm(mean - np.mean(deltas, axis=0)) > 10 * bound  # weights mattered
    assert [int(e.values[-1]) for e in encodings] == weights


def test_weight_channel_holds_the_largest_total() -> None:
    # Prepare: the weight total, not the coordinates, sizes this ring.
    s = spec(bits=4, num_sites=8, weight_bound=2**20, dim=4)
    rng = np.random.default_rng(41)
    x = np.array([0.1, 0.2, -0.3, 0.0])

    # Execute
    total = ring_sum([encode(x, s, rng, weight=2**20).values for _ in range(8)], s.ring_bits)
    mean, weight = decode_sum(total, s, 8)

    # Assert
    assert s.ring_bits == 24  # 8 * 2^20 = 2^23 needs 24 unsigned bits
    assert weight == 8 * 2**20
    assert np.linalg.norm(mean - x) <= error_bound(s, num_summands=8) * (1 + SLACK)


# ---- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"bits": 12}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": 16, "num_sites": 2**49}, "ring"),
        ({"bits": 4, "weight_bound": 2**63}, "ring"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": math.inf}, "clip_norm"),
        ({"num_sites": 0}, "num_sites"),
        ({"dim": 0}, "dim"),
        ({"seed": -1}, "seed"),
        ({"weight_bound": 0}, "weight_bound"),
        ({"headroom": -1.0}, "headroom"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 3}, "block_size"),
        ({"block_size": 4095}, "block_size"),
        ({"block_size": True}, "block_size"),
        ({"block_size": 16.0}, "block_size"),
    ],
)
def test_bad_spec_refused(kw: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        spec(**kw)


def test_largest_ring_accepted() -> None:
    # Prepare / Execute: 2^48 * (2^15 - 1) < 2^63, so 64 bits exactly.
    s = spec(bits=16, num_sites=2**48)

    # Assert
    assert s.ring_bits == 64


@pytest.mark.parametrize(
    ("delta", "weight", "name"),
    [
        (np.zeros(20), 11, "weight"),
        (np.zeros(20), 0, "weight"),
        (np.zeros(19), 1, "delta"),
        (np.full(20, np.nan), 1, "delta"),
    ],
)
def test_bad_encode_refused(delta: np.ndarray, weight: int, name: str) -> None:
    # Prepare
    s = spec(weight_bound=10)

    # Execute / Assert
    with pytest.raises(ValueError, match=name):
        encode(delta, s, np.random.default_rng(0), weight=weight)


def test_bad_decode_refused() -> None:
    # Prepare
    s = spec()
    good = encode(np.ones(20) * 0.1, s, np.random.default_rng(0)).values
    beyond = good.copy()
    beyond[0] = 2 ** (s.ring_bits - 1)  # the most negative value: no single site sends it

    # Execute / Assert
    with pytest.raises(ValueError, match="shape"):
        decode_sum(good[:-1], s, 1)
    with pytest.raises(ValueError, match="uint64"):
        decode_sum(good.astype(np.int64), s, 1)
    with pytest.raises(ValueError, match="num_summands"):
        decode_sum(good, s, 0)
    with pytest.raises(ValueError, match="num_summands"):
        decode_sum(good, s, 11)
    with pytest.raises(ValueError, match="total weight"):
        decode_sum(good, s, 2)
    with pytest.raises(ValueError, match="beyond"):
        decode_sum(beyond, s, 1)
    too_big = good.copy()
    too_big[0] = 2**s.ring_bits
    with pytest.raises(ValueError, match="total has values"):
        decode_sum(too_big, s, 1)


# ---- packing ---------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(ring_bits=st.integers(1, 64), length=st.integers(0, 50), seed=st.integers(0, 2**32))
def test_pack_round_trips_at_exactly_k_bits(ring_bits: int, length: int, seed: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**ring_bits, size=length, dtype=np.uint64, endpoint=False)

    # Execute
    data = pack(values, ring_bits)

    # Assert
    assert len(data) == -(-length * ring_bits // 8)
    assert unpack(data, ring_bits, length).tolist() == values.tolist()


def test_pack_known_bytes() -> None:
    # Prepare: 12-bit elements 0xABC, 0x123 -> bits little-endian: bytes BC 3A 12.
    values = np.array([0xABC, 0x123], dtype=np.uint64)

    # Execute / Assert
    assert pack(values, 12) == bytes([0xBC, 0x3A, 0x12])


@pytest.mark.parametrize(
    ("data", "name"),
    [(b"\x00" * 2, "3 bytes"), (b"\x00" * 4, "3 bytes"), (b"\x00\x00\xf0", "padding")],
)
def test_unpack_refuses_wrong_sizes(data: bytes, name: str) -> None:
    # 2 elements of 10 bits = 20 bits = 3 bytes, the last 4 bits padding.
    with pytest.raises(ValueError, match=name):
        unpack(data, 10, 2)


def _oversized(s: EncodingSpec) -> np.ndarray:
    """A malicious site's encoding: every coordinate at the top level (each passes the
    per-coordinate range check), weight 1."""
    values = np.full(s.encoded_length, s.max_level, dtype=np.int64)
    values[-1] = 1
    return to_ring(values, s.ring_bits)


def test_honest_sums_pass_the_influence_check() -> None:
    s = spec(weight_bound=100, dim=300, bits=8)
    data = np.random.default_rng(41)
    weights = [3, 100, 17]
    encodings = [
        encode(data.normal(size=300) * 5.0, s, np.random.default_rng(i), weight=w)
        for i, w in enumerate(weights)
    ]  # every delta far beyond the clip norm: clipped to it
    mean, total = decode_sum(ring_sum([e.values for e in encodings], s.ring_bits), s, 3)
    check_sum(mean, total, s, num_summands=3, expected_weight=sum(weights))


def test_an_oversized_contribution_is_refused() -> None:
    # Attack (issue 13): one site moved the decoded mean far beyond what clipped sites
    # can; every coordinate stayed within the range decode_sum checks.
    s = spec(dim=300, bits=8)
    honest = [encode(np.full(300, 0.01), s, np.random.default_rng(i)) for i in range(2)]
    total = ring_sum([*(e.values for e in honest), _oversized(s)], s.ring_bits)
    mean, weight = decode_sum(total, s, 3)  # accepted before
    with pytest.raises(ValueError, match=r"beyond the .* that 3 sites clipped to 1 can produce"):
        check_sum(mean, weight, s, num_summands=3, expected_weight=3)


def test_a_weight_other_than_the_declared_one_is_refused() -> None:
    # Attack (issue 13): a negative weight scaled the others' mean up (12.9x), with a
    # total weight still in decode_sum's range.
    s = spec(weight_bound=100, dim=300, bits=16)
    honest = [encode(np.full(300, 0.01), s, np.random.default_rng(i), weight=50) for i in range(3)]
    liar = encode(np.zeros(300), s, np.random.default_rng(9), weight=1).values.copy()
    liar[-1] = to_ring(np.array([-120], dtype=np.int64), s.ring_bits)[0]  # weight -120
    total = ring_sum([*(e.values for e in honest), liar], s.ring_bits)
    mean, weight = decode_sum(total, s, 4)  # 150 - 120 = 30: in range, accepted before
    assert weight == 30
    with pytest.raises(ValueError, match="not the 151 the summed sites declared"):
        check_sum(mean, weight, s, num_summands=4, expected_weight=151)
