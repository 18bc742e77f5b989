"""How one round's updates reach the coordinator: the message types every workflow
shares, and the plain workflow (updates in the clear, for comparison and for runs
that turn secure aggregation off). The secure workflow is in server/secure.py."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from flwr.app import RecordDict

from common.secagg.encoding import site_weight
from common.wire import RoundPlan, SiteReport, WireError, decode_reply, encode_plan
from server.optimizers import weighted_mean

Arrays = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Reply:
    """A site's reply to one message: its content, or why there is none."""

    content: RecordDict | None
    error: str | None = None
    nbytes: int = 0  # serialized size of the content


class Transport(Protocol):
    def node_ids(self) -> list[int]: ...

    def exchange(self, contents: dict[int, RecordDict], *, group: str) -> dict[int, Reply]:
        """Send each node its content; a reply (or an error) for every node asked."""
        ...


@dataclass(frozen=True)
class SiteResult:
    """One site's part in a round: its report, and whether its update is in the mean."""

    node_id: int
    report: SiteReport | None
    error: str | None = None  # why the site's update is not in the mean
    contributed: bool = False


@dataclass
class RoundOutcome:
    """What an aggregation workflow hands back for one round."""

    results: list[SiteResult]
    mean: Arrays | None  # the mean update; None: the global model stays as it was
    failure: str = ""  # why the whole round failed (e.g. secure aggregation aborted)
    upload_bytes: dict[int, int] = field(default_factory=dict)  # per node
    clipped: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time per exchange


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
    """Every site sends its clipped update in the clear; the coordinator averages them."""
    content = encode_plan(plan, weights)
    started = time.monotonic()
    replies = transport.exchange({nid: content for nid in chosen}, group=str(plan.round))
    stage_seconds = {"train": time.monotonic() - started}
    results, updates, counts = [], [], []
    upload: dict[int, int] = {}
    clipped = 0
    for nid in chosen:
        reply = replies[nid]
        upload[nid] = reply.nbytes
        if reply.content is None:
            results.append(SiteResult(nid, None, reply.error or "no reply"))
            continue
        try:
            report, update, _keys = decode_reply(reply.content)
        except WireError as err:
            results.append(SiteResult(nid, None, f"malformed reply: {err}"))
            continue
        if report.status != "ok":
            results.append(SiteResult(nid, report))
            continue
        problem = (
            "reply carries secagg keys, not an update"
            if update is None
            else _check_update(update, weights)
        )
        if problem or update is None:
            results.append(SiteResult(nid, report, problem))
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
    mean = weighted_mean(updates, counts) if updates else None
    return RoundOutcome(
        results=results,
        mean=mean,
        upload_bytes=upload,
        clipped=clipped,
        stage_seconds=stage_seconds,
    )
