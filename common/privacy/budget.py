"""A site's privacy budget: the one rule the ClientApp enforces and ``fedsilo site
check`` reports.

One budget per site. Every round a site ever ran is charged to its lifetime budget
(node config ``epsilon``), whatever the run and whatever the data: editing the data
file, or adding one row, does not open a new budget (that would be adjacency, exactly
what DP protects). A site that truly holds disjoint data sets may declare each by name
(``disjoint-data-set``); a named set is charged with its own rounds and every
site-wide one.

Runs are planned after earlier runs' outputs were seen, so the check across runs is a
privacy filter valid for adaptively chosen mechanisms (``filter_epsilon``: an RDP
filter, Feldman & Zrnic 2021). Within a run the plan is frozen; its epsilon, a fixed
history, is reported with the tight PRV accountant. A run asks for a target epsilon:
its noise is the larger of what reaches that target (PRV, the run alone) and what
keeps the lifetime filter within the budget at its last planned round.

And delta must be below 1/n for the guarantee to mean anything: n is the site's
declared public size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from common.privacy.errors import PrivacyError
from common.privacy.events import SubsampledGaussianEvent
from common.privacy.ledger import LedgerEntry, charged_to


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
class SiteBudget:
    """Everything charged to one budget scope (all runs, in ledger order) against the
    site's lifetime budget for it."""

    entries: tuple[LedgerEntry, ...]
    budget: float
    delta: float
    scope: str

    @classmethod
    def from_ledger(
        cls, entries: Sequence[LedgerEntry], *, scope: str, budget: float, delta: float
    ) -> SiteBudget:
        return cls(tuple(charged_to(entries, scope)), budget, delta, scope)

    @property
    def events(self) -> list[SubsampledGaussianEvent]:
        return [e.event for e in self.entries]

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.entries)

    def spent(self) -> float:
        """Epsilon spent, as the adaptive filter certifies it (the budget's number)."""
        return _filter(self.events, self.delta)

    def spent_if_fixed(self) -> float:
        """The tight PRV epsilon of the same history, valid only had it been fixed in
        advance: reported beside ``spent``, never used to admit a round."""
        return _prv(self.events, self.delta)

    def remaining(self) -> float:
        return max(0.0, self.budget - self.spent())

    def allows(self, event: SubsampledGaussianEvent) -> tuple[bool, float]:
        """Whether ``event`` still fits the budget, and the filter's epsilon after it."""
        after = _filter([*self.events, event], self.delta)
        return after <= self.budget, after

    def run_entries(self, run_id: str) -> list[LedgerEntry]:
        return [e for e in self.entries if e.run_id == run_id]


