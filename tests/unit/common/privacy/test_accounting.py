"""Accounting against an independent implementation (Google's dp_accounting PLD)."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from common.privacy.errors import PrivacyError
from common.privacy.events import PRV_EPS_ERROR, SubsampledGaussianEvent
from tests.support.reference import DELTA, reference_epsilon


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [
        (1.0, 0.01, 1000),
        (1.6, 0.25, 120),
        (0.8, 0.05, 200),
        (4.0, 0.5, 50),
        # q = 1: a site with no more examples than the batch size (e.g. in 20ng).
        (3.0, 1.0, 20),
    ],
)
def test_epsilon_agrees_with_independent_pld_accountant(sigma: float, q: float, steps: int) -> None:
    ours = compute_epsilon([SubsampledGaussianEvent(sigma, q, steps)], DELTA)
    assert ours == pytest.approx(reference_epsilon(sigma, q, steps), rel=0.02)


@pytest.mark.parametrize(
    ("target", "q", "steps"), [(8.0, 0.25, 120), (1.0, 0.1, 300), (3.0, 0.02, 500)]
)
def test_calibration_spends_the_target_at_the_last_planned_step(
    target: float, q: float, steps: int
) -> None:
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps
    )
    ours = compute_epsilon([SubsampledGaussianEvent(sigma, q, steps)], DELTA)
    assert target * 0.99 <= ours <= target
    assert reference_epsilon(sigma, q, steps) == pytest.approx(target, rel=0.02)


def test_calibration_after_prior_spend_fills_the_rest_of_the_budget() -> None:
    prior = (SubsampledGaussianEvent(2.0, 0.25, 40),)
    sigma = calibrate_noise_multiplier(
        target_epsilon=8.0, delta=DELTA, sample_rate=0.25, steps=40, prior=prior
    )
    total = compute_epsilon([*prior, SubsampledGaussianEvent(sigma, 0.25, 40)], DELTA)
    assert 8.0 * 0.99 <= total <= 8.0
    with pytest.raises(PrivacyError, match="already spent"):
        calibrate_noise_multiplier(
            target_epsilon=0.5, delta=DELTA, sample_rate=0.25, steps=40, prior=prior
        )


def test_huge_epsilons_use_the_rdp_upper_bound_without_exhausting_memory() -> None:
    # PRV at q=1 and 10,000 steps asked for 24 GB; the RDP bound answers at once and
    # stays an upper bound of the independent accountant's epsilon.
    event = SubsampledGaussianEvent(1.0, 1.0, 10_000)
    ours = compute_epsilon([event], DELTA)
    assert ours == compute_epsilon([event], DELTA, accountant="rdp")
    assert ours >= reference_epsilon(1.0, 1.0, 10_000)


def test_no_steps_spend_nothing() -> None:
    assert compute_epsilon([], DELTA) == 0.0
    assert compute_epsilon([SubsampledGaussianEvent(1.0, 0.1, 0)], DELTA) == 0.0


def test_bad_state_and_parameters_fail_closed() -> None:
    with pytest.raises(PrivacyError):
        compute_epsilon([SubsampledGaussianEvent(1.0, 0.1, 1)], 0.0)
    with pytest.raises(PrivacyError):
        calibrate_noise_multiplier(target_epsilon=-1.0, delta=DELTA, sample_rate=0.1, steps=10)
    with pytest.raises(PrivacyError):
        calibrate_noise_multiplier(target_epsilon=1e-4, delta=DELTA, sample_rate=1.0, steps=10_000)


@pytest.mark.parametrize(
    "history",
    [
        [(1.57, 0.25, 4)],
        [(1.57, 0.25, 80)],
        [(0.8, 0.05, 200), (1.2, 0.1, 30)],
        [(3.0, 1.0, 20)],
        [(1.0, 0.01, 1000), (2.0, 0.5, 3), (1.0, 0.01, 10)],
    ],
)
def test_epsilons_are_opacus_own_to_the_last_bit(history: list[tuple[float, float, int]]) -> None:
    # Prepare: Opacus's own accountants over the same history (computed twice, the second
    # time from the per-step RDP cache).
    events = [SubsampledGaussianEvent(sigma, q, steps) for sigma, q, steps in history]
    prv, rdp = PRVAccountant(), RDPAccountant()
    prv.history = list(history)
    rdp.history = list(history)
    with np.errstate(divide="ignore"):
        expected_prv = float(prv.get_epsilon(delta=DELTA, eps_error=PRV_EPS_ERROR))
    expected_rdp = float(rdp.get_epsilon(delta=DELTA))

    # Execute / Assert
    for _ in range(2):
        assert compute_epsilon(events, DELTA, accountant="rdp") == expected_rdp
        assert compute_epsilon(events, DELTA) == expected_prv
