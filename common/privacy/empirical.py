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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, beta: float = 0.05) -> float:
    """The largest epsilon that v correct guesses out of r (about m canaries) reject at
    level beta: with probability at least 1 - beta the mechanism is not
    (epsilon', delta)-DP for any epsilon' below it. 0 when nothing is rejected."""
    _check(m, r, v, delta)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < beta:  # p grows with epsilon
        low, high = high, 2 * high
        if high > _EPS_CEILING:
            return _EPS_CEILING
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < beta:
            low = mid
        else:
            high = mid
    return low


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
) -> tuple[float, tuple[int, int]]:
    """The best lower bound over a grid of (k+, k-) declared in advance, each at level
    beta / len(grid) (Bonferroni), so the largest is valid at level beta; and the
    (k+, k-) that gave it."""
    if not grid:
        raise ValueError("declare at least one (k+, k-) pair")
    m = len(scores)
    best = (0.0, grid[0])
    for k_plus, k_minus in grid:
        r, v = guess_counts(scores, included, k_plus, k_minus)
        bound = epsilon_lower_bound(m, r, v, delta=delta, beta=beta / len(grid))
        if bound > best[0]:
            best = (bound, (k_plus, k_minus))
    return best
