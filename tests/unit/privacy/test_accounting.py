"""Accounting against an independent implementation (Google's dp_accounting PLD)."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant

from common.privacy.accounting import (
    PrivacyAccountant,
    PrivacyError,
    SubsampledGaussianEvent,
    calibrate_noise_multiplier,
    compute_epsilon,
)

DELTA = 1e-5


def reference_epsilon(sigma: float, q: float, steps: int, delta: float = DELTA) -> float:
    """Google's privacy-loss-distribution accountant: independent of Opacus."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


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


def test_rounds_compose_as_one_mechanism_not_as_a_sum() -> None:
    # Prepare: two rounds of the same mechanism, as a site rebuilds them from its ledger.
    event = SubsampledGaussianEvent(1.2, 0.25, 4)
    one_round = PrivacyAccountant([event]).epsilon(DELTA)

    # Execute
    two_rounds = PrivacyAccountant([event, event]).epsilon(DELTA)

    # Assert: grows, equals one accountant over both rounds, and is no sum of epsilons
    one_run = compute_epsilon([SubsampledGaussianEvent(1.2, 0.25, 8)], DELTA)
    assert two_rounds > one_round
    assert two_rounds == pytest.approx(one_run, rel=1e-9)
    assert two_rounds < 2 * one_round
    assert two_rounds == pytest.approx(reference_epsilon(1.2, 0.25, 8), rel=0.02)
    assert PrivacyAccountant([event, event]).steps == 8


def test_epsilon_if_does_not_change_the_accountant() -> None:
    acc = PrivacyAccountant([SubsampledGaussianEvent(1.0, 0.1, 10)])
    before = acc.epsilon(DELTA)
    planned = acc.epsilon_if(SubsampledGaussianEvent(1.0, 0.1, 10), DELTA)
    assert planned > before == acc.epsilon(DELTA)
    assert acc.steps == 10


def test_huge_epsilons_use_the_rdp_upper_bound_without_exhausting_memory() -> None:
    # PRV at q=1 and 10,000 steps asked for 24 GB; the RDP bound answers at once and
    # stays an upper bound of the independent accountant's epsilon.
    event = SubsampledGaussianEvent(1.0, 1.0, 10_000)
    ours = compute_epsilon([event], DELTA)
    assert ours == compute_epsilon([event], DELTA, accountant="rdp")
    assert ours >= reference_epsilon(1.0, 1.0, 10_000)


def test_no_steps_spend_nothing() -> None:
    assert compute_epsilon([], DELTA) == 0.0
    assert PrivacyAccountant().epsilon(DELTA) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1},
        {"noise_multiplier": float("nan"), "sample_rate": 0.1, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -1},
        {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2.5},
    ],
)
def test_bad_events_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(PrivacyError):
        SubsampledGaussianEvent(**kwargs)  # type: ignore[arg-type]


def test_bad_state_and_parameters_fail_closed() -> None:
    with pytest.raises(PrivacyError):
        compute_epsilon([SubsampledGaussianEvent(1.0, 0.1, 1)], 0.0)
    with pytest.raises(PrivacyError):
        calibrate_noise_multiplier(target_epsilon=-1.0, delta=DELTA, sample_rate=0.1, steps=10)
    with pytest.raises(PrivacyError):
        calibrate_noise_multiplier(target_epsilon=1e-4, delta=DELTA, sample_rate=1.0, steps=10_000)
