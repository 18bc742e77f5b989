"""What a site does with an evaluation round: the global model on its held-out share,
released as a confusion matrix with Gaussian noise (common/evaluation.py), charged to
its evaluation budget before the data is touched, as a training round is.

Order (the same invariants as client/round.py):
1. public checks: the plan must name this round among the run's evaluation rounds,
   and the global weights must be within the site's norm bound;
2. under the ledger lock, the release is admitted by the adaptive filter over the
   site's evaluation scope (its own node config caps it: ``eval-epsilon``; the run
   asks for at most that) and its signed entry is written;
3. only then the held-out rows are read and scored.

Noise off (``eval-noise = false``) is a labelled simulation option: exact counts, no
entry, ``dp`` false in the report. A deployed site ignores it and says so.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from client.data import load_site_data
from client.holdout import site_holdout
from client.round import (
    LOCK_FILE,
    Refused,
    _charge,
    _keys,
    _model,
    _refusal,
    check_global_weights,
)
from client.settings import SiteConfigError, SiteSettings
from common.evaluation import (
    SENSITIVITY,
    IntArray,
    add_noise,
    confusion,
    eval_rounds,
    evaluation_modes,
)
from common.messages import REHEARSAL_NOTE, RoundPlan, SiteReport
from common.privacy.budget import RunPlan, check_delta, one_run_budget
from common.privacy.identity import exclusive
from common.privacy.ledger import EVAL_SCOPE, LEDGER_FILE, Ledger, dataset_fingerprint, file_digest
from common.secure_random import SecureRandom
from common.training import Batchable, default_device

log = logging.getLogger("fedsilo.site")
NOISE_IGNORED = "eval-noise off ignored: a deployed site always adds its evaluation noise"


def evaluate_round(
    plan: RoundPlan,
    global_arrays: dict[str, torch.Tensor],
    settings: SiteSettings,
    *,
    run_id: str,
    rng: SecureRandom,
) -> tuple[SiteReport, IntArray | None]:
    """The site's report and its (noisy) confusion matrix; None when it refuses."""
    cfg, task = plan.config, plan.task
    rounds = eval_rounds(cfg)
    _, federated = evaluation_modes(cfg, task)
    if settings.state_dir is None:
        raise SiteConfigError("a site evaluates privately only with its 'state-dir' (ledger)")
    keys = _keys(settings, settings.state_dir)
    ledger = Ledger(settings.state_dir / LEDGER_FILE, keys.identity)
    noise = cfg.eval_noise or settings.deployed
    note = NOISE_IGNORED if noise and not cfg.eval_noise else ""
    if note:
        log.warning("round %d: %s", plan.round, note)
    cap = settings.eval_epsilon
    try:
        if not federated or plan.round not in rounds or plan.round <= cfg.resume_round:
            raise Refused(
                f"round {plan.round} is not an evaluation round of this plan (rounds {list(rounds)})"
            )
        check_global_weights(global_arrays, settings.max_global_norm)
        model = _model(task, global_arrays).to(default_device()).eval()
        if cfg.rehearsal:
            return _rehearse(plan, model, settings, keys.identity.fingerprint(), rng=rng)
        holdout = site_holdout(settings, plan, keys.fingerprint_key, ledger.entries())
        if holdout.late:
            raise Refused(
                "this site trained before it held rows out, so its held-out rows may have "
                "been trained on: it does not evaluate privately (a fresh state folder would)"
            )
        if holdout.holdout.fraction == 0:
            raise Refused("this site holds no rows out for evaluation")
        # a resumed run numbers its own releases from 1, as its training rounds
        index = [r for r in rounds if r > cfg.resume_round].index(plan.round) + 1
        done = [e.round for e in ledger.entries() if e.run_id == f"{run_id}/eval"]
        if done and index <= max(done):
            raise Refused(f"evaluation {index} of run {run_id} was already released")
    except Refused as refusal:
        budget = cap if cap is not None else cfg.eval_epsilon
        return _refusal(settings, keys, refusal.reason, budget, ledger, EVAL_SCOPE), None
    data = None
    if settings.declared_size is None:  # simulation: the held-out share's size is public
        data = load_site_data(settings, cfg, task, holdout.holdout)
        size = max(1, len(data.held_out))
        digest = data.held_out_digest
    else:  # the file's bytes, hashed, not parsed (nothing can fail before the charge)
        size = settings.declared_size
        digest = hashlib.sha256(b"held-out\n" + file_digest(Path(str(settings.data_path)))).digest()
    entry = frozen = None
    if noise:
        if cap is None:  # a simulated site's evaluation budget: this run's releases
            cap = one_run_budget(
                target=cfg.eval_epsilon, delta=settings.delta, sample_rate=1.0, steps=len(rounds)
            )
        asked = RunPlan(
            noise_multiplier=1.0,
            sample_rate=1.0,
            steps=1,
            rounds=sum(r > cfg.resume_round for r in rounds),  # a resumed run: those left
            clip_norm=SENSITIVITY,
            epsilon_target=cfg.eval_epsilon,
            delta=settings.delta,
            scope=EVAL_SCOPE,
            public_size=size,
        )
        try:
            if cfg.eval_epsilon > cap:
                raise Refused(
                    f"the run asks for evaluation epsilon {cfg.eval_epsilon:g}, above this "
                    f"site's evaluation budget {cap:g} ('eval-epsilon')"
                )
            check_delta(settings.delta, size)
            with exclusive(settings.state_dir / LOCK_FILE):
                entry, frozen, _ = _charge(
                    replace(plan, round=index),
                    settings,
                    cap,
                    ledger,
                    asked,
                    run_id=f"{run_id}/eval",
                    fingerprint=dataset_fingerprint(keys.fingerprint_key, digest),
                )
        except Refused as refusal:
            return _refusal(settings, keys, refusal.reason, cap, ledger, EVAL_SCOPE), None
    # Charged (or noise off in simulation). Now the held-out rows are read.
    if data is None:
        data = load_site_data(settings, cfg, task, holdout.holdout)
    counts = _counts(model, data.held_out, len(task.labels))
    if entry is None or frozen is None:  # noise off: the labelled simulation option
        return SiteReport.of(
            "ok", "", settings.site_id, num_examples=size, dp=False, steps=index
        ), counts
    sigma = frozen.noise_multiplier * SENSITIVITY
    normal = rng.normal(counts.shape, 1.0, dtype=torch.float64).numpy()
    return SiteReport.of(
        "ok",
        note,
        settings.site_id,
        num_examples=size,
        budget=cap,
        delta=settings.delta,
        sample_rate=1.0,
        epsilon=entry.epsilon_run,
        lifetime_epsilon=entry.spent,
        steps=1,
        total_steps=index,
        noise_multiplier=frozen.noise_multiplier,
        ledger_head=entry.entry_hash(),
        ledger_signature=entry.signature,
        identity=keys.identity.fingerprint(),
    ), add_noise(counts, sigma, normal)


