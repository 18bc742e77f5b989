"""How Gaussian is DP-SGD's privacy curve? The f-DP audit bound (issue 16) tests the
claim "the trade-off curve is at least the Gaussian one G_mu with the claimed
(epsilon, delta)"; this compares the subsampled Gaussian's true curve (Google's PLD,
dp_accounting) with that G_mu, in regimes of sample rate, steps and epsilon, and prints
the largest shortfall (true curve below G_mu) over a grid of false-positive rates.

    .venv/bin/python benchmarks/fdp_curve.py      # about 20 s on 2 cores
"""

from __future__ import annotations

import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy.stats import norm

from common.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from common.privacy.empirical import gaussian_mu
from common.privacy.events import SubsampledGaussianEvent

REGIMES = [(0.25, 12, 8.0), (0.25, 12, 1.0), (0.01, 300, 2.0), (0.01, 30, 2.0), (0.05, 20, 1.0),
           (0.001, 1000, 1.0), (0.25, 80, 8.0)]  # fmt: skip
DELTA = 1e-5


def shortfall(q: float, steps: int, target: float) -> tuple[float, float, float]:
    """(claim, mu, min over alpha of true curve - G_mu)."""
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps
    )
    claim = compute_epsilon([SubsampledGaussianEvent(sigma, q, steps)], DELTA)
    pld = pld_lib.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=1e-3
    ).self_compose(steps)
    eps = np.linspace(0, 3 * claim + 5, 1500)
    deltas = np.array([pld.get_delta_for_epsilon(e) for e in eps])
    mu = gaussian_mu(claim, DELTA)
    alphas = np.concatenate([np.logspace(-9, -1, 300), np.linspace(0.1, 0.999, 300)])
    # the true curve from the privacy profile: f(a) = sup_eps max(0, 1 - d - e^eps a, e^-eps (1 - d - a))
    curve = np.array(
        [
            np.max(
                np.maximum(
                    0, np.maximum(1 - deltas - np.exp(eps) * a, np.exp(-eps) * (1 - deltas - a))
                )
            )
            for a in alphas
        ]
    )
    gaussian = norm.cdf(norm.ppf(1 - alphas) - mu)
    return claim, mu, float(np.min(curve - gaussian))


def main() -> None:
    print(
        f"{'q':>6} {'steps':>6} {'claim':>7} {'mu':>6}  min(true curve - G_mu)   (delta {DELTA:g})"
    )
    for q, steps, target in REGIMES:
        claim, mu, gap = shortfall(q, steps, target)
        print(f"{q:>6g} {steps:>6d} {claim:>7.3f} {mu:>6.3f}  {gap:+.2e}")


if __name__ == "__main__":
    main()
