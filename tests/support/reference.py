"""Independent references the privacy tests compare against (never fedsilo's own code)."""

from __future__ import annotations

import dp_accounting
import numpy as np
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


def reference_history_epsilon(
    history: list[tuple[float, float, int]], delta: float = DELTA
) -> float:
    """Google's PLD accountant over a history of (sigma, q, steps): a fixed sequence of
    mechanisms, composed."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        accountant.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps,
            )
        )
    return float(accountant.get_epsilon(delta))


def reference_filter_epsilon(
    history: list[tuple[float, float, int]], delta: float = DELTA
) -> float:
    """What an adaptive RDP filter over the orders FILTER_ORDERS certifies for a
    history of (sigma, q, steps), by Google's RDP accountant (not Opacus's): each
    order's RDP converted at delta / K, the smallest taken."""
    from common.privacy.events import FILTER_ORDERS  # the grid is a constant, not code

    if not history:
        return 0.0
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(FILTER_ORDERS))
    for sigma, q, steps in history:
        accountant.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps,
            )
        )
    return float(accountant.get_epsilon(delta / len(FILTER_ORDERS)))


def add_mod(a: np.ndarray, b: np.ndarray, ring_bits: int) -> np.ndarray:
    """Elementwise (a + b) mod 2^ring_bits in Python integers: independent of the uint64
    wrap-around and masks the code under test relies on."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    total = (a.astype(object) + b.astype(object)) % (1 << ring_bits)
    return total.astype(np.uint64)
