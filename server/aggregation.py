"""How one round's updates reach the coordinator: the message types every workflow
shares, and the plain workflow (updates in the clear, for comparison and for runs
that turn secure aggregation off). The secure workflow is in server/secure.py."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import torch

from common.evaluation import COUNTS_KEY, MAX_DECLARED_SIGMA, count_bound
from common.messages import RoundPlan, SiteReport, StageMessage, TrainReply, TrainRequest
from common.secagg.encoding import site_weight
from server.optimizers import weighted_mean

Arrays = dict[str, torch.Tensor]
M = TypeVar("M", TrainReply, StageMessage)


def round_group(plan: RoundPlan) -> str:
    """The message group of a round's exchanges: ``N`` for training round N,
    ``N/evaluation`` for the evaluation after it (stages add ``/<stage>``)."""
    return f"{plan.round}/evaluation" if plan.evaluate else str(plan.round)


@dataclass(frozen=True)
class Reply(Generic[M]):
    """A site's reply to one message: the decoded message, or why there is none (no
    reply, a Flower error, or a malformed message: ``malformed reply: ...``)."""

    message: M | None
    error: str | None = None
    nbytes: int = 0  # serialized size of what the site sent


class Transport(Protocol):
    """How messages reach the sites (server/app.py: Flower's Grid). Workflows speak
    common/messages.py's values; the transport encodes, decodes and counts bytes."""

    def node_ids(self) -> list[int]: ...

    def train(
        self, requests: Mapping[int, TrainRequest], *, group: str
    ) -> dict[int, Reply[TrainReply]]:
        """Send each node its train request; a reply (or an error) for every node asked."""
        ...

    def stage(
        self, messages: Mapping[int, StageMessage], *, group: str
    ) -> dict[int, Reply[StageMessage]]:
        """Send each node its secure-aggregation stage message (all of one stage)."""
        ...


@dataclass(frozen=True)
class SiteResult:
    """One site's part in a round: its report, and whether its update is in the mean."""

    node_id: int
    report: SiteReport | None
    error: str | None = None  # why the site's update is not in the mean
    contributed: bool = False
    left: bool = False  # the site left with its own reason (not refused by the coordinator)
    round_failed: bool = False  # it did its part, but the round failed as a whole


@dataclass
class RoundOutcome:
    """What an aggregation workflow hands back for one round."""

    results: list[SiteResult]
    mean: Arrays | None  # the mean update; None: the global model stays as it was
    failure: str = ""  # why the whole round failed (e.g. secure aggregation aborted)
    upload_bytes: dict[int, int] = field(default_factory=dict)  # per node
    clipped: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time per exchange
    cheaters: tuple[int, ...] = ()  # nodes proven to have cheated (secure aggregation)


def _check_update(update: Arrays, reference: Arrays) -> str | None:
    if set(update) != set(reference):
        return "update arrays differ from the global model's"
    for k, v in update.items():
        if tuple(v.shape) != tuple(reference[k].shape):
            return f"update array {k!r} has shape {tuple(v.shape)}"
    return None


def plain_round(
    transport: Transport, chosen: list[int], plan: RoundPlan, weights: Arrays
) -> RoundOutcome:
    """Every site sends its clipped update in the clear; the coordinator averages them.
    An evaluation round's replies are confusion matrices: ``mean`` is their sum."""
    request = TrainRequest(plan, weights)
    k = len(plan.task.labels)
    expected = {COUNTS_KEY: torch.zeros(k * k)} if plan.evaluate else weights
    started = time.monotonic()
    replies = transport.train(dict.fromkeys(chosen, request), group=round_group(plan))
    stage_seconds = {"train": time.monotonic() - started}
    results, updates, counts = [], [], []
    upload: dict[int, int] = {}
    clipped = 0
    for nid in chosen:
        reply = replies[nid]
        upload[nid] = reply.nbytes
        if reply.message is None:
            results.append(SiteResult(nid, None, reply.error or "no reply"))
            continue
        report, update = reply.message.report, reply.message.update
        if report.status != "ok":
            results.append(SiteResult(nid, report))
            continue
        problem = (
            "reply carries secagg keys, not an update"
            if update is None
            else _check_update(update, expected)
        )
        if problem or update is None:
            results.append(SiteResult(nid, report, problem))
            continue
        if plan.evaluate:
            values = update[COUNTS_KEY]
            if not bool((values == values.round()).all()) or (
                values.numel() and float(values.abs().max()) >= 2**24
            ):
                results.append(SiteResult(nid, report, "counts are not whole numbers below 2^24"))
                continue
            k = len(plan.task.labels)
            sigma = report.noise_multiplier if report.dp else 0.0
            bound = count_bound(report.num_examples, min(sigma, MAX_DECLARED_SIGMA), k)
            if abs(float(values.double().sum())) > bound:
                why = f"counts total {float(values.sum()):.0f}, above its declared size allows"
                results.append(SiteResult(nid, report, why))
                continue
            results.append(SiteResult(nid, report, contributed=True))
            updates.append(update)
            continue
        # The site clips; a larger update is rejected, never silently rescaled.
        norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in update.values()))
        if norm > plan.config.update_clip_norm * (1 + 1e-6):
            results.append(
                SiteResult(nid, report, f"update norm {norm:.3g} exceeds update-clip-norm")
            )
            continue
        results.append(SiteResult(nid, report, contributed=True))
        updates.append(update)
        counts.append(float(site_weight(plan.config, report.num_examples)))
        clipped += report.update_clipped
    if plan.evaluate:
        summed = torch.stack([u[COUNTS_KEY].double() for u in updates]).sum(0) if updates else None
        mean = {COUNTS_KEY: summed} if summed is not None else None
    else:
        mean = weighted_mean(updates, counts) if updates else None
    return RoundOutcome(
        results=results,
        mean=mean,
        upload_bytes=upload,
        clipped=clipped,
        stage_seconds=stage_seconds,
    )
