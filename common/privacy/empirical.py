"""Empirical lower bounds on epsilon from one training run (issue 16; pure statistics).

One-run auditing (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023): m canaries are each included with probability 1/2 by a secret
coin; after one run the auditor guesses the coins of r of them (the rest abstain) and
counts the v correct guesses. If the mechanism is (epsilon, delta)-DP, v is
stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta term
(their Theorem 3.1), so a large v rejects "epsilon or less" at a p-value, and the
largest epsilon still rejected at confidence 1 - beta is a lower bound that holds with
probability at least 1 - beta.

The delta term is the paper's own (its Algorithm 2's ``alpha * delta * 2m``); some
public copies of the code comment it out, which overstates the bound when delta > 0.
Guesses must be fixed before the scores are seen, or chosen by a rule declared in
advance (no search over r on the same scores).

The f-DP bound (Mahloujifar, Melis and Chaudhuri, "Auditing f-Differential Privacy in
One Run", ICML 2025, their ``audit_rh_with_cap``; jax_privacy's auditing.py) is
tighter: it tests the claim "the mechanism's trade-off curve is at least the Gaussian
one G_mu with the claimed (epsilon, delta)" and reports the largest epsilon whose mu it
rejects. That claim is stronger than (epsilon, delta)-DP: DP-SGD's curve is close to
Gaussian over many steps (central limit), but a mechanism that is (epsilon, delta)-DP
need not be G_mu-DP, so the Steinke bound, valid for every (epsilon, delta)-DP
mechanism, is reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr, ndtri
from scipy.stats import binom

# Bisection steps of the lower bound: the bracket [0, eps_max] halves 40 times.
_BISECTION_STEPS = 40
_EPS_CEILING = 100.0


def _check(m: int, r: int, v: int, delta: float) -> None:
    if not (isinstance(m, int) and isinstance(r, int) and isinstance(v, int)):
        raise TypeError("m, r and v are whole numbers of canaries and guesses")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The probability, under any (epsilon, delta)-DP mechanism, that r guesses about m
    canaries' coins get v or more right (Steinke et al. 2023, Theorem 3.1 with its
    delta term): P[Binomial(r, q) >= v] + 2 m delta max_i P[v > Binomial(r, q) >= v - i] / i,
    q = e^eps / (1 + e^eps)."""
    _check(m, r, v, delta)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and non-negative, got {epsilon}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if delta > 0 and v > 0:
        # P[v > Binomial(r, q) >= v - i] for i = 1..v, each divided by i
        below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


@lru_cache(maxsize=4096)
def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, beta: float = 0.05) -> float:
    """The largest epsilon that v correct guesses out of r (about m canaries) reject at
    level beta: with probability at least 1 - beta the mechanism is not
    (epsilon', delta)-DP for any epsilon' below it. 0 when nothing is rejected."""
    _check(m, r, v, delta)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    return _largest_rejected(lambda eps: p_value(m, r, v, eps, delta) < beta)


def _largest_rejected(rejected: Callable[[float], bool]) -> float:
    """The largest epsilon in [0, _EPS_CEILING] that ``rejected`` (true on an interval
    from 0) holds for, by doubling then bisection; 0 when it holds for none."""
    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        if high >= _EPS_CEILING:
            return _EPS_CEILING
        low, high = high, min(2 * high, _EPS_CEILING)
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        if rejected(mid):
            low = mid
        else:
            high = mid
    return low


def gaussian_delta(epsilon: float, mu: float) -> float:
    """The delta of the Gaussian trade-off curve G_mu at epsilon (Dong, Roth, Su 2022,
    Corollary 2.13; Balle and Wang 2018): Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2),
    the second term in logs so that a large epsilon does not overflow."""
    if mu <= 0:
        return 0.0
    head = float(ndtr(-epsilon / mu + mu / 2))
    tail = math.exp(epsilon + float(log_ndtr(-epsilon / mu - mu / 2)))
    return max(0.0, head - tail)


