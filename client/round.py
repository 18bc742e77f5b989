"""What a site does in one training round, in plain Python (no Flower): the training
path of the ClientApp, which alone loads torch, Opacus and the model (client/reply.py
wraps it, and the evaluation round, into the answer to a train message).

Order of a DP round (the invariants of docs/architecture.md, the threat model of
docs/threat-model.md):
1. check what the coordinator sent against public rules only: the global weights
   against the site's public norm bound, the plan against the run's frozen plan;
2. size the mechanism from public numbers only: the site's declared size gives the
   sample rate and the steps (never the private count of its file);
3. in one critical section over the ledger: the first round of a run fixes its plan
   and noise (the run's target, within what the lifetime budget has left); every
   round is admitted by the adaptive filter over EVERY entry of the site, then
   CHARGED: the signed entry is on disk before the data is loaded;
4. only then load the data and train; a round that fails from here on stays charged,
   and numerical trouble cannot make it fail (common/dp_engine.py).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import torch

from client.data import load_site_data
from client.holdout import site_holdout
from client.settings import (
    ALLOW_NO_DP_KEY,
    STATE_DIR_KEY,
    SiteConfigError,
    SiteSettings,
)
from common.messages import REHEARSAL_NOTE, RoundPlan, SiteReport
from common.model import Classifier, build_model, model_spec
from common.privacy.accounting import compute_epsilon
from common.privacy.budget import (
    RunPlan,
    SiteBudget,
    calibrate_run,
    check_delta,
    one_run_budget,
    run_cost,
    spent_words,
)
from common.privacy.errors import PrivacyError
from common.privacy.identity import SiteKeys, exclusive, init_state, open_state
from common.privacy.ledger import (
    EVAL_SCOPE,
    LEDGER_FILE,
    Ledger,
    LedgerEntry,
    dataset_fingerprint,
    file_digest,
    read_ledger,
    scope_of,
)
from common.secure_random import SecureRandom
from common.task import Task
from common.training import (
    Batchable,
    batches_per_epoch,
    default_device,
    sample_rate,
    train_dp,
    trainable_delta,
)

LOCK_FILE = "ledger.lock"
log = logging.getLogger("fedsilo.site")


@dataclass
class SiteState:
    """What a site keeps across rounds of one run in Flower's context.state: only the
    labelled no-DP baseline's step count. Everything privacy needs is in the ledger."""

    noise_free_steps: int = 0  # steps of the labelled no-DP baseline (no accountant)

    def to_json(self) -> str:
        return json.dumps({"noise_free_steps": self.noise_free_steps})

    @classmethod
    def from_json(cls, text: str | None) -> SiteState:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(noise_free_steps=int(raw.get("noise_free_steps", 0)))


def code_version() -> str:
    try:
        return f"fedsilo {metadata.version('fedsilo')}"
    except metadata.PackageNotFoundError:
        return "fedsilo (not installed)"


