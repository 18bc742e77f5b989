"""Model arrays as flat vectors, and the L2 clip of a site's model delta.

Both sides agree, without talking, on the layout of the flat vector: arrays in sorted
name order, each flattened row-major (the secure sum is of these vectors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from common.rotation import FloatArray

Arrays = dict[str, torch.Tensor]


def flatten(arrays: Mapping[str, torch.Tensor]) -> FloatArray:
    """One float64 vector, arrays in sorted name order."""
    parts = [arrays[k].detach().cpu().reshape(-1).double().numpy() for k in sorted(arrays)]
    flat: FloatArray = np.concatenate(parts) if parts else np.zeros(0)
    return flat


def unflatten(vector: FloatArray, like: Mapping[str, torch.Tensor]) -> Arrays:
    """Undo ``flatten`` with the names, shapes and dtypes of ``like``."""
    total = sum(v.numel() for v in like.values())
    if vector.shape != (total,):
        raise ValueError(f"vector has shape {vector.shape}, the model has {total} values")
    out: Arrays = {}
    start = 0
    for k in sorted(like):
        ref = like[k]
        part = vector[start : start + ref.numel()]
        out[k] = torch.from_numpy(part.copy()).to(ref.dtype).reshape(ref.shape)
        start += ref.numel()
    return out


def clip_update(delta: Mapping[str, torch.Tensor], bound: float) -> tuple[Arrays, bool]:
    """Scale ``delta`` into the L2 ball of radius ``bound``; says whether it had to."""
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in delta.values()))
    if norm <= bound:
        return dict(delta), False
    scale = bound / norm
    return {k: v * scale for k, v in delta.items()}, True
