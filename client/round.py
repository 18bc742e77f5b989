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
from common.messages import RoundPlan, SiteReport
from common.model import Classifier, build_model, model_spec
from common.privacy.accounting import compute_epsilon
from common.privacy.budget import (
    RunPlan,
    SiteBudget,
    calibrate_run,
    check_delta,
    one_run_budget,
)
from common.privacy.errors import PrivacyError
from common.privacy.identity import SiteKeys, exclusive, init_state, open_state
from common.privacy.ledger import (
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
        return _refusal(settings, keys, refusal.reason, settings.epsilon, ledger), None
    holdout = site_holdout(settings, plan, keys.fingerprint_key, ledger.entries()).holdout
    data: Batchable | None = None
    if settings.declared_size is None:  # simulation: the partition sizes are public
        loaded = load_site_data(settings, cfg, plan.task, holdout)
        data, digest = loaded.train, loaded.digest
        size = len(data)
    else:  # the file's bytes are hashed, not parsed: nothing here depends on its content
        size = settings.declared_size
        digest = file_digest(Path(str(settings.data_path)))
    check_delta(settings.delta, size)
    q = sample_rate(size, cfg.batch_size)
    steps = cfg.local_epochs * batches_per_epoch(size, cfg.batch_size)
    asked = RunPlan(
        noise_multiplier=1.0,  # replaced by the run's calibrated noise
        sample_rate=q,
        steps=steps,
        rounds=cfg.num_server_rounds,
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
    # One charge at a time per site: the budget read and the entry are one critical
    # section, so two concurrent runs cannot both spend the last of a budget.
    with exclusive(settings.state_dir / LOCK_FILE):
        try:
            entry, frozen, before = _charge(
                plan,
                settings,
                lifetime,
                ledger,
                asked,
                run_id=run_id,
                fingerprint=dataset_fingerprint(keys.fingerprint_key, digest),
            )
        except Refused as refusal:
            return _refusal(settings, keys, refusal.reason, lifetime, ledger), None
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
    return SiteReport.of(
        "ok",
        "",
        settings.site_id,
        num_examples=size,
        budget=lifetime,
        delta=settings.delta,
        sample_rate=frozen.sample_rate,
        epsilon=entry.epsilon_run,
        lifetime_epsilon=entry.spent,
        steps=frozen.steps,
        total_steps=before.steps + frozen.steps,
        noise_multiplier=frozen.noise_multiplier,
        ledger_head=entry.entry_hash(),
        ledger_signature=entry.signature,
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
    else:
        try:
            sigma = calibrate_run(
                budget,
                target=asked.epsilon_target,
                sample_rate=asked.sample_rate,
                steps=asked.steps,
                rounds=asked.rounds,
            )
        except PrivacyError as err:  # our own text: it names no data
            raise Refused(str(err)) from None
        frozen = replace(asked, noise_multiplier=sigma)
    fits, after = budget.allows(frozen.event)
    if not fits:
        raise Refused(
            f"the site's lifetime budget {lifetime:g} would reach {after:.3f} "
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
) -> SiteReport:
    """A refused round's report: the reason and what the ledger already shows, public
    numbers only."""
    scope = scope or scope_of(settings.disjoint_data_set)
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
    )
