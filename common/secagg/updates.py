"""Model deltas as flat vectors, and the encoding both sides derive for a round.

The site and the coordinator must agree, without talking, on the layout of the flat
vector (arrays in sorted name order, each flattened row-major) and on every public
parameter of the encoding; both come from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from common.config import RunConfig
from common.quantize import EncodingSpec, FloatArray

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


def site_weight(cfg: RunConfig, num_examples: int) -> int:
    """A site's aggregation weight: 1, or its example count capped at the public bound."""
    return 1 if cfg.weighting == "uniform" else max(1, min(num_examples, cfg.max_site_weight))


def encoding_spec(cfg: RunConfig, *, num_sites: int, seed: int, dim: int) -> EncodingSpec:
    """The round's public encoding: both sides call this with the same arguments."""
    return EncodingSpec(
        clip_norm=cfg.update_clip_norm,
        bits=cfg.secagg_bits,
        num_sites=num_sites,
        seed=seed,
        dim=dim,
        weight_bound=1 if cfg.weighting == "uniform" else cfg.max_site_weight,
    )
