"""Shamir secret sharing of 32-byte secrets over GF(2^521 - 1), so a dropped site's mask
seed (or a surviving site's self-mask seed) can be rebuilt from any `threshold` shares
and from no fewer.

The field is prime and larger than 2^256, so every secret is a field element and a share
(its y value, 66 bytes big-endian) reveals nothing about the secret below the threshold."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Mapping, Sequence

from common.secagg.errors import SecAggError

PRIME = 2**521 - 1
SHARE_BYTES = 66
SECRET_BYTES = 32
MAX_HOLDER = 2**31


def _check_holder(x: object) -> int:
    """A holder id is an x coordinate: x = 0 would be the secret itself."""
    if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= MAX_HOLDER:
        raise SecAggError(f"holder must be an int in 1..{MAX_HOLDER}, got {x!r}")
    return x


def _check_threshold(threshold: object) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise SecAggError(f"threshold must be an int >= 1, got {threshold!r}")
    return threshold


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """The polynomial at x, by Horner's rule (coefficients from the constant term up)."""
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """The value at `at` of the unique polynomial of degree < len(points) through them."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                numerator = numerator * (at - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        total = (total + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def split(secret: bytes, *, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """One share per holder; any `threshold` of them recover the secret, fewer reveal nothing."""
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        size = len(secret) if isinstance(secret, bytes) else type(secret).__name__
        raise SecAggError(f"secret must be {SECRET_BYTES} bytes, got {size}")
    xs = [_check_holder(x) for x in holders]
    duplicates = sorted(x for x, n in Counter(xs).items() if n > 1)
    if duplicates:
        raise SecAggError(f"holders must be distinct, duplicated: {duplicates}")
    _check_threshold(threshold)
    if threshold > len(xs):
        raise SecAggError(f"threshold {threshold} exceeds the number of holders ({len(xs)})")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def combine(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """The secret from at least `threshold` shares; any extra share must lie on the same
    polynomial, so a tampered share is detected whenever more than `threshold` arrive."""
    _check_threshold(threshold)
    if len(shares) < threshold:
        raise SecAggError(f"need at least {threshold} shares, got {len(shares)}")
    points: list[tuple[int, int]] = []
    for x in sorted(_check_holder(x) for x in shares):
        share = shares[x]
        if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
            size = len(share) if isinstance(share, bytes) else type(share).__name__
            raise SecAggError(f"share of holder {x} must be {SHARE_BYTES} bytes, got {size}")
        y = int.from_bytes(share, "big")
        if y >= PRIME:
            raise SecAggError(f"share of holder {x} is not a field element (>= 2^521 - 1)")
        points.append((x, y))
    basis, extra = points[:threshold], points[threshold:]
    for x, y in extra:
        if _interpolate(basis, x) != y:
            raise SecAggError(
                f"shares are inconsistent: holder {x} does not lie on the polynomial "
                f"of holders {[bx for bx, _ in basis]}"
            )
    secret = _interpolate(basis, 0)
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("shares do not encode a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