def _counts(model: torch.nn.Module, held: Batchable, k: int) -> IntArray:
    """The model's confusion matrix on ``held`` (exact counts, before any noise)."""
    predictions = []
    with torch.no_grad():
        for start in range(0, len(held), 512):
            ids = held.ids[start : start + 512].to(default_device())
            mask = held.mask[start : start + 512].to(default_device())
            predictions.append(model(ids, mask).argmax(1).cpu())
    predicted = torch.cat(predictions).numpy() if predictions else np.zeros(0, np.int64)
    return confusion(held.labels.numpy(), predicted, k)


def _rehearse(
    plan: RoundPlan,
    model: torch.nn.Module,
    settings: SiteSettings,
    identity: str,
    *,
    rng: SecureRandom,
) -> tuple[SiteReport, IntArray]:
    """A rehearsal's evaluation (client/rehearsal.py): the counts on public stand-in
    rows, with the noise a real evaluation would add; no entry, no epsilon claimed."""
    from client.rehearsal import standin
    from common.privacy.accounting import calibrate_noise_multiplier

    cfg = plan.config
    held = standin(plan.task, settings.site_id, held_out=True)
    rounds = eval_rounds(cfg)
    multiplier = calibrate_noise_multiplier(
        target_epsilon=cfg.eval_epsilon, delta=settings.delta, sample_rate=1.0, steps=len(rounds)
    )
    counts = _counts(model, held, len(plan.task.labels))
    normal = rng.normal(counts.shape, 1.0, dtype=torch.float64).numpy()
    log.warning("round %d: evaluation, %s", plan.round, REHEARSAL_NOTE)
    return SiteReport.of(
        "ok",
        REHEARSAL_NOTE,
        settings.site_id,
        num_examples=len(held),
        budget=settings.eval_epsilon or cfg.eval_epsilon,
        delta=settings.delta,
        sample_rate=1.0,
        epsilon=0.0,  # no private row was used
        steps=1,
        total_steps=rounds.index(plan.round) + 1,
        noise_multiplier=multiplier,
        identity=identity,
    ), add_noise(counts, multiplier * SENSITIVITY, normal)
