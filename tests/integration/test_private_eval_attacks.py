"""The private federated evaluation attacked as the coordinator and as a malicious site
(issue 14's red team): each test failed before its fix. F1: a site's absurd declared
noise scale crashed the run; F2: one site's counts set the published scores; F2b: a
site in the sum was noted as rejected; F3: an evaluation's ledger entry could be cut
unseen; F4: a simulated site's own budget did not cap its evaluation; F5/F5b/F6: the
held-out split could change (a lost pin, another text column, rows trained without
DP), moving released rows into training or trained rows into the evaluation."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from client.reply import train_round
from client.round import SiteState
from client.settings import SiteConfigError, SiteSettings
from common.config import RunConfig
from common.evaluation import COUNTS_KEY
from common.messages import RoundPlan, SiteReport, StageMessage, TrainReply, TrainRequest
from common.model import build_model, model_spec
from common.outputs import (
    LedgerHead,
    PrivateEval,
    RoundRecord,
    RunSummary,
    SiteSummary,
    final_record,
)
from common.privacy.audit import audit_against_summary
from common.privacy.ledger import EVAL_SCOPE, LEDGER_FILE, read_ledger
from common.task import run_task
from server.aggregation import Reply
from server.federation import federated_evaluation
from tests.support.sites import deployed_node

# ---- helpers ---------------------------------------------------------------------------

ROWS = [
    (
        f"review number {i} was {'great fun' if i % 2 else 'awful dull'}",
        "fresh" if i % 2 else "rotten",
    )
    for i in range(300)
]


def _cfg(**extra: Any) -> RunConfig:
    base: dict[str, Any] = dict(
        num_server_rounds=2,
        max_length=16,
        batch_size=64,
        epsilon=1.0,
        dataset="sites",
        task="rotten-tomatoes",
        evaluation="federated",
        eval_epsilon=1.0,
        secure_aggregation=False,
    )
    base.update(extra)
    return RunConfig(**base)


def _deployed(tmp: Path, **node: Any) -> dict[str, Any]:
    data = tmp / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in ROWS))
    return deployed_node(
        data, tmp / "state", site_id="desk", epsilon=4.0, data_size=len(ROWS),
        **{"secagg-required": False, **node},
    )  # fmt: skip


def _ask(
    node: Mapping[str, Any], cfg: RunConfig, rnd: int, *, evaluate: bool, run: str
) -> TrainReply:
    task = run_task(cfg)
    arrays = build_model(model_spec(task), seed=0).trainable_state()
    settings = SiteSettings.from_node_config(node, cfg)
    try:
        reply, _ = train_round(
            TrainRequest(RoundPlan(rnd, cfg, task, evaluate=evaluate), arrays),
            settings,
            SiteState(),
            run_id=run,
        )
    except SiteConfigError as err:  # what the ClientApp reports as a failure
        return TrainReply(SiteReport.of("failed", str(err), settings.site_id))
    return reply


class _Sites:
    """A plain-aggregation transport whose sites answer with fixed replies."""

    def __init__(self, replies: dict[int, TrainReply]) -> None:
        self.replies = replies

    def node_ids(self) -> list[int]:
        return sorted(self.replies)

    def train(
        self, requests: Mapping[int, TrainRequest], *, group: str
    ) -> dict[int, Reply[TrainReply]]:
        return {n: Reply(self.replies[n]) for n in requests}

    def stage(
        self, messages: Mapping[int, StageMessage], *, group: str
    ) -> dict[int, Reply[StageMessage]]:
        raise AssertionError("plain evaluation has no stages")


def _counts_reply(site: str, counts: list[int], sigma: float = 4.0, reason: str = "") -> TrainReply:
    report = SiteReport.of(
        "ok", reason, site, num_examples=100, noise_multiplier=sigma, epsilon=0.8,
        sample_rate=1.0, steps=1, total_steps=1, budget=1.0, delta=1e-5,
    )  # fmt: skip
    return TrainReply(report, {COUNTS_KEY: torch.tensor(counts, dtype=torch.float32)})


def _evaluate(replies: dict[int, TrainReply]) -> PrivateEval | None:
    cfg = _cfg(min_sites=2)
    task = run_task(cfg)
    weights = build_model(model_spec(task), seed=0).trainable_state()
    result, _ = federated_evaluation(_Sites(replies), sorted(replies), cfg, task, 2, weights, {})
    return result


# ---- F1: one site's declared noise multiplier kills the coordinator's run ----------------


def test_f1_a_huge_but_finite_noise_multiplier_does_not_crash_the_evaluation() -> None:
    # The codec lets a report carry any non-negative finite number (1e200 included), and
    # SiteSummary promises "no declaration can keep the coordinator from writing its
    # summary". federated_evaluation squares the declared sigmas (sum_noise_std): inf,
    # PrivateEval refuses it with a ValidationError that run_federation does not catch.
    replies = {
        1: _counts_reply("site-1", [40, 10, 12, 38]),
        2: _counts_reply("site-2", [41, 9, 11, 39]),
        3: _counts_reply("site-3", [1, 0, 0, 1], sigma=1e200),  # malicious
    }
    result = _evaluate(replies)
    assert result is not None and math.isfinite(result.noise_std)


# ---- F2: one site's counts decide the published scores ----------------------------------


def test_f2_one_site_cannot_set_the_federation_accuracy() -> None:
    # Two honest sites score 0.5; a third sends 2^24 - 1 on the diagonal (whole, below
    # 2^24: accepted in the clear; in the secure sum any ring value is accepted).
    honest = [25, 25, 25, 25]
    replies = {
        1: _counts_reply("site-1", honest),
        2: _counts_reply("site-2", honest),
        3: _counts_reply("site-3", [2**24 - 1, 0, 0, 2**24 - 1]),
    }
    result = _evaluate(replies)
    assert result is not None
    # counts far above what the site declared (num_examples 100 + noise) must not count
    assert "site-3" not in result.sites, result.accuracy


def test_f2b_a_site_that_contributed_is_not_noted_as_rejected() -> None:
    # A deployed site that ignored eval-noise off says so in its reason; the coordinator
    # files that as status "rejected" ("the coordinator refused what the site sent") for
    # a site whose counts are in the sum.
    replies = {
        1: _counts_reply("site-1", [25, 25, 25, 25], reason="eval-noise off ignored"),
        2: _counts_reply("site-2", [25, 25, 25, 25]),
    }
    result = _evaluate(replies)
    assert result is not None and "site-1" in result.sites
    assert not [n for n in result.notes if n.site == "site-1" and n.status == "rejected"]


# ---- F3: audit --summary does not anchor the evaluation's ledger heads ------------------


def test_f3_cutting_the_evaluation_entries_off_a_ledger_is_found_by_the_audit(
    tmp_path: Path,
) -> None:
    node = _deployed(tmp_path)
    cfg = _cfg()
    trained = _ask(node, cfg, 1, evaluate=False, run="7")
    evaluated = _ask(node, cfg, 2, evaluate=True, run="7")
    assert (trained.report.status, evaluated.report.status) == ("ok", "ok")
    ledger = tmp_path / "state" / LEDGER_FILE
    assert [e.budget_scope for e in read_ledger(ledger)] == ["site", EVAL_SCOPE]

    def head(r: SiteReport) -> LedgerHead:
        return LedgerHead(hash=r.ledger_head, signature=r.ledger_signature, epsilon=r.epsilon)

    private = PrivateEval(
        accuracy=0.5, macro_f1=0.5, majority_macro_f1=0.3, classes=(), counts=((1, 1), (1, 1)),
        noise_std=evaluated.report.noise_multiplier, noise=True, sites=("desk",),
        epsilon_per_site={"desk": evaluated.report.epsilon},
        ledger_heads={"desk": head(evaluated.report)},
    )  # fmt: skip
    rounds = (
        RoundRecord(round=1, accuracy=None, loss=None, ledger_heads={"desk": head(trained.report)}),
        RoundRecord(round=2, accuracy=None, loss=None, private_eval=private),
    )
    sites = (SiteSummary(site="desk", epsilon=trained.report.epsilon, identity=trained.report.identity,
                         ledger_head=trained.report.ledger_head),)  # fmt: skip
    summary = RunSummary(
        dp=True, mode="federated-dp", config=cfg.to_user_config(), rounds=rounds, sites=sites,
        final=final_record(rounds, sites), task=json.loads(run_task(cfg).canonical()),
    )  # fmt: skip
    key = tmp_path / "state" / "identity.pub"
    assert audit_against_summary([ledger], summary, key=key if key.exists() else None).ok

    # The site (or anyone with its disk) cuts the evaluation's entry: its eval budget is
    # back, the chain stays valid, and the coordinator saw that head after round 2.
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:-1]))
    audit = audit_against_summary([ledger], summary, key=key if key.exists() else None)
    assert not audit.ok, "the evaluation's ledger head the coordinator saw is not checked"


# ---- F4: a simulated site's own budget does not cap its evaluation ----------------------


def test_f4_a_simulated_site_with_its_own_budget_is_not_charged_beyond_it(tmp_path: Path) -> None:
    # Simulated site with its own lifetime budget (node config 'epsilon' = 1): training is
    # held to it, the evaluation scope is capped by the plan's eval-epsilon instead.
    cfg = RunConfig(
        num_server_rounds=1, max_length=16, batch_size=64, epsilon=1.0,
        evaluation="federated", eval_epsilon=6.0, sites_dir=str(tmp_path / "sites"),
    )  # fmt: skip
    node = {"partition-id": 3, "num-partitions": 20, "epsilon": 1.0}
    reply = _ask(node, cfg, 1, evaluate=True, run="1")
    spent = reply.report.lifetime_epsilon
    assert reply.report.status == "refused" or spent <= 1.0 + 1e-6, (
        f"evaluation spent {spent:.3f} of a site whose own lifetime budget is 1"
    )


# ---- F5: a lost holdout.json is re-pinned at a new fraction: evaluated rows get trained ----


def test_f5_a_site_that_released_evaluations_does_not_repin_its_holdout(tmp_path: Path) -> None:
    node = _deployed(tmp_path, **{"eval-fraction": 0.2})
    cfg = _cfg()
    assert _ask(node, cfg, 1, evaluate=False, run="1").report.status == "ok"
    assert _ask(node, cfg, 2, evaluate=True, run="1").report.status == "ok"
    # holdout.json is not part of the signed ledger; lost (partial restore) or removed to
    # get past the "eval-fraction changed" error, it is pinned afresh at the node
    # config's fraction. late=True stops later evaluations only: rows whose hash is in
    # [0.1, 0.2) were released in the evaluation above and are trained on from now on,
    # while the training scope never composes the evaluation's entries.
    (tmp_path / "state" / "holdout.json").unlink()
    node = {**node, "eval-fraction": 0.1}
    reply = _ask(node, cfg, 1, evaluate=False, run="2")
    assert reply.report.status != "ok", "trained on rows that were held out and evaluated"


def test_f5b_changing_the_text_column_does_not_resplit_the_rows(tmp_path: Path) -> None:
    # The keyed hash is of the "text", i.e. of whatever column the node config names
    # (`site init --force --task` with another text-column rewrites it; keys, ledger and
    # holdout.json are kept). holdout.json pins only the fraction: every line of the file
    # is re-split by another column's text, so rows released in the evaluation become
    # training rows without any refusal.
    data = tmp_path / "reviews.csv"
    data.write_text(
        "text,title,label\n"
        + "".join(f"{t},title {i} {t[::-1]},{lab}\n" for i, (t, lab) in enumerate(ROWS))
    )
    node = deployed_node(
        data, tmp_path / "state", site_id="desk", epsilon=4.0, data_size=len(ROWS),
        **{"secagg-required": False},
    )  # fmt: skip
    cfg = _cfg()
    assert _ask(node, cfg, 1, evaluate=False, run="1").report.status == "ok"
    assert _ask(node, cfg, 2, evaluate=True, run="1").report.status == "ok"
    node = {**node, "text-column": "title"}
    reply = _ask(node, cfg, 1, evaluate=False, run="2")
    assert reply.report.status != "ok", "rows evaluated under one split are trained under another"


# ---- F6: no-DP rounds are invisible to `late` ------------------------------------------


def test_f6_rows_trained_without_dp_are_not_evaluated_as_held_out(tmp_path: Path) -> None:
    # Simulated site, shared sites-dir: a no-DP run with central evaluation holds no rows
    # out (and writes no ledger entry); a later run pins the share with late=False and
    # releases DP "held-out" counts of rows the no-DP run trained on.
    sites = str(tmp_path / "sites")
    plain = RunConfig(num_server_rounds=1, max_length=16, batch_size=64, dp=False, sites_dir=sites)
    node = {"partition-id": 3, "num-partitions": 20}
    assert _ask(node, plain, 1, evaluate=False, run="1").report.status == "ok"
    private = RunConfig(num_server_rounds=1, max_length=16, batch_size=64, epsilon=1.0,
                        evaluation="federated", eval_epsilon=1.0, sites_dir=sites)  # fmt: skip
    reply = _ask(node, private, 1, evaluate=True, run="2")
    assert reply.report.status == "refused", "held-out rows were trained on (without DP)"
