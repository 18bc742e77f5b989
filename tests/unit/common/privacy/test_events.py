"""A mechanism event refuses parameters that cannot describe DP-SGD."""

from __future__ import annotations

import pytest

from common.privacy.errors import PrivacyError
from common.privacy.events import SubsampledGaussianEvent, merged_history


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1},
        {"noise_multiplier": float("nan"), "sample_rate": 0.1, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -1},
        {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2.5},
    ],
)
def test_bad_events_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(PrivacyError):
        SubsampledGaussianEvent(**kwargs)  # type: ignore[arg-type]


def test_consecutive_equal_mechanisms_merge_and_empty_ones_drop() -> None:
    a, b = SubsampledGaussianEvent(1.0, 0.1, 3), SubsampledGaussianEvent(2.0, 0.1, 2)
    empty = SubsampledGaussianEvent(1.0, 0.1, 0)
    assert merged_history([a, a, empty, b, a]) == [(1.0, 0.1, 6), (2.0, 0.1, 2), (1.0, 0.1, 3)]
