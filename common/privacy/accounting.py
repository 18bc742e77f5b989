"""Privacy accounting for DP-SGD with Poisson sampling: epsilon of a history of
events, and the noise that spends a budget exactly.

A mechanism run is an immutable event (common/privacy/events.py); an accountant
composes a list of them. The record of what was run is the site's signed ledger
(common/privacy/ledger.py), from which the events are rebuilt. The mathematics is
Opacus's PRV accountant (tight: numerical composition of privacy-loss distributions),
which only the training path loads; the tests check it against Google's dp_accounting,
an independent implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Literal

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)
from scipy.optimize import brentq

from common.privacy.errors import PrivacyError
from common.privacy.events import (
    FILTER_ORDERS,
    PRV_EPS_ERROR,
    PRV_MAX_EPSILON,
    SubsampledGaussianEvent,
    merged_history,
)

AccountantName = Literal["prv", "rdp"]
MAX_NOISE_MULTIPLIER = 1000.0
MIN_NOISE_MULTIPLIER = 0.3


History = tuple[tuple[float, float, int], ...]  # (sigma, q, steps), merged


def compute_epsilon(
    events: list[SubsampledGaussianEvent], delta: float, *, accountant: AccountantName = "prv"
) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (0 for no steps)."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    history = tuple(merged_history(events))
    if not history:
        return 0.0
    if accountant == "prv":
        # PRV's discretisation grows with epsilon (3 GB and 10 s at epsilon 420; 24 GB
        # killed a test at q=1, 10,000 steps). Beyond PRV_MAX_EPSILON the RDP bound,
        # looser but still an upper bound, is returned: safe for every budget check.
        bound = _rdp_epsilon(history, delta)
        if bound > PRV_MAX_EPSILON:
            return bound
        return _prv_epsilon(history, delta)
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    raise PrivacyError(f"unknown accountant {accountant!r}; use 'prv' or 'rdp'")


# Opacus's accountants, computed as they compute them, with one difference: the RDP of
# one step of a (q, sigma) mechanism at each order is computed once per process and
# reused (RDP composes by adding steps * that), where Opacus computes it afresh three
# times per call (the RDP bound above and twice in the PRV domain size); and an epsilon
# asked for twice (a round's spend on the data set and in the run are one history when
# the run is the data set's only one) is computed once. A site asks for the same
# mechanism every round: this cut its accounting from about 1.1 s to a few hundredths
# of a second per round (2 cores), with the very same numbers (test_accounting.py in
# tests/unit/common/privacy checks equality with Opacus's own accountants).
_ALPHAS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)


@lru_cache(maxsize=1024)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    rdp: np.ndarray = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(_ALPHAS)
    )
    rdp.setflags(write=False)
    return rdp


@lru_cache(maxsize=1024)
def _rdp_epsilon(history: History, delta: float) -> float:
    """``RDPAccountant.get_epsilon`` of ``history`` at its default orders."""
    rdp = sum([_rdp_one_step(q, sigma) * steps for sigma, q, steps in history])
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(_ALPHAS), rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=256)
def _prv_epsilon(history: History, delta: float) -> float:
    """``PRVAccountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR)`` of ``history``:
    Opacus's discretisation, domain (remark 5.6 of Gopi et al.) and composition."""
    eps_error, delta_error = PRV_EPS_ERROR, delta / 1000
    counts = [steps for _, _, steps in history]
    total = sum(counts)
    # compute_safe_domain_size, with the cached RDP
    size = _rdp_epsilon(history, delta_error / 4)
    for sigma, q, _ in history:
        size = max(size, _rdp_epsilon(((sigma, q, 1),), delta_error / (8 * total)))
    half_width = max(size, eps_error) + 3
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    # At q = 1 Opacus's PRV takes log(1 - q) = -inf on purpose (numpy warns); the result
    # matches an independent PLD accountant (tests/unit/common/privacy).
    with np.errstate(divide="ignore"):
        prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
        truncated = [TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max) for p in prvs]
        dprv = compose_heterogeneous(
            dprvs=[discretize(t, domain) for t in truncated], num_self_compositions=counts
        )
        _, _, eps_upper = dprv.compute_epsilon(delta, delta_error, eps_error)
    return float(eps_upper)


@lru_cache(maxsize=4096)
def _filter_rdp_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    rdp: np.ndarray = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(FILTER_ORDERS)
    )
    rdp.setflags(write=False)
    return rdp


