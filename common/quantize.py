"""Update encoding for secure aggregation: real deltas to integers in the ring Z_(2^k).

The coordinator will only ever see the elementwise SUM of the sites' encodings mod 2^k
(the masking protocol comes later), so the encoding must be linear in that sum and must
never wrap. A site turns its delta into integers as follows:

1. L2-clip the delta to ``clip_norm`` (bounds every site's influence);
2. FedAvg weighting, if any: multiply the clipped delta by ``weight / weight_bound``
   (``weight_bound`` is a public cap, ``1 <= weight <= weight_bound``), so the scaled
   delta stays inside the clip ball and the sum cannot grow;
3. rotate blockwise with randomized Hadamard transforms (public per-round ``seed``;
   common/rotation.py): a block of padded length ``L`` and L2 norm ``r`` gets
   coordinates of about ``r / sqrt(L)``; ``padded_dim`` is the sum of the padded block
   lengths;
4. clip each rotated coordinate of a block of padded length ``L`` to
   ``+- headroom * clip_norm / sqrt(L)`` (rare for ``headroom = 4``; it biases only those
   coordinates and is reported as ``clip_fraction``);
5. scale so that the block's range maps onto ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` and round
   stochastically (``floor(x) + Bernoulli(frac(x))``: unbiased);
6. reduce mod 2^k (two's complement) and append one more ring element holding
   ``weight``, so the weight also travels inside the secure sum and the coordinator
   learns only the total weight.

Why the range in step 4 comes from each block's own length. The blocks share the clip
budget (``sum_i r_i^2 <= clip_norm^2``) but nothing says how: a site whose delta lives
mostly in one layer puts nearly all of ``clip_norm`` into one block, whose coordinates
are then about ``clip_norm / sqrt(L)``, which is ``sqrt(padded_dim / L)`` times
(5.8 times for the 34 blocks of dim 139,138) the ``clip_norm / sqrt(padded_dim)`` that a
global rotation would give. A range sized from ``padded_dim`` would clip such a block
wholesale, so the range is sized for the worst split instead: every block is quantized as
if it alone carried the full clip norm. That keeps the global design's guarantee block by
block: a coordinate of a block is a sum of ``L`` terms ``+- x_j / sqrt(L)`` with
independent signs, so by Hoeffding it passes ``headroom * clip_norm / sqrt(L)`` with
probability at most ``2 exp(-headroom^2 / 2)`` however the norm is spread over blocks.
All full blocks have length ``L_max = block_size`` and so one range (``scale`` is their
levels per unit); a short last block, which a range from ``L_max`` would clip whenever it
carries more than about ``sqrt(L / L_max)`` of the norm, gets its own wider range. The
price is resolution: when the norm is spread evenly (a dense delta) the coordinates use
only about ``1 / sqrt(num_blocks)`` of the range, i.e. about ``log2(num_blocks) / 2`` bits
fewer than a global rotation (2.5 bits for 34 blocks), and the worst-case error of
``error_bound`` grows by ``sqrt(num_blocks)``. Fewer blocks (a larger ``block_size``)
buy resolution back at the cost of padding; ``block_size >= dim`` is the global rotation
(one block, padded to the next power of two).

Decoding the sum of ``m`` encodings lifts it back to signed integers, divides by the
per-block scales, undoes each block's rotation, drops the padding and divides by the
effective count ``total_weight / weight_bound``: the result is
``sum_i w_i clip(delta_i) / sum_i w_i``, the weighted mean of the clipped deltas (the
plain mean when ``weight_bound == 1``).

The ring has the fewest bits ``k`` that hold every possible sum without wrapping:
``num_sites * (2^(b-1) - 1) <= 2^(k-1) - 1`` (about ``b + log2(num_sites)`` bits) and
``num_sites * weight_bound < 2^k`` for the weight element; specs needing more than 64
bits are refused. On the wire a vector is packed at exactly ``k`` bits per element
(``pack`` / ``unpack``): 12 bits for 10 sites at ``b = 8``, 0.375x fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.rotation import (
    BLOCK_SIZE,
    FloatArray,
    as_vector,
    block_layout,
    blockwise_rotate,
    blockwise_unrotate,
    check_block_size,
    check_int,
)

BITS_CHOICES = (4, 8, 16)
MAX_RING_BITS = 64
# Rotated coordinates beyond HEADROOM widths clip_norm / sqrt(L) (L: their block's
# padded length) are clipped. Hoeffding bounds the chance per coordinate by
# 2 exp(-HEADROOM^2 / 2) (6.7e-4 for 4; about 6e-5 in the Gaussian regime of large
# blocks), however the clip norm is spread over the blocks.
HEADROOM = 4.0

RingArray = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class EncodingSpec:
    """Public parameters every site and the coordinator agree on for one round."""

    clip_norm: float
    bits: int
    num_sites: int
    seed: int
    dim: int
    weight_bound: int = 1
    headroom: float = HEADROOM
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        if not (isinstance(self.clip_norm, int | float) and math.isfinite(self.clip_norm)):
            raise ValueError(f"clip_norm must be a finite number, got {self.clip_norm!r}")
        if self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if isinstance(self.bits, bool) or self.bits not in BITS_CHOICES:
            raise ValueError(f"bits must be one of {BITS_CHOICES}, got {self.bits!r}")
        check_int("num_sites", self.num_sites, 1)
        check_int("seed", self.seed, 0)
        check_int("dim", self.dim, 1)
        check_int("weight_bound", self.weight_bound, 1)
        if not (isinstance(self.headroom, int | float) and math.isfinite(self.headroom)):
            raise ValueError(f"headroom must be a finite number, got {self.headroom!r}")
        if self.headroom <= 0:
            raise ValueError(f"headroom must be > 0, got {self.headroom}")
        check_block_size(self.block_size)
        need = self._needed_bits()
        if need > MAX_RING_BITS:
            raise ValueError(
                f"ring would need {need} bits (> {MAX_RING_BITS}) for bits={self.bits}, "
                f"num_sites={self.num_sites}, weight_bound={self.weight_bound}"
            )

    def _needed_bits(self) -> int:
        # A coordinate sum lies in [-m * max_level, m * max_level]: two's complement in k
        # bits holds it when m * max_level <= 2^(k-1) - 1.
        coords = (self.num_sites * self.max_level).bit_length() + 1
        weights = (self.num_sites * self.weight_bound).bit_length()  # unsigned total weight
        return max(coords, weights)

    @property
    def block_lengths(self) -> tuple[int, ...]:
        """Padded length of each rotation block: block_size, but the last may be shorter."""
        return block_layout(self.dim, self.block_size)

    @property
    def num_blocks(self) -> int:
        """ceil(dim / block_size)."""
        return -(-self.dim // self.block_size)

    @property
    def padded_dim(self) -> int:
        """Rotated coordinates: the sum of the padded block lengths."""
        return sum(self.block_lengths)

    @property
    def ring_bits(self) -> int:
        """k: the fewest bits in which no sum of num_sites encodings wraps."""
        return self._needed_bits()

    @property
    def max_level(self) -> int:
        """The largest quantized magnitude, 2^(b-1) - 1 (symmetric, so the rounding is)."""
        return (1 << (self.bits - 1)) - 1

    def _block_scale(self, length: int) -> float:
        return self.max_level / (self.headroom * self.clip_norm / math.sqrt(length))

    @property
    def scale(self) -> float:
        """Levels per unit in the largest blocks (all but maybe the last): their headroom
        range ``+- headroom * clip_norm / sqrt(L_max)`` maps onto +-max_level."""
        return self._block_scale(max(self.block_lengths))

    @property
    def coordinate_scales(self) -> FloatArray:
        """Levels per unit of every rotated coordinate, from its own block's length."""
        lengths = self.block_lengths
        per_block = np.array([self._block_scale(n) for n in lengths], dtype=np.float64)
        scales: FloatArray = np.repeat(per_block, lengths)
        return scales

    @property
    def encoded_length(self) -> int:
        """Ring elements per site: the rotated coordinates plus the weight."""
        return self.padded_dim + 1

    @property
    def encoded_bytes(self) -> int:
        """What one site's encoding costs on the wire, packed at ring_bits each."""
        return -(-self.encoded_length * self.ring_bits // 8)


@dataclass(frozen=True)
class Encoded:
    """One site's contribution to the secure sum, and what the site learnt encoding it."""

    values: RingArray
    clipped: bool
    clip_fraction: float
    weight: int


def _check_ring(name: str, values: object, ring_bits: int) -> RingArray:
    if not isinstance(values, np.ndarray) or values.dtype != np.uint64 or values.ndim != 1:
        raise ValueError(f"{name} must be a 1-D numpy array of dtype uint64")
    if ring_bits < MAX_RING_BITS and values.size and int(values.max()) >> ring_bits:
        raise ValueError(f"{name} has values >= 2^{ring_bits}")
    ring: RingArray = values
    return ring


def _ring_mask(ring_bits: int) -> np.uint64:
    if isinstance(ring_bits, bool) or not 1 <= ring_bits <= MAX_RING_BITS:
        raise ValueError(f"ring_bits must be in 1..{MAX_RING_BITS}, got {ring_bits!r}")
    return np.uint64((1 << ring_bits) - 1)


def to_ring(values: npt.NDArray[np.int64], ring_bits: int) -> RingArray:
    """Signed integers to ring elements, two's complement style (v mod 2^k)."""
    mask = _ring_mask(ring_bits)
    ring: RingArray = values.astype(np.int64).astype(np.uint64) & mask
    return ring


def signed_lift(values: RingArray, ring_bits: int) -> npt.NDArray[np.int64]:
    """Ring elements to signed integers: those >= 2^(k-1) stand for negatives."""
    _ring_mask(ring_bits)
    ring = _check_ring("values", values, ring_bits)
    if ring_bits == MAX_RING_BITS:
        return ring.view(np.int64).copy()
    signed = ring.astype(np.int64)
    signed[signed >= (1 << (ring_bits - 1))] -= 1 << ring_bits
    return signed


def encode(
    delta: npt.ArrayLike, spec: EncodingSpec, rng: np.random.Generator, *, weight: int = 1
) -> Encoded:
    """Clip, weight, rotate, quantize (unbiased) and lift one site's delta to the ring."""
    x = as_vector("delta", delta)
    if x.shape[0] != spec.dim:
        raise ValueError(f"delta must have length spec.dim = {spec.dim}, got {x.shape[0]}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    check_int("weight", weight, 1)
    if weight > spec.weight_bound:
        raise ValueError(f"weight must be <= weight_bound = {spec.weight_bound}, got {weight}")

    norm = float(np.linalg.norm(x))
    clipped = norm > spec.clip_norm
    if clipped:
        x = x * (spec.clip_norm / norm)
    x = x * (weight / spec.weight_bound)

    scaled = blockwise_rotate(x, spec.seed, spec.block_size) * spec.coordinate_scales
    level = float(spec.max_level)
    over = np.abs(scaled) > level
    scaled = np.clip(scaled, -level, level)

    floor = np.floor(scaled)
    up = rng.random(scaled.shape[0]) < (scaled - floor)  # frac 0 never rounds up
    quantized = floor.astype(np.int64) + up.astype(np.int64)

    values = np.empty(spec.encoded_length, dtype=np.uint64)
    values[:-1] = to_ring(quantized, spec.ring_bits)
    values[-1] = weight
    return Encoded(
        values=values,
        clipped=bool(clipped),
        clip_fraction=float(np.count_nonzero(over)) / spec.padded_dim,
        weight=int(weight),
    )


def decode_sum(total: RingArray, spec: EncodingSpec, num_summands: int) -> tuple[FloatArray, int]:
    """The (weighted) mean of the clipped deltas, and the total weight, from the ring sum."""
    check_int("num_summands", num_summands, 1)
    if num_summands > spec.num_sites:
        raise ValueError(
            f"num_summands must be <= num_sites = {spec.num_sites}, got {num_summands}"
        )
    if not isinstance(total, np.ndarray) or total.dtype != np.uint64:
        dtype = getattr(total, "dtype", type(total).__name__)
        raise ValueError(f"total must be a numpy array of dtype uint64, got {dtype}")
    if total.shape != (spec.encoded_length,):
        raise ValueError(
            f"total must have shape ({spec.encoded_length},) = padded_dim + 1, got {total.shape}"
        )
    ring = _check_ring("total", total, spec.ring_bits)

    total_weight = int(ring[-1])
    if not num_summands <= total_weight <= num_summands * spec.weight_bound:
        raise ValueError(
            f"total weight {total_weight} is impossible for {num_summands} summands "
            f"with weight_bound {spec.weight_bound}: not a sum of encodings"
        )
    coords = signed_lift(ring[:-1], spec.ring_bits)
    limit = num_summands * spec.max_level
    if np.any(np.abs(coords) > limit):
        raise ValueError(
            f"total has coordinates beyond +-{limit}: not a sum of {num_summands} encodings"
        )

    rotated_sum = coords.astype(np.float64) / spec.coordinate_scales
    summed = blockwise_unrotate(rotated_sum, spec.seed, spec.block_size, spec.dim)
    effective_count = total_weight / spec.weight_bound
    return summed / effective_count, total_weight


def check_sum(
    mean: FloatArray,
    total_weight: int,
    spec: EncodingSpec,
    *,
    num_summands: int,
    expected_weight: int | None = None,
) -> None:
    """Refuse a decoded sum that ``num_summands`` honest encodings cannot produce.

    Each honest site clips its delta to ``clip_norm`` before weighting, so the weighted
    mean has norm at most ``clip_norm``, plus the quantization's ``error_bound``; the
    per-coordinate range check of ``decode_sum`` alone let one site push the mean about
    ``sqrt(num_blocks) * headroom`` times further. With the sites' weights public
    (their declared sizes), the total weight must be exactly theirs: a site that encodes
    another weight (say a negative one, to scale the others' mean up) is caught. Within
    these bounds a malicious site can still move the mean anywhere in the clip ball, as
    any site's clipped update can (no range proofs)."""
    if expected_weight is not None and total_weight != expected_weight:
        raise ValueError(
            f"the total weight {total_weight} is not the {expected_weight} the summed sites "
            "declared: a site encoded another weight"
        )
    limit = spec.clip_norm + error_bound(spec, num_summands=num_summands, total_weight=total_weight)
    norm = float(np.linalg.norm(mean))
    if not norm <= limit * (1 + 1e-9):
        raise ValueError(
            f"the decoded mean has norm {norm:.4g}, beyond the {limit:.4g} that "
            f"{num_summands} sites clipped to {spec.clip_norm:g} can produce"
        )


def error_bound(
    spec: EncodingSpec, *, num_summands: int = 1, total_weight: int | None = None
) -> float:
    """Worst-case L2 error of decode_sum against the (weighted) mean of the clipped deltas.

    Holds surely, not just with high probability, whenever no rotated coordinate hit the
    headroom clip (every ``clip_fraction == 0``): each stochastic rounding moves a
    coordinate by less than one level, i.e. by less than ``1 / s_j`` for a coordinate
    of scale ``s_j``. A block of padded length ``L`` has ``L`` coordinates of scale
    ``max_level * sqrt(L) / (headroom * clip_norm)``, so its squared error is below
    ``L / s^2 = (headroom * clip_norm / max_level)^2`` whatever ``L``, and a site's error
    has L2 norm below ``sqrt(num_blocks) * headroom * clip_norm / max_level``. The
    inverse rotation is orthonormal (block by block), so it keeps that norm; dropping
    padding only shrinks it; the sum of ``m = num_summands`` sites stays below ``m``
    times it, and the decoder's division by ``total_weight / weight_bound`` turns that
    into the factor ``m * weight_bound / total_weight`` (1 for unweighted sums). The
    typical error is far smaller: the roundings are independent with variance
    <= 1/4 level^2, so for equal weights the RMS error is <=
    ``sqrt(num_blocks / (4 m)) * headroom * clip_norm / max_level``.
    """
    check_int("num_summands", num_summands, 1)
    weight = num_summands * spec.weight_bound if total_weight is None else total_weight
    check_int("total_weight", weight, num_summands)
    if weight > num_summands * spec.weight_bound:
        raise ValueError(
            f"total_weight must be <= num_summands * weight_bound = "
            f"{num_summands * spec.weight_bound}, got {weight}"
        )
    per_site = math.sqrt(spec.num_blocks) * spec.headroom * spec.clip_norm / spec.max_level
    return per_site * num_summands * spec.weight_bound / weight


def pack(values: RingArray, ring_bits: int) -> bytes:
    """Ring elements packed at exactly ``ring_bits`` bits each (little-endian bit order)."""
    _ring_mask(ring_bits)
    ring = _check_ring("values", values, ring_bits)
    shifts = np.arange(ring_bits, dtype=np.uint64)
    bits = ((ring[:, np.newaxis] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes, ring_bits: int, length: int) -> RingArray:
    """Undo ``pack``; refuses a byte string that is not exactly ``length`` packed elements."""
    _ring_mask(ring_bits)
    check_int("length", length, 0)
    expected = -(-length * ring_bits // 8)
    if not isinstance(data, bytes | bytearray) or len(data) != expected:
        got = len(data) if isinstance(data, bytes | bytearray) else type(data).__name__
        raise ValueError(
            f"packed vector must be {expected} bytes ({length} elements of {ring_bits} bits), "
            f"got {got}"
        )
    raw = np.frombuffer(bytes(data), dtype=np.uint8)
    bits = np.unpackbits(raw, bitorder="little")
    if np.any(bits[length * ring_bits :]):
        raise ValueError("packed vector has non-zero padding bits")
    matrix = bits[: length * ring_bits].reshape(length, ring_bits).astype(np.uint64)
    weights = np.uint64(1) << np.arange(ring_bits, dtype=np.uint64)
    values: RingArray = (matrix * weights).sum(axis=1, dtype=np.uint64)
    return values
