"""What a site ran, as immutable values: the one mechanism of DP-SGD with Poisson
sampling, and the composition history an accountant reads. No accountant here (no
Opacus): the ledger, the budget check and the auditor all speak these values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from common.privacy.errors import PrivacyError

# Opacus's PRV accountant bounds its own numerical error by this much epsilon.
PRV_EPS_ERROR = 0.01
# Above this epsilon the PRV accountant's grid grows too large: an RDP upper bound is
# recorded instead (common/privacy/accounting.py).
PRV_MAX_EPSILON = 64.0
# The Renyi orders of the adaptive privacy filter (a site's lifetime budget): fixed in
# advance, as the filter's guarantee requires; delta is split evenly over them.
# Integer orders only: there the RDP of the subsampled Gaussian has a closed form on
# which Opacus and Google's accountant agree to the last digits (at fractional orders
# they differ by up to 3%, and below 2 Google's series gives up); orders below 2
# matter only for epsilons far above any budget.
FILTER_ORDERS: tuple[float, ...] = (
    2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0, 64.0, 96.0,
    128.0, 256.0,
)  # fmt: skip


@dataclass(frozen=True)
class SubsampledGaussianEvent:
    """``steps`` DP-SGD steps: Poisson sampling at ``sample_rate``, Gaussian noise of
    std ``noise_multiplier * clip`` on the sum of clipped per-example gradients."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise PrivacyError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise PrivacyError(f"steps must be a non-negative integer, got {self.steps!r}")


def merged_history(events: Sequence[SubsampledGaussianEvent]) -> list[tuple[float, float, int]]:
    """(sigma, q, steps) history, consecutive equal mechanisms merged (same composition)."""
    history: list[tuple[float, float, int]] = []
    for e in events:
        if e.steps == 0:
            continue
        if history and history[-1][:2] == (e.noise_multiplier, e.sample_rate):
            sigma, q, steps = history.pop()
            history.append((sigma, q, steps + e.steps))
        else:
            history.append((e.noise_multiplier, e.sample_rate, e.steps))
    return history
