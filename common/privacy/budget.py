"""A site's privacy budget: the one rule the ClientApp enforces and ``fedsilo site
check`` reports.

What a data set has spent is every entry on it in the site's ledger, from every run,
composed at the site's current delta (an entry's own epsilon was computed at its own
delta). A round may run only if that composition, with the round added, stays within
the site's budget; and delta must be below 1/n for the guarantee to mean anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.privacy.errors import PrivacyError
from common.privacy.events import SubsampledGaussianEvent
from common.privacy.ledger import LedgerEntry


def delta_problem(delta: float, num_examples: int) -> str | None:
    """Why ``delta`` is too large for a data set of ``num_examples`` (None: it is not)."""
    if num_examples < 1 or delta >= 1.0 / num_examples:
        bound = f"{1.0 / num_examples:.3g}" if num_examples >= 1 else "undefined (no examples)"
        return f"delta {delta:g} is not below 1/n = {bound}"
    return None


def check_delta(delta: float, num_examples: int) -> None:
    """Refuse a delta that is not below 1/n (``PrivacyError``)."""
    problem = delta_problem(delta, num_examples)
    if problem:
        raise PrivacyError(problem)


@dataclass(frozen=True)
class DatasetBudget:
    """Everything spent on one data set (all runs, in ledger order) against a budget."""

    entries: tuple[LedgerEntry, ...]
    budget: float
    delta: float

    @classmethod
    def from_ledger(
        cls, entries: Sequence[LedgerEntry], dataset: str, *, budget: float, delta: float
    ) -> DatasetBudget:
        return cls(tuple(e for e in entries if e.dataset == dataset), budget, delta)

    @property
    def events(self) -> list[SubsampledGaussianEvent]:
        return [e.event for e in self.entries]

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.entries)

    def spent(self) -> float:
        """Epsilon spent so far, composed at the site's delta."""
        return _epsilon(self.events, self.delta)

    def after(self, event: SubsampledGaussianEvent) -> float:
        """Epsilon once ``event`` has also run: the composition, not a sum of epsilons."""
        return _epsilon([*self.events, event], self.delta)

    def allows(self, event: SubsampledGaussianEvent) -> tuple[bool, float]:
        """Whether ``event`` fits the budget, and the epsilon it would bring."""
        after = self.after(event)
        return after <= self.budget, after

    def earlier_runs(self, run_id: str) -> tuple[SubsampledGaussianEvent, ...]:
        """What other runs spent on this data set: a run calibrates its noise after it."""
        return tuple(e.event for e in self.entries if e.run_id != run_id)


def _epsilon(events: list[SubsampledGaussianEvent], delta: float) -> float:
    # Opacus's accountant loads when an epsilon is computed, not when the site's tooling
    # starts (``fedsilo site init`` needs none).
    from common.privacy.accounting import compute_epsilon

    return compute_epsilon(events, delta)
