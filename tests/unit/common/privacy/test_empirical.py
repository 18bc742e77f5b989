"""One-run auditing statistics (issue 16): the Steinke-Nasr-Jagielski p-value and
epsilon lower bound, against known answers, their monotonicity, and randomized response
of known epsilon (the bound must exceed the truth in at most beta of the trials, and
come close to it with many canaries); the f-DP (Gaussian) bound of Mahloujifar et al.,
its curve against Google's dp_accounting, and the Gaussian mechanism of known mu."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
from scipy.stats import binom

from common.privacy.empirical import (
    bonferroni_lower_bound,
    epsilon_lower_bound,
    fdp_lower_bound,
    gaussian_mu,
    guess_counts,
    p_value,
)


def test_all_of_100_guesses_right_without_delta_certifies_3_4929() -> None:
    # The known answer: q^100 = 0.05, eps = log(q / (1 - q))
    assert epsilon_lower_bound(100, 100, 100, delta=0.0, beta=0.05) == pytest.approx(
        3.4929, abs=1e-4
    )
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(1000, 100, 100, delta=0.0) == pytest.approx(
        math.log(q / (1 - q)), abs=1e-6
    )


def test_the_p_value_without_delta_is_the_binomial_tail() -> None:
    q = 1 / (1 + math.exp(-2.0))
    assert p_value(500, 200, 170, 2.0, 0.0) == pytest.approx(float(binom.sf(169, 200, q)))


def test_the_delta_term_only_weakens_the_bound() -> None:
    # The paper's delta term (commented out in some public copies) raises the p-value.
    assert p_value(1000, 100, 95, 2.0, 1e-5) > p_value(1000, 100, 95, 2.0, 0.0)
    bounds = [epsilon_lower_bound(1000, 100, 95, delta=d) for d in (0, 1e-8, 1e-5, 1e-3, 1e-2)]
    assert all(a >= b for a, b in itertools.pairwise(bounds)), bounds
    assert bounds[0] > bounds[-1]


def test_more_correct_guesses_never_lower_the_bound() -> None:
    bounds = [epsilon_lower_bound(1000, 200, v, delta=1e-5) for v in range(100, 201, 5)]
    assert all(a <= b for a, b in itertools.pairwise(bounds)), bounds
    assert bounds[0] == 0.0 and bounds[-1] > 3.0  # a coin toss certifies nothing


def test_bad_counts_are_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match="guesses"):
        epsilon_lower_bound(10, 20, 5, delta=0.0)
    with pytest.raises(ValueError, match="beta"):
        epsilon_lower_bound(10, 10, 5, delta=0.0, beta=1.0)
    with pytest.raises(ValueError, match="delta"):
        p_value(10, 10, 5, 1.0, 2.0)


def _randomized_response(epsilon: float, canaries: int, trials: int, seed: int) -> np.ndarray:
    """Correct guesses of an auditor that guesses every coin from randomized response
    of known epsilon: each guess right with probability e^eps / (1 + e^eps)."""
    q = 1 / (1 + math.exp(-epsilon))
    return np.random.default_rng(seed).binomial(canaries, q, size=trials)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_on_randomized_response_the_bound_exceeds_the_truth_in_at_most_beta(
    epsilon: float,
) -> None:
    trials, canaries, beta = 1000, 1000, 0.05
    correct = _randomized_response(epsilon, canaries, trials, seed=int(epsilon * 10))
    bounds = {v: epsilon_lower_bound(canaries, canaries, int(v), delta=0.0, beta=beta)
              for v in set(correct.tolist())}  # fmt: skip
    exceed = sum(bounds[int(v)] > epsilon for v in correct)
    # at most beta of the trials, within binomial tolerance (4 standard deviations)
    assert exceed <= trials * beta + 4 * math.sqrt(trials * beta * (1 - beta)), exceed


def test_with_ten_thousand_canaries_the_bound_comes_within_90_percent_at_epsilon_1() -> None:
    correct = _randomized_response(1.0, 10_000, trials=20, seed=7)
    bounds = [epsilon_lower_bound(10_000, 10_000, int(v), delta=0.0) for v in correct]
    assert float(np.median(bounds)) >= 0.9
    assert max(bounds) <= 1.2  # and not far above it either


def test_guesses_take_the_highest_and_lowest_scores() -> None:
    scores = [0.9, 0.1, 0.5, 0.8, 0.2, 0.3]
    included = [True, False, True, False, False, True]
    assert guess_counts(scores, included, 2, 2) == (4, 3)  # in: 0, 3 (1 right); out: 1, 4
    assert guess_counts(scores, included, 0, 0) == (0, 0)
    with pytest.raises(ValueError, match="k\\+"):
        guess_counts(scores, included, 4, 3)


@pytest.mark.parametrize("epsilon", [1.0, 2.0])
def test_choosing_k_over_a_declared_grid_on_randomized_response_stays_valid(
    epsilon: float,
) -> None:
    # Randomized response of known epsilon as the scores (each coin flipped with
    # probability 1 / (1 + e^eps); ties broken by position, which the coins cannot
    # move): the best of 4 declared (k+, k-) pairs at beta / 4 each exceeds the truth in
    # at most beta of 1,000 trials.
    m, trials, beta = 1000, 1000, 0.05
    grid = [(50, 50), (100, 100), (250, 250), (500, 500)]
    rng = np.random.default_rng(int(epsilon * 7))
    exceed = 0
    for _ in range(trials):
        included = rng.random(m) < 0.5
        flipped = rng.random(m) < 1 / (1 + math.exp(epsilon))
        scores = (included ^ flipped).astype(float)
        bound, _ = bonferroni_lower_bound(scores.tolist(), included.tolist(), grid, delta=0.0)
        exceed += bound > epsilon
    assert exceed <= trials * beta + 4 * math.sqrt(trials * beta * (1 - beta)), exceed


def test_choosing_k_over_a_declared_grid_keeps_the_bound_valid() -> None:
    # Laplace views of the coins of known epsilon; the bound, the best of 4 declared
    # (k+, k-) pairs at beta / 4 each, exceeds the truth in at most beta of the trials.
    epsilon, m, trials, beta = 1.0, 500, 400, 0.05
    grid = [(50, 50), (100, 100), (250, 250), (25, 0)]
    rng = np.random.default_rng(11)
    exceed = 0
    for _ in range(trials):
        included = rng.random(m) < 0.5
        # a score: the coin seen through the Laplace mechanism of epsilon (an eps-DP view)
        scores = included + rng.laplace(0.0, 1.0 / epsilon, m)
        bound, _ = bonferroni_lower_bound(scores.tolist(), included.tolist(), grid, delta=0.0)
        exceed += bound > epsilon
    assert exceed <= trials * beta + 4 * math.sqrt(trials * beta * (1 - beta)), exceed


# ---- the f-DP (Gaussian trade-off) bound ---------------------------------------------


@pytest.mark.parametrize(("epsilon", "delta"), [(0.5, 1e-6), (1.0, 1e-5), (2.0, 1e-3), (8.0, 1e-5)])
def test_the_gaussian_curve_matches_google_dp_accounting(epsilon: float, delta: float) -> None:
    # An independent reference: the noise multiplier of the calibrated Gaussian mechanism.
    dp_accounting = pytest.importorskip("dp_accounting")
    sigma = dp_accounting.get_sigma_gaussian(epsilon, delta)
    assert gaussian_mu(epsilon, delta) == pytest.approx(1 / sigma, rel=1e-8)


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """The epsilon of G_mu at delta, from Google's dp_accounting (independent of ours)."""
    dp_accounting = pytest.importorskip("dp_accounting")
    return float(dp_accounting.get_epsilon_gaussian(1 / mu, delta))


