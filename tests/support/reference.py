"""Independent references the privacy tests compare against (never fedsilo's own code)."""

from __future__ import annotations

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

DELTA = 1e-5


def reference_epsilon(sigma: float, q: float, steps: int, delta: float = DELTA) -> float:
    """Google's privacy-loss-distribution accountant: independent of Opacus."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))
