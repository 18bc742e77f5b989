"""What a site does with one train message, in plain Python (no Flower): the training
path of the ClientApp, which alone loads torch, Opacus and the model.

Order of a DP round (the invariants of docs/architecture.md):
1. know the site's budget (its own node config first, else the federation's);
2. calibrate sigma ONCE per run from the whole plan (rounds x local steps);
3. budget filter: compose everything spent with the planned round, refuse if it
   would exceed the budget, before touching the data with a model;
4. train with DP-SGD, record the spend in the persistent accountant, and only then
   hand back the update.
"""

from __future__ import annotations

import fcntl
import json
import math
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from importlib import metadata
from pathlib import Path

import torch

from client import secure
from client.data import load_site_data
from client.settings import ALLOW_NO_DP_KEY, STATE_DIR_KEY, SiteConfigError, SiteSettings
from common.arrays import clip_update, flatten
from common.data import builtin_label_names
from common.messages import RoundPlan, SiteReport, TrainReply, TrainRequest
from common.model import build_model, model_spec
from common.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from common.privacy.budget import DatasetBudget, check_delta
from common.privacy.errors import PrivacyError
from common.privacy.events import SubsampledGaussianEvent
from common.privacy.identity import load_or_create_identity
from common.privacy.ledger import LEDGER_FILE, Ledger
from common.training import (
    batches_per_epoch,
    default_device,
    sample_rate,
    train_dp,
    trainable_delta,
)

LOCK_FILE = "ledger.lock"


@dataclass
class SiteState:
    """What a site keeps across rounds of one run (Flower's context.state)."""

    plan_key: str = ""
    noise_multiplier: float = 0.0
    noise_free_steps: int = 0  # steps of the labelled no-DP baseline (no accountant)

    def to_json(self) -> str:
        return json.dumps(
            {
                "plan_key": self.plan_key,
                "noise_multiplier": self.noise_multiplier,
                "noise_free_steps": self.noise_free_steps,
            }
        )

    @classmethod
    def from_json(cls, text: str | None) -> SiteState:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(
            plan_key=str(raw["plan_key"]),
            noise_multiplier=float(raw["noise_multiplier"]),
            noise_free_steps=int(raw.get("noise_free_steps", 0)),
        )


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def code_version() -> str:
    try:
        return f"fedsilo {metadata.version('fedsilo')}"
    except metadata.PackageNotFoundError:
        return "fedsilo (not installed)"


def run_round(
    plan: RoundPlan,
    global_arrays: dict[str, torch.Tensor],
    settings: SiteSettings,
    state: SiteState,
    *,
    run_id: str,
    generator: torch.Generator,
) -> tuple[SiteReport, dict[str, torch.Tensor] | None]:
    """One round at a site. With DP, the signed ledger is the record of every spend: the
    budget filter reads it (all runs on this data set), and the round's entry is written
    and fsync'd before the update is handed back."""
    cfg = plan.config
    data, fingerprint = load_site_data(settings, cfg)
    n = len(data)
    model = build_model(model_spec(cfg, len(builtin_label_names(cfg.dataset))))
    model.load_trainable_state(global_arrays)
    q = sample_rate(n, cfg.batch_size)
    steps = cfg.local_epochs * batches_per_epoch(n, cfg.batch_size)
    train = partial(
        train_dp,
        model,
        data,
        steps=steps,
        sample_rate=q,
        clip_norm=cfg.clip_norm,
        learning_rate=cfg.learning_rate,
        generator=generator,
        engine=cfg.dp_engine,
        device=default_device(),
    )
    if not cfg.dp and not settings.allow_no_dp:
        raise SiteConfigError(
            f"the plan asks for no DP; this site requires DP ('{ALLOW_NO_DP_KEY}')"
        )
    if not cfg.dp:
        train(noise_multiplier=0.0)  # the labelled baseline: clipped, no noise, no epsilon
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
            **no_dp,
        ), trainable_delta(global_arrays, model.trainable_state())

    check_delta(settings.delta, n)
    if settings.state_dir is None:
        raise SiteConfigError(f"a DP site needs '{STATE_DIR_KEY}' for its privacy ledger")
    ledger = Ledger(settings.state_dir / LEDGER_FILE, load_or_create_identity(settings.state_dir))
    # One round at a time per site: the budget read, the training and the entry are one
    # critical section, so two concurrent runs cannot both spend the last of a budget.
    with _exclusive(settings.state_dir / LOCK_FILE):
        return _dp_round(
            plan,
            settings,
            state,
            ledger,
            run_id=run_id,
            fingerprint=fingerprint,
            train=train,
            trained=lambda: trainable_delta(global_arrays, model.trainable_state()),
            n=n,
            q=q,
            steps=steps,
        )


