"""The encoding of a round's updates that both sides derive from the plan alone: the
site encodes its flat delta with it, the coordinator decodes the sum with it
(common/quantize.py does the encoding itself)."""

from __future__ import annotations

from common.config import RunConfig
from common.quantize import EncodingSpec


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