def test_the_fdp_bound_only_grows_with_correct_guesses_and_shrinks_with_delta() -> None:
    bounds = [fdp_lower_bound(1000, 200, v, delta=1e-5) for v in range(100, 201, 10)]
    assert all(a <= b for a, b in itertools.pairwise(bounds)), bounds
    assert bounds[0] == 0.0 and bounds[-1] > 4.0
    by_delta = [fdp_lower_bound(1000, 100, 95, delta=d) for d in (1e-8, 1e-5, 1e-3, 1e-2)]
    assert all(a >= b for a, b in itertools.pairwise(by_delta)), by_delta
    with pytest.raises(ValueError, match="delta"):
        fdp_lower_bound(1000, 100, 95, delta=0.0)  # no Gaussian curve is (eps, 0)-DP


def _gaussian_audits(
    mu: float, m: int, trials: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per trial: coins, and scores that see each coin through the Gaussian mechanism
    N(mu * coin, 1), whose trade-off curve is exactly G_mu."""
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        included = rng.random(m) < 0.5
        yield included, included * mu + rng.standard_normal(m)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_on_the_gaussian_mechanism_the_fdp_bound_exceeds_the_truth_in_at_most_beta(
    mu: float,
) -> None:
    # k fixed in advance (100 guesses each way out of 1,000 canaries): 1,000 trials.
    delta, beta, trials = 1e-5, 0.05, 1000
    truth = _gaussian_epsilon(mu, delta)
    cache: dict[tuple[int, int], float] = {}
    bounds = []
    for included, scores in _gaussian_audits(mu, 1000, trials, seed=int(mu * 100)):
        r, v = guess_counts(scores.tolist(), included.tolist(), 100, 100)
        if (r, v) not in cache:
            cache[r, v] = fdp_lower_bound(1000, r, v, delta=delta, beta=beta)
        bounds.append(cache[r, v])
    exceed = sum(b > truth for b in bounds)
    assert exceed <= trials * beta + 4 * math.sqrt(trials * beta * (1 - beta)), exceed
    assert float(np.median(bounds)) >= 0.45 * truth  # and it has power: about half the truth


def test_the_fdp_bound_over_a_declared_grid_stays_valid_and_beats_steinke() -> None:
    mu, delta, beta, trials = 2.0, 1e-5, 0.05, 1000
    truth = _gaussian_epsilon(mu, delta)
    grid = [(25, 25), (50, 50), (100, 100), (250, 250)]
    exceed, fdp, steinke = 0, [], []
    for included, scores in _gaussian_audits(mu, 1000, trials, seed=3):
        bound, _ = bonferroni_lower_bound(
            scores.tolist(), included.tolist(), grid, delta=delta, method="fdp"
        )
        exceed += bound > truth
        fdp.append(bound)
        if len(steinke) < 20:
            steinke.append(
                bonferroni_lower_bound(scores.tolist(), included.tolist(), grid, delta=delta)[0]
            )
    assert exceed <= trials * beta + 4 * math.sqrt(trials * beta * (1 - beta)), exceed
    # the point of it: tighter than the Steinke bound on the same runs
    assert float(np.median(fdp[:20])) > 1.2 * float(np.median(steinke))
