"""The one budget rule: every entry of the site, from every run and on any data, under
an adaptive RDP filter (checked against Google's RDP accountant), a declared disjoint
data set as the only exception; a run's target within what is left; delta below 1/n."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from common.privacy.accounting import compute_epsilon, filter_epsilon
from common.privacy.budget import (
    RunPlan,
    SiteBudget,
    calibrate_run,
    check_delta,
    delta_problem,
)
from common.privacy.errors import PrivacyError
from common.privacy.events import SubsampledGaussianEvent
from common.privacy.identity import SiteIdentity
from common.privacy.ledger import SITE_SCOPE, Ledger, LedgerEntry, read_ledger, scope_of
from tests.support.reference import reference_epsilon, reference_filter_epsilon

DELTA = 1e-5
EVENT = SubsampledGaussianEvent(1.5, 0.25, 4)


def _charge(
    ledger: Ledger,
    run: str,
    rnd: int,
    *,
    dataset: str = "a" * 64,
    scope: str = SITE_SCOPE,
    event: SubsampledGaussianEvent = EVENT,
) -> LedgerEntry:
    return ledger.append(
        site_id="site-1",
        dataset=dataset,
        run_id=run,
        round=rnd,
        event=event,
        clip_norm=1.0,
        delta=DELTA,
        rounds=10,
        public_size=400,
        epsilon_target=8.0,
        epsilon_run=1.0,
        epsilon_lifetime=1.0,
        budget=8.0,
        scope=scope,
        code_version="test",
    )


def _budget(path: Path, scope: str = SITE_SCOPE, budget: float = 8.0) -> SiteBudget:
    return SiteBudget.from_ledger(read_ledger(path), scope=scope, budget=budget, delta=DELTA)


def test_every_entry_counts_whatever_the_data_set(tmp_path: Path, identity: SiteIdentity) -> None:
    # Attack (before): a new fingerprint (one row added) opened a fresh budget.
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    _charge(ledger, "run-a", 1, dataset="a" * 64)
    _charge(ledger, "run-b", 1, dataset="b" * 64)  # the same file plus one row

    budget = _budget(path)

    assert len(budget.entries) == 2 and budget.steps == 8
    assert budget.spent() == pytest.approx(reference_filter_epsilon([(1.5, 0.25, 8)]), rel=1e-9)
    assert budget.spent_if_fixed() == pytest.approx(reference_epsilon(1.5, 0.25, 8), rel=0.02)
    assert budget.spent_if_fixed() < budget.spent()  # the tight figure of a fixed history


def test_a_declared_disjoint_data_set_composes_with_site_wide_entries_only(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    a, b = scope_of("registry-a"), scope_of("registry-b")
    _charge(ledger, "on-a", 1, scope=a)
    _charge(ledger, "on-b", 1, scope=b)
    _charge(ledger, "everything", 1)

    assert len(_budget(path, a).entries) == 2  # its own and the site-wide one
    assert len(_budget(path, b).entries) == 2
    assert len(_budget(path, SITE_SCOPE).entries) == 3  # the site's budget: all of them
    with pytest.raises(Exception, match="disjoint data set name"):
        scope_of("a b")


def test_a_round_fits_only_within_the_lifetime_budget(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    for r in (1, 2, 3):
        _charge(ledger, "run-a", r)
    fits, after = _budget(path).allows(EVENT)
    assert fits and after == pytest.approx(reference_filter_epsilon([(1.5, 0.25, 16)]), rel=1e-9)
    assert _budget(path, budget=after * 0.999).allows(EVENT) == (False, after)
    assert SiteBudget((), 1.0, DELTA, SITE_SCOPE).spent() == 0.0


def test_a_run_asking_more_than_remains_is_refused_in_words(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    for r in range(1, 9):
        _charge(ledger, "run-a", r)
    budget = _budget(path)
    left = budget.budget - budget.spent()
    with pytest.raises(PrivacyError) as refused:
        calibrate_run(budget, target=8.0, sample_rate=0.25, steps=4, rounds=2)
    # The cause first, in words, with the numbers an administrator compares.
    spent = f"{budget.spent():.3f}"
    assert str(refused.value) == (
        f"budget spent: {spent} of 8.000 on this site (8 earlier rounds, as its adaptive "
        f"filter certifies): the run asks for epsilon 8, {8 - float(spent):.3f} is left"
    )
    sigma = calibrate_run(budget, target=left * 0.99, sample_rate=0.25, steps=4, rounds=2)
    run = SubsampledGaussianEvent(sigma, 0.25, 8)
    # Both hold: the run's own epsilon within its target, the lifetime filter within 8.
    assert compute_epsilon([run], DELTA) <= left * 0.99 * 1.0001
    history = [(1.5, 0.25, 32), (sigma, 0.25, 8)]
    assert reference_filter_epsilon(history) <= 8.0 * 1.0001


def test_a_site_keeps_its_reserve_out_of_every_run(tmp_path: Path, identity: SiteIdentity) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    for r in range(1, 3):
        _charge(ledger, "run-a", r)
    budget = _budget(path)
    left = 8.0 - budget.spent()
    assert left > 4
    # A target that fits the budget but not the budget less the reserve is refused...
    with pytest.raises(PrivacyError, match=r"^budget spent: .* is left above its reserve of 3$"):
        calibrate_run(budget, target=left - 1.0, sample_rate=0.25, steps=4, rounds=2, reserve=3.0)
    # ... and a run that fits is calibrated so that the reserve stays: the filter after
    # the whole run, by Google's RDP accountant, is within the budget less the reserve.
    sigma = calibrate_run(
        budget, target=left - 3.5, sample_rate=0.25, steps=4, rounds=20, reserve=3
    )
    history = [(1.5, 0.25, 8), (sigma, 0.25, 80)]
    assert reference_filter_epsilon(history) <= (8.0 - 3.0) * 1.0001
    with pytest.raises(PrivacyError, match=r"reserve 8 is not in \[0, 8\)"):
        calibrate_run(budget, target=0.1, sample_rate=0.25, steps=4, rounds=2, reserve=8.0)


def test_a_target_too_small_for_the_plan_is_named_as_such() -> None:
    fresh = SiteBudget((), 8.0, DELTA, SITE_SCOPE)
    with pytest.raises(PrivacyError) as refused:
        calibrate_run(fresh, target=0.001, sample_rate=1.0, steps=1000, rounds=4)
    assert str(refused.value) == (
        "the run's target epsilon 0.001 is too small for its 4000 steps at sample rate 1 at "
        "any noise: ask for fewer rounds or a larger target"
    )


def test_a_fresh_site_whose_run_asks_the_whole_budget_is_bound_by_the_filter() -> None:
    empty = SiteBudget((), 8.0, DELTA, SITE_SCOPE)
    sigma = calibrate_run(empty, target=8.0, sample_rate=1 / 7, steps=7, rounds=20)
    run = SubsampledGaussianEvent(sigma, 1 / 7, 140)
    assert filter_epsilon([run], DELTA) == pytest.approx(8.0, rel=1e-3)
    assert filter_epsilon([run], DELTA) <= 8.0
    prv = compute_epsilon([run], DELTA)
    assert prv == pytest.approx(reference_epsilon(sigma, 1 / 7, 140), rel=0.02)
    assert prv < 8.0


@pytest.mark.parametrize("seed", range(5))
def test_the_filter_is_googles_rdp_accountant_and_never_below_the_fixed_figure(seed: int) -> None:
    rng = random.Random(seed)
    history = [
        (rng.uniform(0.6, 4.0), rng.choice([0.01, 0.1, 0.25, 1.0]), rng.randint(1, 200))
        for _ in range(rng.randint(1, 4))
    ]
    events = [SubsampledGaussianEvent(*h) for h in history]
    ours = filter_epsilon(events, DELTA)
    assert ours == pytest.approx(reference_filter_epsilon(history), rel=1e-9)
    assert ours >= compute_epsilon(events, DELTA)


def test_a_frozen_plan_names_what_changed() -> None:
    plan = RunPlan(1.2, 0.25, 4, 10, 1.0, 8.0, DELTA, SITE_SCOPE, 400)
    assert plan.change(plan) is None
    asked = RunPlan(9.9, 0.5, 4, 10, 1.0, 8.0, DELTA, SITE_SCOPE, 400)  # noise is the plan's
    assert plan.change(asked) == "sample rate 0.5 (the run started with 0.25)"


@pytest.mark.parametrize(
    ("delta", "n", "problem"),
    [
        (1e-5, 1000, None),
        (0.01, 100, "delta 0.01 is not below 1/n = 0.01"),
        (0.5, 3, "delta 0.5 is not below 1/n = 0.333"),
        (1e-5, 0, "delta 1e-05 is not below 1/n = undefined (no examples)"),
    ],
)
def test_delta_must_be_below_one_over_n(delta: float, n: int, problem: str | None) -> None:
    assert delta_problem(delta, n) == problem
    if problem is None:
        check_delta(delta, n)
    else:
        with pytest.raises(PrivacyError, match="is not below 1/n"):
            check_delta(delta, n)