def filter_epsilon(events: list[SubsampledGaussianEvent], delta: float) -> float:
    """The epsilon an RDP privacy filter certifies for ``events`` even when each was
    chosen after the outputs of those before it (Feldman & Zrnic 2021): at every order
    of the fixed grid FILTER_ORDERS the RDP adds up, each order converted to (epsilon,
    delta / K) by Balle et al. 2020's bound (Opacus's and dp_accounting's), and the
    smallest is taken. Union bound over the K orders: whichever order ends up smallest,
    the whole adaptive sequence is (epsilon, delta)-DP (docs/threat-model.md proves
    it). 0 for no steps."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    history = merged_history(events)
    if not history:
        return 0.0
    rdp = sum([_filter_rdp_one_step(q, sigma) * steps for sigma, q, steps in history])
    orders = np.asarray(FILTER_ORDERS)
    eps = (
        rdp
        + np.log1p(-1.0 / orders)
        - (math.log(delta / len(FILTER_ORDERS)) + np.log(orders)) / (orders - 1)
    )
    finite = eps[np.isfinite(eps)]
    if finite.size == 0:  # fail closed: no order gives a bound
        return math.inf
    return float(max(0.0, finite.min()))


def _smallest_sigma(excess: Callable[[float], float], what: str) -> float:
    """The smallest noise multiplier with ``excess(sigma) <= 0`` (to within 0.1%, never
    above), for an excess that falls as sigma grows; Brent's method on log(sigma)."""

    def at(log_sigma: float) -> float:
        return excess(math.exp(log_sigma))

    lo, hi = 0.0, 0.0  # log sigma brackets: at(lo) > 0 >= at(hi)
    if at(0.0) > 0:
        while at(hi) > 0:
            lo, hi = hi, hi + math.log(2.0)
            if hi > math.log(MAX_NOISE_MULTIPLIER):
                raise PrivacyError(what)
    else:
        while at(lo) <= 0:
            if lo - math.log(2.0) < math.log(MIN_NOISE_MULTIPLIER):
                return math.exp(lo)  # the budget hardly constrains: keep this noise
            hi, lo = lo, lo - math.log(2.0)
    sigma = math.exp(float(brentq(at, lo, hi, xtol=1e-5)))
    # Fail closed: never return a sigma that overspends by our own accountant.
    while excess(sigma) > 0:
        sigma *= 1.0002
    return sigma


@lru_cache(maxsize=64)
def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: tuple[SubsampledGaussianEvent, ...] = (),
) -> float:
    """The noise multiplier whose ``steps`` steps, composed after the ``prior`` events
    already spent, bring the total to ``target_epsilon`` (to within 0.1%, never above).
    Brent's method on log(sigma) with the PRV accountant takes about ten evaluations
    (1-2 s); cached per distinct plan."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyError(f"target epsilon must be a positive number, got {target_epsilon}")
    if steps < 1:
        raise PrivacyError(f"a plan needs at least one step, got {steps}")
    already = compute_epsilon(list(prior), delta)
    if already >= target_epsilon:
        raise PrivacyError(f"budget {target_epsilon:g} is already spent ({already:.3f})")

    def excess(sigma: float) -> float:
        event = SubsampledGaussianEvent(sigma, sample_rate, steps)
        return compute_epsilon([*prior, event], delta) - target_epsilon

    return _smallest_sigma(
        excess,
        f"budget epsilon={target_epsilon} is too small for {steps} steps at sample rate "
        f"{sample_rate}",
    )


@lru_cache(maxsize=64)
def calibrate_filter_noise(
    *,
    budget: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: tuple[SubsampledGaussianEvent, ...] = (),
) -> float:
    """The smallest noise multiplier whose ``steps`` steps, after the ``prior`` events,
    keep the adaptive filter (``filter_epsilon``) within ``budget``."""
    if steps < 1:
        raise PrivacyError(f"a plan needs at least one step, got {steps}")

    def excess(sigma: float) -> float:
        event = SubsampledGaussianEvent(sigma, sample_rate, steps)
        return filter_epsilon([*prior, event], delta) - budget

    return _smallest_sigma(
        excess,
        f"what is left of the lifetime budget {budget:g} is too small for {steps} steps "
        f"at sample rate {sample_rate:.4g} at any noise up to {MAX_NOISE_MULTIPLIER:g}",
    )
