"""The encoding of a round's updates that both sides derive from the plan alone: the
site encodes its flat delta with it, the coordinator decodes the sum with it
(common/quantize.py does the encoding itself); an evaluation round's counts are
whole numbers and travel as they are (common/evaluation.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.config import RunConfig
from common.evaluation import COUNT_RING_BITS
from common.quantize import EncodingSpec

if TYPE_CHECKING:
    from common.messages import RoundPlan


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


def payload_shape(plan: RoundPlan, *, num_sites: int, seed: int, dim: int) -> tuple[int, int]:
    """(ring bits, vector length) of a round's masked inputs, from the plan alone: a
    training round's encoded update, or an evaluation round's confusion matrix (one
    signed count per cell in Z_(2^32))."""
    if plan.evaluate:
        k = len(plan.task.labels)
        return COUNT_RING_BITS, k * k
    spec = encoding_spec(plan.config, num_sites=num_sites, seed=seed, dim=dim)
    return spec.ring_bits, spec.encoded_length