@dataclass(frozen=True)
class RunPlan:
    """What a run fixes at its first round and keeps to its last: the mechanism
    (sigma, q, steps per round), the number of rounds, the run's target, and what the
    site spends it from. Recorded in every ledger entry of the run."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    rounds: int
    clip_norm: float
    epsilon_target: float
    delta: float
    scope: str
    public_size: int

    @property
    def event(self) -> SubsampledGaussianEvent:
        return SubsampledGaussianEvent(self.noise_multiplier, self.sample_rate, self.steps)

    @classmethod
    def of_entry(cls, entry: LedgerEntry) -> RunPlan | None:
        if entry.schema < 2:
            return None
        assert entry.rounds is not None and entry.public_size is not None
        assert entry.epsilon_target is not None and entry.scope is not None
        return cls(
            noise_multiplier=entry.noise_multiplier,
            sample_rate=entry.sample_rate,
            steps=entry.steps,
            rounds=entry.rounds,
            clip_norm=entry.clip_norm,
            epsilon_target=entry.epsilon_target,
            delta=entry.delta,
            scope=entry.scope,
            public_size=entry.public_size,
        )

    def change(self, asked: RunPlan) -> str | None:
        """What ``asked`` changes of this frozen plan (its noise is this plan's)."""
        for name in PLAN_FIELDS:
            if name == "noise_multiplier":
                continue
            was, now = getattr(self, name), getattr(asked, name)
            if was != now:
                return f"{name.replace('_', ' ')} {now} (the run started with {was})"
        return None


# The fields a run fixes at its first round, as the ledger's entries name them.
PLAN_FIELDS = tuple(f.name for f in fields(RunPlan))


def spent_words(budget: SiteBudget) -> str:
    """The budget's state in words, the start of every refusal for want of budget."""
    n = len(budget.entries)
    return (
        f"budget spent: {budget.spent():.3f} of {budget.budget:.3f} on this site "
        f"({n} earlier round{'' if n == 1 else 's'}, as its adaptive filter certifies)"
    )


def calibrate_run(
    budget: SiteBudget,
    *,
    target: float,
    sample_rate: float,
    steps: int,
    rounds: int,
    reserve: float = 0.0,
    resumed: Sequence[SubsampledGaussianEvent] = (),
) -> float:
    """The noise multiplier of a new run: the run (after the ``resumed`` runs' events,
    when it continues runs that died) reaches ``target`` (PRV) at its last round, and
    the lifetime filter over everything charged before stays within the budget less
    the site's ``reserve`` (what it keeps for later runs; its own node config).
    Refuses, with the cause in words, a run asking more than remains above the
    reserve, or one whose steps what remains cannot pay for at any noise."""
    from common.privacy.accounting import calibrate_filter_noise, calibrate_noise_multiplier

    if not (0 <= reserve < budget.budget):
        raise PrivacyError(f"the site's reserve {reserve:g} is not in [0, {budget.budget:g})")
    spent = budget.spent()
    usable = budget.budget - reserve
    left = usable - spent
    kept = f" above its reserve of {reserve:g}" if reserve else ""
    # A resumed run asks only what its target leaves after the runs it continues.
    already = _prv(list(resumed), budget.delta) if resumed else 0.0
    if target - already > left:
        part = f" ({already:.3f} of it spent by the runs it resumes)" if resumed else ""
        raise PrivacyError(
            f"{spent_words(budget)}: the run asks for epsilon {target:g}{part}, "
            f"{max(left, 0.0):.3f} is left{kept}"
        )
    total = steps * rounds
    try:
        for_target = calibrate_noise_multiplier(
            target_epsilon=target,
            delta=budget.delta,
            sample_rate=sample_rate,
            steps=total,
            prior=tuple(resumed),
        )
    except PrivacyError:
        if resumed:
            raise PrivacyError(
                f"the runs this one resumes spent {already:.3f} of "
                f"the target epsilon {target:g}: too little is left for {total} more steps "
                f"at sample rate {sample_rate:.4g}"
            ) from None
        raise PrivacyError(
            f"the run's target epsilon {target:g} is too small for its {total} steps at "
            f"sample rate {sample_rate:.4g} at any noise: ask for fewer rounds or a larger "
            "target"
        ) from None
    try:
        for_budget = calibrate_filter_noise(
            budget=usable,
            delta=budget.delta,
            sample_rate=sample_rate,
            steps=total,
            prior=tuple(budget.events),
        )
    except PrivacyError:
        raise PrivacyError(
            f"{spent_words(budget)}: the {max(left, 0.0):.3f} left{kept} cannot pay for "
            f"{total} steps at sample rate {sample_rate:.4g} at any noise"
        ) from None
    return max(for_target, for_budget)


def run_cost(
    budget: SiteBudget,
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    resumed: Sequence[SubsampledGaussianEvent] = (),
) -> tuple[float, float]:
    """What a whole run of ``steps`` steps at ``noise_multiplier`` costs: its epsilon
    (PRV, after the ``resumed`` runs' events) and the lifetime filter's after it."""
    event = SubsampledGaussianEvent(noise_multiplier, sample_rate, steps)
    return _prv([*resumed, event], budget.delta), _filter([*budget.events, event], budget.delta)


def one_run_budget(*, target: float, delta: float, sample_rate: float, steps: int) -> float:
    """A simulated site's lifetime budget when it has none of its own: what the filter
    certifies for one run calibrated to ``target`` (PRV) over ``steps`` steps, so that
    the run reaches its target and a second run on the same state folder finds the
    budget spent. (A hair above, so that the filter does not bind before the target.)"""
    from common.privacy.accounting import calibrate_noise_multiplier

    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=delta, sample_rate=sample_rate, steps=steps
    )
    event = SubsampledGaussianEvent(sigma, sample_rate, steps)
    return _filter([event], delta) * (1 + 1e-4)


def _filter(events: list[SubsampledGaussianEvent], delta: float) -> float:
    # Opacus's accountant loads when an epsilon is computed, not when the site's tooling
    # starts (``fedsilo site init`` needs none).
    from common.privacy.accounting import filter_epsilon

    return filter_epsilon(events, delta)


def _prv(events: list[SubsampledGaussianEvent], delta: float) -> float:
    from common.privacy.accounting import compute_epsilon

    return compute_epsilon(events, delta)