def gaussian_mu(epsilon: float, delta: float) -> float:
    """The mu of the Gaussian trade-off curve that is (epsilon, delta)-DP and no more
    (delta is increasing in mu); 1 / mu is the noise multiplier of the Gaussian mechanism
    calibrated to (epsilon, delta)."""
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and non-negative, got {epsilon}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"the Gaussian curve needs 0 < delta < 1, got {delta}")
    high = 1.0
    while gaussian_delta(epsilon, high) < delta:
        high *= 2
    return float(brentq(lambda mu: gaussian_delta(epsilon, mu) - delta, 0.0, high, xtol=1e-12))


def fdp_rejects(m: int, r: int, v: int, mu: float, beta: float) -> bool:
    """Whether v correct guesses out of r (about m canaries) reject "the mechanism is
    G_mu-DP" at level beta (Mahloujifar et al. 2025, the recursion of their
    ``audit_rh_with_cap``): starting from the mass beta v / m of correct and
    beta (r - v) / m of wrong guesses, each step down in correct guesses must pay the
    trade-off curve's price; if the mass needed exceeds the r / m guessed, an attack
    that good has probability below beta under the claim."""
    _check(m, r, v, 0.0)
    if r == 0:
        return False
    blow_up = 0.0  # the inverse of the curve's blow-up: Phi(Phi^-1(x) - mu)
    right, wrong = beta * v / m, beta * (r - v) / m
    for i in range(v - 1, -1, -1):
        blow_up = float(ndtr(ndtri(min(right, 1.0)) - mu))
        if blow_up <= wrong:
            break  # neither mass changes again
        right = min(right + i / (r - i) * (blow_up - wrong), 1.0)
        wrong = blow_up
    return right + wrong > r / m


@lru_cache(maxsize=4096)
def fdp_lower_bound(m: int, r: int, v: int, *, delta: float, beta: float = 0.05) -> float:
    """The largest epsilon whose Gaussian curve (mu = ``gaussian_mu(epsilon, delta)``)
    v correct guesses out of r reject at level beta; 0 when none is rejected. The
    curve only widens with epsilon, so the rejected epsilons are an interval from 0."""
    _check(m, r, v, delta)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"the f-DP bound needs 0 < delta < 1, got {delta}")

    return _largest_rejected(lambda eps: fdp_rejects(m, r, v, gaussian_mu(eps, delta), beta))


def guess_counts(
    scores: Sequence[float], included: Sequence[bool], k_plus: int, k_minus: int
) -> tuple[int, int]:
    """(guesses, correct) of the auditor that guesses "included" for the k_plus highest
    scores and "excluded" for the k_minus lowest, abstaining on the rest; k_plus and
    k_minus are fixed before the scores are seen. Ties are broken by position, which
    the scores cannot depend on."""
    m = len(scores)
    if len(included) != m:
        raise ValueError(f"{m} scores for {len(included)} canaries")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"k+ ({k_plus}) and k- ({k_minus}) must be >= 0 with k+ + k- <= {m}")
    order = sorted(range(m), key=lambda i: (scores[i], i))  # ascending
    correct = sum(1 for i in order[m - k_plus :] if included[i]) if k_plus else 0
    correct += sum(1 for i in order[:k_minus] if not included[i])
    return k_plus + k_minus, correct


def bonferroni_lower_bound(
    scores: Sequence[float],
    included: Sequence[bool],
    grid: Sequence[tuple[int, int]],
    *,
    delta: float,
    beta: float = 0.05,
    method: Literal["steinke", "fdp"] = "steinke",
) -> tuple[float, tuple[int, int]]:
    """The best lower bound over a grid of (k+, k-) declared in advance, each at level
    beta / len(grid) (Bonferroni), so the largest is valid at level beta; and the
    (k+, k-) that gave it. ``method``: the Steinke bound or the f-DP (Gaussian) one."""
    if not grid:
        raise ValueError("declare at least one (k+, k-) pair")
    if method not in ("steinke", "fdp"):
        raise ValueError(f"unknown bound {method!r}; choose 'steinke' or 'fdp'")
    bound_of = epsilon_lower_bound if method == "steinke" else fdp_lower_bound
    m = len(scores)
    best = (0.0, grid[0])
    for k_plus, k_minus in grid:
        r, v = guess_counts(scores, included, k_plus, k_minus)
        bound = bound_of(m, r, v, delta=delta, beta=beta / len(grid))
        if bound > best[0]:
            best = (bound, (k_plus, k_minus))
    return best
