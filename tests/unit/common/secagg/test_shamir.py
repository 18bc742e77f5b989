"""Shamir sharing over GF(2^521 - 1): any threshold of shares recovers the secret, fewer
are refused, a tampered extra share is caught, and every bad argument is named."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.secagg.errors import SecAggError
from common.secagg.shamir import PRIME, SHARE_BYTES, combine, split

FAST = settings(max_examples=25, deadline=None)
SECRETS = st.binary(min_size=32, max_size=32)
SECRET = bytes(range(32))


def y_of(share: bytes) -> int:
    return int.from_bytes(share, "big")


def share_of(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


@st.composite
def sharing_cases(draw: st.DrawFn) -> tuple[bytes, int, list[int], list[int]]:
    """A secret, a threshold, the holders, and a threshold-sized subset of them."""
    secret = draw(SECRETS)
    holders = draw(
        st.lists(st.integers(min_value=1, max_value=2**31), min_size=1, max_size=8, unique=True)
    )
    threshold = draw(st.integers(min_value=1, max_value=len(holders)))
    subset = draw(st.permutations(holders))[:threshold]
    return secret, threshold, holders, subset


# ---- recovery -------------------------------------------------------------------------


@FAST
@given(case=sharing_cases())
def test_any_threshold_subset_recovers_the_secret(
    case: tuple[bytes, int, list[int], list[int]],
) -> None:
    # Prepare
    secret, threshold, holders, subset = case
    shares = split(secret, threshold=threshold, holders=holders)

    # Execute
    recovered = combine({x: shares[x] for x in subset}, threshold=threshold)

    # Assert
    assert recovered == secret


@FAST
@given(case=sharing_cases())
def test_all_shares_together_recover_the_secret(
    case: tuple[bytes, int, list[int], list[int]],
) -> None:
    # Prepare
    secret, threshold, holders, _ = case
    shares = split(secret, threshold=threshold, holders=holders)

    # Execute
    recovered = combine(shares, threshold=threshold)

    # Assert
    assert recovered == secret


def test_split_gives_one_share_of_66_bytes_per_holder() -> None:
    # Execute
    shares = split(SECRET, threshold=3, holders=[5, 1, 9, 2])

    # Assert
    assert sorted(shares) == [1, 2, 5, 9]
    assert all(len(share) == SHARE_BYTES for share in shares.values())
    assert all(y_of(share) < PRIME for share in shares.values())


def test_threshold_equal_to_holder_count_works() -> None:
    # Prepare
    holders = list(range(1, 11))
    shares = split(SECRET, threshold=10, holders=holders)

    # Execute
    recovered = combine(shares, threshold=10)

    # Assert
    assert recovered == SECRET


@FAST
@given(secret=SECRETS)
def test_threshold_one_shares_are_the_secret_itself(secret: bytes) -> None:
    # Execute
    shares = split(secret, threshold=1, holders=[1, 7, 2**31])

    # Assert
    assert all(y_of(share) == int.from_bytes(secret, "big") for share in shares.values())


@FAST
@given(secret=SECRETS)
def test_threshold_two_matches_hand_interpolation(secret: bytes) -> None:
    # Prepare: a line through (0, s), (1, y1), (2, y2) gives s = 2*y1 - y2.
    shares = split(secret, threshold=2, holders=[1, 2])

    # Execute
    by_hand = (2 * y_of(shares[1]) - y_of(shares[2])) % PRIME

    # Assert
    assert by_hand == int.from_bytes(secret, "big")


def test_split_is_randomized_above_threshold_one() -> None:
    # Execute
    first = split(SECRET, threshold=2, holders=[1, 2])
    second = split(SECRET, threshold=2, holders=[1, 2])

    # Assert
    assert first != second


def test_a_single_share_below_threshold_looks_uniform_for_any_secret() -> None:
    # Prepare: one share of a threshold-2 sharing is s + a*x with a uniform, so its
    # leading byte, as a fraction of the field, is uniform whatever the secret.
    samples = 2_000
    low, high = bytes(32), b"\xff" * 32

    # Execute
    def mean_top_byte(secret: bytes) -> float:
        tops = [
            y_of(split(secret, threshold=2, holders=[3, 4])[3]) * 256 // PRIME
            for _ in range(samples)
        ]
        return sum(tops) / samples

    mean_low, mean_high = mean_top_byte(low), mean_top_byte(high)

    # Assert: the mean's standard error is about 1.65, so 10 is over 6 sigma
    assert abs(mean_low - 127.5) < 10
    assert abs(mean_high - 127.5) < 10


# ---- refusals in combine --------------------------------------------------------------


def test_combine_refuses_fewer_than_threshold_shares() -> None:
    # Prepare
    shares = split(SECRET, threshold=3, holders=[1, 2, 3, 4])

    # Execute / Assert
    with pytest.raises(SecAggError, match="need at least 3 shares, got 2"):
        combine({1: shares[1], 2: shares[2]}, threshold=3)


@FAST
@given(tampered=st.sampled_from([1, 2, 3, 4, 5]), delta=st.integers(min_value=1, max_value=2**64))
def test_combine_detects_a_tampered_share_among_extras(tampered: int, delta: int) -> None:
    # Prepare
    shares = split(SECRET, threshold=3, holders=[1, 2, 3, 4, 5])
    shares[tampered] = share_of((y_of(shares[tampered]) + delta) % PRIME)

    # Execute / Assert
    with pytest.raises(SecAggError, match="shares are inconsistent"):
        combine(shares, threshold=3)


def test_combine_refuses_shares_that_do_not_encode_32_bytes() -> None:
    # Prepare: a constant polynomial whose value needs 33 bytes
    shares = {1: share_of(2**256), 2: share_of(2**256)}

    # Execute / Assert
    with pytest.raises(SecAggError, match="shares do not encode a 32-byte secret"):
        combine(shares, threshold=1)


@pytest.mark.parametrize("size", [0, 32, 65, 67])
def test_combine_refuses_a_share_of_wrong_length(size: int) -> None:
    # Prepare
    shares = split(SECRET, threshold=2, holders=[1, 2])
    shares[2] = bytes(size)

    # Execute / Assert
    with pytest.raises(SecAggError, match=f"share of holder 2 must be 66 bytes, got {size}"):
        combine(shares, threshold=2)


def test_combine_refuses_a_share_outside_the_field() -> None:
    # Prepare
    shares = split(SECRET, threshold=2, holders=[1, 2])
    shares[1] = share_of(PRIME)

    # Execute / Assert
    with pytest.raises(SecAggError, match="share of holder 1 is not a field element"):
        combine(shares, threshold=2)


@pytest.mark.parametrize("holder", [0, -1, 2**31 + 1])
def test_combine_refuses_a_bad_holder(holder: int) -> None:
    # Prepare
    shares = split(SECRET, threshold=1, holders=[1])
    shares[holder] = shares[1]

    # Execute / Assert
    with pytest.raises(SecAggError, match=r"holder must be an int in 1\.\.2147483648"):
        combine(shares, threshold=1)


@pytest.mark.parametrize("threshold", [0, -1, True, 2.0])
def test_combine_refuses_a_bad_threshold(threshold: object) -> None:
    # Prepare
    shares = split(SECRET, threshold=2, holders=[1, 2])

    # Execute / Assert
    with pytest.raises(SecAggError, match="threshold must be an int >= 1"):
        combine(shares, threshold=threshold)  # type: ignore[arg-type]


# ---- refusals in split ----------------------------------------------------------------


def test_split_refuses_duplicate_holders_by_name() -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match=r"holders must be distinct, duplicated: \[4\]"):
        split(SECRET, threshold=2, holders=[1, 4, 2, 4])


@pytest.mark.parametrize("holder", [0, -5, 2**31 + 1, True, "3"])
def test_split_refuses_a_bad_holder(holder: object) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match=r"holder must be an int in 1\.\.2147483648"):
        split(SECRET, threshold=1, holders=[1, holder])  # type: ignore[list-item]


@pytest.mark.parametrize("threshold", [0, -2, True, 1.0, None])
def test_split_refuses_a_bad_threshold(threshold: object) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match="threshold must be an int >= 1"):
        split(SECRET, threshold=threshold, holders=[1, 2])  # type: ignore[arg-type]


def test_split_refuses_a_threshold_above_the_holder_count() -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match=r"threshold 4 exceeds the number of holders \(3\)"):
        split(SECRET, threshold=4, holders=[1, 2, 3])


def test_split_refuses_an_empty_holder_list() -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match="threshold 1 exceeds the number of holders"):
        split(SECRET, threshold=1, holders=[])


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_split_refuses_a_secret_of_wrong_length(size: int) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError, match=f"secret must be 32 bytes, got {size}"):
        split(b"\x07" * size, threshold=1, holders=[1])


def test_split_error_does_not_reveal_the_secret() -> None:
    # Prepare
    secret = b"\xab" * 31

    # Execute
    with pytest.raises(SecAggError) as caught:
        split(secret, threshold=1, holders=[1])

    # Assert
    assert secret.hex() not in str(caught.value)
    assert repr(secret) not in str(caught.value)