def _dp_round(
    plan: RoundPlan,
    settings: SiteSettings,
    state: SiteState,
    ledger: Ledger,
    *,
    run_id: str,
    fingerprint: str,
    train: Callable[..., object],
    trained: Callable[[], dict[str, torch.Tensor]],
    n: int,
    q: float,
    steps: int,
) -> tuple[SiteReport, dict[str, torch.Tensor] | None]:
    cfg = plan.config
    everything = ledger.entries()  # a torn ledger raises LedgerError: fail closed
    budget = DatasetBudget.from_ledger(
        everything, fingerprint, budget=settings.epsilon, delta=settings.delta
    )  # every run
    this_run = [e.event for e in everything if e.run_id == run_id]  # as the auditor composes
    common = {
        "num_examples": n,
        "budget": settings.epsilon,
        "delta": settings.delta,
        "sample_rate": q,
    }

    def refuse(reason: str) -> tuple[SiteReport, None]:
        return SiteReport.of(
            "refused",
            reason,
            settings.site_id,
            epsilon=budget.spent(),
            steps=0,
            total_steps=budget.steps,
            noise_multiplier=state.noise_multiplier,
            **common,
        ), None

    plan_key = json.dumps([n, q, steps, cfg.num_server_rounds, settings.epsilon, settings.delta])
    if state.plan_key != plan_key:
        # Once per run: the noise that, composed after what earlier runs spent on this
        # data set, reaches the budget exactly at the last planned round.
        earlier = budget.earlier_runs(run_id)
        try:
            state.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=settings.epsilon,
                delta=settings.delta,
                sample_rate=q,
                steps=steps * cfg.num_server_rounds,
                prior=earlier,
            )
        except PrivacyError as err:  # our own text: it names no data
            return refuse(f"no noise fits this plan: {err}")
        state.plan_key = plan_key
    event = SubsampledGaussianEvent(state.noise_multiplier, q, steps)
    fits, after = budget.allows(event)
    if not fits:
        return refuse(f"budget {settings.epsilon:g} would reach {after:.2f}")
    train(noise_multiplier=state.noise_multiplier)
    entry = ledger.append(  # written and fsync'd before the update exists outside
        site_id=settings.site_id,
        dataset=fingerprint,
        run_id=run_id,
        round=plan.round,
        event=event,
        clip_norm=cfg.clip_norm,
        delta=settings.delta,
        epsilon_run=compute_epsilon([*this_run, event], settings.delta),
        epsilon_dataset=after,
        budget=settings.epsilon,
        code_version=code_version(),
    )
    return SiteReport.of(
        "ok",
        "",
        settings.site_id,
        epsilon=after,
        steps=steps,
        total_steps=budget.steps + steps,
        noise_multiplier=state.noise_multiplier,
        ledger_head=entry.entry_hash(),
        ledger_signature=entry.signature,
        **common,
    ), trained()


def train_round(
    request: TrainRequest, settings: SiteSettings, state: SiteState, *, run_id: str
) -> tuple[TrainReply, secure.Pending | None]:
    """Answer a train message: run the round, then clip the update (plain aggregation)
    or encode it and join the secure round (the update then waits for the protocol's
    stages in the returned state, and only public keys leave now)."""
    plan, setup = request.plan, request.setup
    # Noise and sampling must be unpredictable to anyone else: OS entropy.
    generator = torch.Generator(device=default_device()).manual_seed(secrets.randbits(63))
    report, update = run_round(
        plan, request.arrays, settings, state, run_id=run_id, generator=generator
    )
    if setup is None:
        if update is None:
            return TrainReply(report), None
        update, clipped = clip_update(update, plan.config.update_clip_norm)
        return TrainReply(replace(report, update_clipped=int(clipped)), update), None
    # Under secure aggregation the example count travels only inside the secure sum.
    hidden = replace(report, num_examples=0)
    if update is None:
        return TrainReply(hidden), None
    pending, keys, clipped = secure.join(setup, plan.config, flatten(update), report.num_examples)
    return TrainReply(replace(hidden, update_clipped=int(clipped)), keys=keys), pending