class Refused(Exception):
    """The site declines the round before touching its data; ``reason`` is public."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_global_weights(arrays: dict[str, torch.Tensor], bound: float) -> None:
    """The coordinator's weights must be finite and within the site's public norm
    bound: checked before anything else, on public values only."""
    total = 0.0
    for name, value in arrays.items():
        if not bool(torch.isfinite(value).all()):
            raise Refused(f"the global weights are not finite ('{name}')")
        total += float(value.double().square().sum())
    norm = math.sqrt(total)
    if not norm <= bound:
        raise Refused(
            f"the global weights have norm {norm:.4g}, above this site's public bound {bound:g}"
        )


def _keys(settings: SiteSettings, state_dir: Path) -> SiteKeys:
    """A deployed site opens the state folder `site init` made; a simulated one makes
    its own."""
    return (
        open_state(state_dir)
        if settings.deployed
        else init_state(state_dir, site_id=settings.site_id)
    )


def run_round(
    plan: RoundPlan,
    global_arrays: dict[str, torch.Tensor],
    settings: SiteSettings,
    state: SiteState,
    *,
    run_id: str,
    rng: SecureRandom,
) -> tuple[SiteReport, dict[str, torch.Tensor] | None]:
    """One round at a site (see the module docstring for the order of a DP round)."""
    cfg = plan.config
    if not cfg.dp and not settings.allow_no_dp:
        raise SiteConfigError(
            f"the plan asks for no DP; this site requires DP ('{ALLOW_NO_DP_KEY}')"
        )
    if not cfg.dp:
        key = None
        if settings.state_dir is not None:
            key = _keys(settings, settings.state_dir).fingerprint_key
        kept = site_holdout(settings, plan, key, _entries(settings)).holdout
        plain = load_site_data(settings, cfg, plan.task, kept).train
        n = len(plain)
        q = sample_rate(n, cfg.batch_size)
        steps = cfg.local_epochs * batches_per_epoch(n, cfg.batch_size)
        model = _model(plan.task, global_arrays)
        train_dp(  # the labelled baseline: clipped, no noise, no epsilon
            model,
            plain,
            steps=steps,
            sample_rate=q,
            noise_multiplier=0.0,
            clip_norm=cfg.clip_norm,
            learning_rate=cfg.learning_rate,
            rng=rng,
            engine=cfg.dp_engine,
            device=default_device(),
        )
        state.noise_free_steps += steps
        no_dp = {"dp": False, "epsilon": math.nan, "budget": math.nan, "delta": math.nan}
        return SiteReport.of(
            "ok",
            "",
            settings.site_id,
            num_examples=n,
            sample_rate=q,
            steps=steps,
            total_steps=state.noise_free_steps,
            lifetime_epsilon=math.nan,
            **no_dp,
        ), trainable_delta(global_arrays, model.trainable_state())

    if settings.state_dir is None:
        raise SiteConfigError(f"a DP site needs '{STATE_DIR_KEY}' for its privacy ledger")
    keys = _keys(settings, settings.state_dir)
    ledger = Ledger(settings.state_dir / LEDGER_FILE, keys.identity)
    try:
        check_global_weights(global_arrays, settings.max_global_norm)
        model = _model(plan.task, global_arrays)
    except Refused as refusal:  # what was spent so far comes from the ledger, as always
        return _refusal(settings, keys, refusal.reason, settings.epsilon, ledger, plan=plan), None
    if cfg.rehearsal:
        return _rehearse(plan, global_arrays, model, settings, keys, ledger, rng=rng)
    if plan.round <= cfg.resume_round:  # a resumed run's rounds come after the dead run's
        reason = f"round {plan.round} of a run that resumes after round {cfg.resume_round}"
        return _refusal(settings, keys, reason, settings.epsilon, ledger, plan=plan), None
    holdout = site_holdout(settings, plan, keys.fingerprint_key, ledger.entries()).holdout
    data: Batchable | None = None
    if settings.declared_size is None:  # simulation: the partition sizes are public
        loaded = load_site_data(settings, cfg, plan.task, holdout)
        data, digest = loaded.train, loaded.digest
        size = len(data)
    else:  # the file's bytes are hashed, not parsed: nothing here depends on its content
        size = settings.declared_size
        digest = file_digest(Path(str(settings.data_path)))
    asked, lifetime = _asked(plan, settings, size)
    # One charge at a time per site: the budget read and the entry are one critical
    # section, so two concurrent runs cannot both spend the last of a budget.
    with exclusive(settings.state_dir / LOCK_FILE):
        try:
            entry, frozen, before = _charge(
                # a resumed run numbers its own rounds from 1 in the ledger
                replace(plan, round=plan.round - cfg.resume_round),
                settings,
                lifetime,
                ledger,
                asked,
                run_id=run_id,
                fingerprint=dataset_fingerprint(keys.fingerprint_key, digest),
            )
        except Refused as refusal:
            return _refusal(settings, keys, refusal.reason, lifetime, ledger, plan=plan), None
    # Charged. From here on a failure stays charged, and the data is touched.
    if data is None:
        data = load_site_data(settings, cfg, plan.task, holdout).train
    train_dp(
        model,
        data,
        steps=frozen.steps,
        sample_rate=frozen.sample_rate,
        expected_batch=max(1, round(frozen.sample_rate * size)),
        noise_multiplier=frozen.noise_multiplier,
        clip_norm=frozen.clip_norm,
        learning_rate=cfg.learning_rate,
        rng=rng,
        engine=cfg.dp_engine,
        device=default_device(),
    )
    # A resumed run's epsilon is that of the runs it continues and its own together
    # (what the plan's target bounds, and what its pre-flight said); the ledger entry
    # keeps the run's own (what `audit verify` recomputes per run).
    chain = {run_id, *cfg.resumed_runs}
    epsilon = (
        compute_epsilon(
            [*(e.event for e in before.entries if e.run_id in chain), frozen.event],
            frozen.delta,
        )
        if cfg.resumed_runs
        else entry.epsilon_run
    )
    return SiteReport.of(
        "ok",
        "",
        settings.site_id,
        num_examples=size,
        budget=lifetime,
        delta=settings.delta,
        sample_rate=frozen.sample_rate,
        epsilon=epsilon,
        lifetime_epsilon=entry.spent,
        steps=frozen.steps,
        total_steps=before.steps + frozen.steps,
        noise_multiplier=frozen.noise_multiplier,
        ledger_head=entry.entry_hash(),
        ledger_signature=entry.signature,
        identity=keys.identity.fingerprint(),
    ), trainable_delta(global_arrays, model.trainable_state())


def _asked(plan: RoundPlan, settings: SiteSettings, size: int) -> tuple[RunPlan, float]:
    """The mechanism the plan asks of a site of public size ``size`` (its noise is fixed
    at the run's first round) and the site's lifetime budget for it."""
    cfg = plan.config
    check_delta(settings.delta, size)
    q = sample_rate(size, cfg.batch_size)
    steps = cfg.local_epochs * batches_per_epoch(size, cfg.batch_size)
    asked = RunPlan(
        noise_multiplier=1.0,  # replaced by the run's calibrated noise
        sample_rate=q,
        steps=steps,
        rounds=cfg.num_server_rounds - cfg.resume_round,  # a resumed run: those left
        clip_norm=cfg.clip_norm,
        epsilon_target=cfg.epsilon,
        delta=settings.delta,
        scope=scope_of(settings.disjoint_data_set),
        public_size=size,
    )
    lifetime = settings.epsilon
    if settings.one_run_budget:
        lifetime = one_run_budget(
            target=cfg.epsilon,
            delta=settings.delta,
            sample_rate=q,
            steps=steps * cfg.num_server_rounds,
        )
    return asked, lifetime


def preflight(
    plan: RoundPlan, global_arrays: dict[str, torch.Tensor], settings: SiteSettings, *, run_id: str
) -> SiteReport:
    """The site's answer to a run's pre-flight: what the plan would cost it (the run's
    noise and epsilon), what its lifetime filter would certify after the whole run,
    its budget and reserve, and whether it would refuse the first round, with the cause
    in words. Numbers of the plan, the public size and the ledger only: nothing is
    trained, charged, or read of the data (a simulated site counts its partition, whose
    size is public)."""
    cfg = plan.config
    if not cfg.dp and not settings.allow_no_dp:
        reason = f"the plan asks for no DP; this site requires DP ('{ALLOW_NO_DP_KEY}')"
        return SiteReport.of("refused", reason, settings.site_id)
    if not cfg.dp:
        return SiteReport.of(
            "ok", "no DP: nothing is charged", settings.site_id, dp=False,
            epsilon=math.nan, budget=math.nan, delta=math.nan, lifetime_epsilon=math.nan,
            reserve=math.nan, lifetime_after=math.nan,
        )  # fmt: skip
    if settings.state_dir is None:
        raise SiteConfigError(f"a DP site needs '{STATE_DIR_KEY}' for its privacy ledger")
    keys = _keys(settings, settings.state_dir)
    ledger = Ledger(settings.state_dir / LEDGER_FILE, keys.identity)
    lifetime = settings.epsilon
    try:
        check_global_weights(global_arrays, settings.max_global_norm)
        _model(plan.task, global_arrays)
        if settings.declared_size is None:
            holdout = site_holdout(settings, plan, keys.fingerprint_key, ledger.entries())
            size = len(load_site_data(settings, cfg, plan.task, holdout.holdout).train)
        else:
            size = settings.declared_size
        asked, lifetime = _asked(plan, settings, size)
        frozen, budget, this_run = _admit(plan, settings, lifetime, ledger.entries(), asked, run_id)
    except (Refused, PrivacyError) as refusal:
        return _refusal(settings, keys, str(refusal), lifetime, ledger, plan=plan)
    left = frozen.rounds - len(this_run)
    run_epsilon, after = run_cost(
        budget,
        noise_multiplier=frozen.noise_multiplier,
        sample_rate=frozen.sample_rate,
        steps=frozen.steps * left,
        resumed=[e.event for e in _resumed(budget, cfg.resumed_runs)],
    )
    return SiteReport.of(
        "ok",
        "",
        settings.site_id,
        num_examples=size,
        budget=lifetime,
        delta=settings.delta,
        sample_rate=frozen.sample_rate,
        epsilon=run_epsilon,
        lifetime_epsilon=budget.spent(),
        steps=frozen.steps,
        total_steps=frozen.steps * left,
        noise_multiplier=frozen.noise_multiplier,
        identity=keys.identity.fingerprint(),
        reserve=settings.reserve,
        lifetime_after=after,
    )


def _rehearse(
    plan: RoundPlan,
    global_arrays: dict[str, torch.Tensor],
    model: Classifier,
    settings: SiteSettings,
    keys: SiteKeys,
    ledger: Ledger,
    *,
    rng: SecureRandom,
) -> tuple[SiteReport, dict[str, torch.Tensor]]:
    """A rehearsal round (client/rehearsal.py): the plan's mechanism on public stand-in
    rows, at the noise of a fresh run at the plan's target; the site's file, held-out
    pin and ledger are not touched, and the report claims no epsilon."""
    from client.rehearsal import standin
    from common.privacy.accounting import calibrate_noise_multiplier

    cfg = plan.config
    data = standin(plan.task, settings.site_id)
    size = len(data)
    q = sample_rate(size, cfg.batch_size)
    steps = cfg.local_epochs * batches_per_epoch(size, cfg.batch_size)
    sigma = calibrate_noise_multiplier(
        target_epsilon=cfg.epsilon,
        delta=settings.delta,
        sample_rate=q,
        steps=steps * cfg.num_server_rounds,
    )
    log.warning(
        "round %d: %s (%d public rows; the site's data file is not opened)",
        plan.round,
        REHEARSAL_NOTE,
        size,
    )
    train_dp(
        model,
        data,
        steps=steps,
        sample_rate=q,
        expected_batch=max(1, round(q * size)),
        noise_multiplier=sigma,
        clip_norm=cfg.clip_norm,
        learning_rate=cfg.learning_rate,
        rng=rng,
        engine=cfg.dp_engine,
        device=default_device(),
    )
    lifetime = settings.epsilon
    spent = SiteBudget.from_ledger(
        ledger.entries(),
        scope=scope_of(settings.disjoint_data_set),
        budget=lifetime,
        delta=settings.delta,
    ).spent()
    return SiteReport.of(
        "ok",
        REHEARSAL_NOTE,
        settings.site_id,
        num_examples=size,
        budget=lifetime,
        delta=settings.delta,
        sample_rate=q,
        epsilon=0.0,  # no private row was used
        lifetime_epsilon=spent,
        steps=steps,
        total_steps=steps * plan.round,
        noise_multiplier=sigma,
        identity=keys.identity.fingerprint(),
    ), trainable_delta(global_arrays, model.trainable_state())


def _model(task: Task, global_arrays: dict[str, torch.Tensor]) -> Classifier:
    """The task's model with the coordinator's weights; ``Refused`` (before any charge:
    public values only) when they do not fit it, so junk weights cost nothing."""
    model = build_model(model_spec(task))
    try:
        model.load_trainable_state(global_arrays)
    except ValueError as err:
        raise Refused(f"the global weights do not fit the task's model ({err})"[:300]) from None
    return model


def _entries(settings: SiteSettings) -> list[LedgerEntry]:
    """The site's ledger entries without its identity (none without a state folder)."""
    if settings.state_dir is None:
        return []
    return read_ledger(settings.state_dir / LEDGER_FILE, missing_ok=True)


def _admit(
    plan: RoundPlan,
    settings: SiteSettings,
    lifetime: float,
    everything: list[LedgerEntry],
    asked: RunPlan,
    run_id: str,
) -> tuple[RunPlan, SiteBudget, list[LedgerEntry]]:
    """The run's plan for this round: fixed at its first round (calibrated within what
    the lifetime budget leaves above the site's reserve), checked at every later one;
    ``Refused`` with a public reason when the site declines."""
    budget = SiteBudget.from_ledger(
        everything, scope=asked.scope, budget=lifetime, delta=settings.delta
    )
    this_run = [e for e in everything if e.run_id == run_id]
    if this_run:
        frozen = RunPlan.of_entry(this_run[0])
        if frozen is None:
            raise Refused(f"run {run_id} began under an older ledger schema; start a new run")
        change = frozen.change(asked)
        if change is not None:
            raise Refused(f"the plan changed during run {run_id}: {change}")
        if len(this_run) >= frozen.rounds:
            raise Refused(f"run {run_id} already ran its {frozen.rounds} planned rounds")
        if plan.round <= this_run[-1].round:  # a replayed or renumbered round
            raise Refused(
                f"round {plan.round} of run {run_id} comes after its round "
                f"{this_run[-1].round}: rounds must increase"
            )
        return frozen, budget, this_run
    training = asked.scope != EVAL_SCOPE
    runs = plan.config.resumed_runs
    earlier = _resumed(budget, runs if training else tuple(f"{r}/eval" for r in runs))
    if earlier:  # the dead runs' plan, but for the rounds left
        was = RunPlan.of_entry(earlier[0])
        change = None if was is None else was.change(replace(asked, rounds=was.rounds))
        if change is not None:
            raise Refused(
                f"the plan differs from that of run {earlier[0].run_id} it resumes: {change}"
            )
    try:
        sigma = calibrate_run(
            budget,
            target=asked.epsilon_target,
            sample_rate=asked.sample_rate,
            steps=asked.steps,
            rounds=asked.rounds,
            reserve=settings.reserve if training else 0.0,
            resumed=[e.event for e in earlier],
        )
    except PrivacyError as err:  # our own text: it names no data
        raise Refused(str(err)) from None
    return replace(asked, noise_multiplier=sigma), budget, this_run


def _resumed(budget: SiteBudget, runs: tuple[str, ...]) -> list[LedgerEntry]:
    """This site's entries of the runs a resumed run continues (charged, whatever the
    coordinator says of them: a run it names that this site never ran adds nothing)."""
    return [e for e in budget.entries if e.run_id in runs]


def _charge(
    plan: RoundPlan,
    settings: SiteSettings,
    lifetime: float,
    ledger: Ledger,
    asked: RunPlan,
    *,
    run_id: str,
    fingerprint: str,
) -> tuple[LedgerEntry, RunPlan, SiteBudget]:
    """Fix or check the run's plan, admit the round by the lifetime filter and write
    its entry; ``Refused`` (a public reason) writes nothing."""
    everything = ledger.entries()  # a torn ledger raises LedgerError: fail closed
    frozen, budget, this_run = _admit(plan, settings, lifetime, everything, asked, run_id)
    fits, after = budget.allows(frozen.event)
    # Every training round keeps the site's reserve, whatever ran since the plan was
    # fixed (another run of the same site, concurrently).
    reserve = settings.reserve if asked.scope != EVAL_SCOPE else 0.0
    if not fits or after > lifetime - reserve:
        kept = f", leaving less than its reserve of {reserve:g}" if reserve else ""
        raise Refused(
            f"{spent_words(budget)}: this round would bring it to {after:.3f}{kept} "
            "(its adaptive filter over every run)"
        )
    entry = ledger.append(  # written and fsync'd before the data is touched
        site_id=settings.site_id,
        dataset=fingerprint,
        run_id=run_id,
        round=plan.round,
        event=frozen.event,
        clip_norm=frozen.clip_norm,
        delta=frozen.delta,
        rounds=frozen.rounds,
        public_size=frozen.public_size,
        epsilon_target=frozen.epsilon_target,
        epsilon_run=compute_epsilon([*(e.event for e in this_run), frozen.event], frozen.delta),
        epsilon_lifetime=after,
        budget=lifetime,
        scope=frozen.scope,
        code_version=code_version(),
    )
    return entry, frozen, budget


def _refusal(
    settings: SiteSettings,
    keys: SiteKeys,
    reason: str,
    lifetime: float,
    ledger: Ledger,
    scope: str | None = None,
    *,
    plan: RoundPlan | None = None,
) -> SiteReport:
    """A refused round's report: the reason and what the ledger already shows, public
    numbers only; the site's own log says it too."""
    scope = scope or scope_of(settings.disjoint_data_set)
    what = (
        "the run's pre-flight"
        if plan is not None and plan.preflight
        else f"round {plan.round}"
        if plan is not None
        else "the round"
    )
    log.warning("%s refused at site %s: %s", what, settings.site_id, reason)
    spent = SiteBudget.from_ledger(
        ledger.entries(), scope=scope, budget=lifetime, delta=settings.delta
    ).spent()
    return SiteReport.of(
        "refused",
        reason,
        settings.site_id,
        budget=lifetime,
        delta=settings.delta,
        lifetime_epsilon=spent,
        identity=keys.identity.fingerprint(),
        reserve=settings.reserve,
    )
