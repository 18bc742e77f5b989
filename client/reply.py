"""A site's answer to a train message, in plain Python (no Flower): a training round
(client/round.py) or an evaluation round (client/evaluation.py), each wrapped the same
way: the task checked first, then the secure round admitted (or a plain one refused
where the site requires secure aggregation), then the reply: the clipped update or the
counts in the clear, or the masked input.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from client import secure
from client.evaluation import evaluate_round
from client.round import SiteState, preflight, run_round
from client.settings import SECAGG_REQUIRED_KEY, SiteSettings, task_problem
from common.arrays import clip_update, flatten
from common.evaluation import COUNTS_KEY
from common.messages import SiteReport, TrainReply, TrainRequest
from common.secagg.errors import SecAggError
from common.secure_random import SecureRandom

log = logging.getLogger("fedsilo.site")


def train_round(
    request: TrainRequest,
    settings: SiteSettings,
    state: SiteState,
    *,
    run_id: str,
    pending: secure.Pending | None = None,
) -> tuple[TrainReply, secure.Pending | None]:
    """Answer a train message: run the round, then clip the update (plain aggregation)
    or encode and mask it for the secure sum (only the masked input leaves).

    A secure round's train message continues the session ``pending`` the site
    advertised in, checked against the roster and with its shares dealt and opened
    before this message: the round's final sites are admitted before anything is
    charged or trained, so a round the site will not join costs it nothing. A site
    that requires secure aggregation refuses a plain train message."""
    plan, setup = request.plan, request.setup
    problem = task_problem(settings, plan.task)
    if plan.preflight:  # numbers of plans and ledgers only: no secure sum is needed
        if problem is not None:
            log.warning("the run's pre-flight refused: %s", problem)
            report = SiteReport.of("refused", problem, settings.site_id)
        else:
            report = preflight(plan, request.arrays, settings, run_id=run_id)
        return TrainReply(report, preflight=True), None
    if problem is not None:  # before anything: the site never agreed to this task
        return TrainReply(SiteReport.of("refused", problem, settings.site_id)), None
    if setup is None and settings.secagg_required:
        # The coordinator may not switch secure aggregation off for this site.
        reason = f"this site joins only secure rounds ('{SECAGG_REQUIRED_KEY}')"
        return TrainReply(SiteReport.of("refused", reason, settings.site_id)), None
    if setup is not None:
        try:
            if pending is None:
                raise SecAggError("this site did not advertise in this secure round")
            dim = sum(v.numel() for v in request.arrays.values())
            pending = secure.admit(pending, setup, plan, dim)
        except SecAggError as err:
            log.warning("round %d: refused the secure round: %s", plan.round, err)
            return TrainReply(SiteReport.of("refused", str(err)[:200], settings.site_id)), None
    if plan.evaluate:  # an evaluation round: counts on the held-out share, no training
        report, counts = evaluate_round(
            plan, request.arrays, settings, run_id=run_id, rng=SecureRandom.fresh()
        )
        if counts is None:
            return TrainReply(report), None
        if setup is None or pending is None:
            flat = torch.from_numpy(counts.ravel().astype(np.float32))
            return TrainReply(report, {COUNTS_KEY: flat}), None
        message, pending = secure.masked_counts(pending, counts)
        return TrainReply(report, masked=message), pending
    # Noise and sampling must be unpredictable to anyone else: a ChaCha20 stream under
    # a fresh key from the operating system.
    report, update = run_round(
        plan, request.arrays, settings, state, run_id=run_id, rng=SecureRandom.fresh()
    )
    if setup is None:
        if update is None:
            return TrainReply(report), None
        update, clipped = clip_update(update, plan.config.update_clip_norm)
        return TrainReply(replace(report, update_clipped=int(clipped)), update), None
    if update is None or pending is None:
        return TrainReply(report), None
    # The weight (examples weighting) is the declared public size, inside the sum too.
    message, pending, clipped = secure.masked(
        pending, setup, plan.config, flatten(update), report.num_examples
    )
    return TrainReply(replace(report, update_clipped=int(clipped)), masked=message), pending
