"""Model arrays as one flat vector (the layout both sides agree on without talking) and
the L2 clip of a site's model delta."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.arrays import clip_update, flatten, unflatten

ARRAYS = {"b": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "a": torch.tensor([5.0, 6.0])}


def test_flat_layout_is_sorted_names_row_major_and_inverts() -> None:
    flat = flatten(ARRAYS)
    assert flat.dtype == np.float64 and flat.tolist() == [5.0, 6.0, 1.0, 2.0, 3.0, 4.0]
    back = unflatten(flat, ARRAYS)
    assert list(back) == ["a", "b"]
    assert all(torch.equal(back[k], ARRAYS[k]) for k in ARRAYS)
    with pytest.raises(ValueError, match="the model has 6 values"):
        unflatten(np.zeros(5), ARRAYS)


def test_clip_scales_into_the_ball_only_when_needed() -> None:
    norm = math.sqrt(sum(float((v**2).sum()) for v in ARRAYS.values()))  # sqrt(91)
    same, clipped = clip_update(ARRAYS, norm + 1e-9)
    assert not clipped and all(torch.equal(same[k], ARRAYS[k]) for k in ARRAYS)
    small, clipped = clip_update(ARRAYS, 1.0)
    assert clipped
    assert float(np.linalg.norm(flatten(small))) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(flatten(small) * norm, flatten(ARRAYS), rtol=1e-6)
