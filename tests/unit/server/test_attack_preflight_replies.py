"""A site (or a fake one the coordinator registered) answering the pre-flight with
junk: the coordinator must neither crash nor count it as an answer (server/federation.py
``run_preflight``), and whatever it records must be writable to ``summary.json``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from rich.console import Console

from common.codec import decode_reply, encode_reply
from common.config import RunConfig
from common.messages import SiteReport, TrainReply, TrainRequest, WireError
from common.model import build_model, model_spec
from common.outputs import PreflightRow
from common.task import run_task
from server.aggregation import Reply
from server.federation import run_preflight
from server.report import Reporter


def _wire(reply: TrainReply) -> Reply[TrainReply]:
    """What GridTransport hands the workflow: the reply through the real codec."""
    try:
        return Reply(decode_reply(encode_reply(reply)))
    except WireError as err:
        return Reply(None, f"malformed reply: {err}")


class _Fake:
    def __init__(self, replies: dict[int, Reply[TrainReply]]) -> None:
        self.replies = replies
        self.asked: dict[int, TrainRequest] = {}

    def node_ids(self) -> list[int]:
        return sorted(self.replies)

    def train(self, requests: Mapping[int, TrainRequest], *, group: str) -> dict[int, Any]:
        self.asked = dict(requests)
        return {n: self.replies[n] for n in requests}

    def stage(self, messages: Mapping[int, Any], *, group: str) -> dict[int, Any]:
        raise AssertionError("a pre-flight has no stages")


def test_junk_preflight_answers_neither_crash_the_coordinator_nor_count() -> None:
    cfg = RunConfig(num_server_rounds=2, max_length=16)
    task = run_task(cfg)
    weights = build_model(model_spec(task), seed=0).trainable_state()
    good = SiteReport.of(
        "ok", "", "site-a", epsilon=3.9, noise_multiplier=1.1, budget=8.0, delta=1e-5,
        lifetime_epsilon=0.0, lifetime_after=4.0, reserve=0.0, total_steps=10,
    )  # fmt: skip
    replies = {
        1: _wire(TrainReply(good, preflight=True)),
        # an update in answer to a pre-flight (status ok, not marked as a pre-flight)
        2: _wire(TrainReply(SiteReport.of("ok", "", "site-b"), {"w": torch.zeros(2)})),
        # ok but no DP, every number NaN
        3: _wire(
            TrainReply(
                SiteReport.of(
                    "ok",
                    "x",
                    "site-c",
                    dp=False,
                    epsilon=math.nan,
                    budget=math.nan,
                    delta=math.nan,
                    lifetime_epsilon=math.nan,
                    reserve=math.nan,
                    lifetime_after=math.nan,
                ),
                preflight=True,
            )
        ),
        # DP claimed with NaN numbers: refused by the codec
        4: _wire(TrainReply(SiteReport.of("ok", "", "site-d", epsilon=math.nan), preflight=True)),
        # a refusal with a huge reason, claiming another site's name
        5: _wire(TrainReply(SiteReport.of("refused", "y" * 100_000, "site-a"), preflight=True)),
        6: Reply(None, "no reply"),
    }
    fake = _Fake(replies)
    known: dict[int, str] = {}
    rows, refused = run_preflight(fake, sorted(replies), cfg, task, weights, known)
    assert all(r.plan.preflight and r.setup is None for r in fake.asked.values())
    by_status = sorted((r.site, r.status) for r in rows)
    assert len(rows) == 6, by_status
    assert refused.keys() == {5} and len(refused[5]) < 300
    ok = [r for r in rows if r.status == "ok" and r.epsilon is not None]
    assert [r.site for r in ok] == ["site-a"]
    for row in rows:  # summary.json must accept every row
        PreflightRow.model_validate_json(row.model_dump_json())
    with open("/dev/null", "w") as sink:
        Reporter(Console(file=sink)).preflight(rows)
