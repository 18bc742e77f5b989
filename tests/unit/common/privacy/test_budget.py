"""The one budget rule: every entry on a data set, from every run, composed at the site's
delta (checked against Google's PLD accountant); and delta below 1/n."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.privacy.accounting import compute_epsilon
from common.privacy.budget import DatasetBudget, check_delta, delta_problem
from common.privacy.errors import PrivacyError
from common.privacy.events import SubsampledGaussianEvent
from common.privacy.identity import SiteIdentity
from common.privacy.ledger import Ledger, dataset_fingerprint, read_ledger
from tests.support.reference import reference_epsilon
from tests.unit.common.privacy.ledgers import DATASET, DELTA, EVENT, append, stamp


def _budget(path: Path, budget: float = 8.0, dataset: str = DATASET) -> DatasetBudget:
    return DatasetBudget.from_ledger(read_ledger(path), dataset, budget=budget, delta=DELTA)


def test_rounds_compose_as_one_mechanism_not_as_a_sum(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: one and then two rounds of the same mechanism in a site's ledger.
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    append(ledger, "run-a", 1, dataset_rounds=1)
    one_round = _budget(path).spent()

    # Execute
    append(ledger, "run-a", 2, dataset_rounds=2)
    two_rounds = _budget(path).spent()

    # Assert: grows, equals one accountant over both rounds, and is no sum of epsilons.
    one_run = compute_epsilon([SubsampledGaussianEvent(1.5, 0.25, 8)], DELTA)
    assert two_rounds > one_round
    assert two_rounds == pytest.approx(one_run, rel=1e-9)
    assert two_rounds < 2 * one_round
    assert two_rounds == pytest.approx(reference_epsilon(1.5, 0.25, 8), rel=0.02)
    assert _budget(path).steps == 8


def test_what_a_round_would_spend_changes_nothing_spent(ledger_path: Path) -> None:
    # Prepare: five entries of two runs.
    budget = _budget(ledger_path)
    before = budget.spent()

    # Execute
    planned = budget.after(EVENT)

    # Assert
    assert planned > before == budget.spent()
    assert planned == pytest.approx(reference_epsilon(1.5, 0.25, 24), rel=0.02)
    assert budget.steps == 20


def test_every_run_on_the_data_set_counts_and_no_other_data_set(
    ledger_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: a spend on another data set in the same ledger.
    other = dataset_fingerprint(["another text"], [0])
    append(
        Ledger(ledger_path, identity), "run-c", 1, dataset_rounds=1, dataset=other, time=stamp(9)
    )

    # Execute
    mine, theirs = _budget(ledger_path), _budget(ledger_path, dataset=other)

    # Assert: run-a's and run-b's entries compose; run-c's is on its own data set.
    assert len(mine.entries) == 5 and len(theirs.entries) == 1
    assert mine.spent() == pytest.approx(reference_epsilon(1.5, 0.25, 20), rel=0.02)
    assert mine.earlier_runs("run-b") == (EVENT,) * 3
    assert mine.earlier_runs("run-new") == (EVENT,) * 5


def test_a_round_fits_only_within_the_budget(ledger_path: Path) -> None:
    spent = _budget(ledger_path).spent()
    fits, after = _budget(ledger_path).allows(EVENT)
    assert fits and after > spent
    tight = _budget(ledger_path, budget=after * 0.999)
    assert tight.allows(EVENT) == (False, after)
    assert DatasetBudget((), 1.0, DELTA).spent() == 0.0


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
