"""The coordinator's round loop, independent of how messages travel.

``server/app.py`` supplies a ``Transport`` over Flower's Grid; tests can supply the
in-process grid through the same app. Each round: send the plan and the global
trainable arrays to the sampled sites, keep the updates of sites that trained,
average them (weighted by their declared example counts), apply the server
optimizer, evaluate centrally on the public test split, checkpoint, report.
A round in which no site trained leaves the global model unchanged and says why.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from common.config import RunConfig
from common.data import load_builtin
from common.model import build_model
from common.text import encode
from common.training import Batchable, default_device, evaluate
from common.wire import RoundPlan, SiteReport, report_dict
from server.optimizers import ServerOptimizer, weighted_mean
from server.report import Reporter, RoundRow, save_arrays, write_outputs

Arrays = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SiteResult:
    """One site's answer to a round: a report (+ update), or a transport error."""

    node_id: int
    report: SiteReport | None
    update: Arrays | None
    error: str | None = None


class Transport(Protocol):
    def node_ids(self) -> list[int]: ...

    def train(self, node_ids: list[int], plan: RoundPlan, arrays: Arrays) -> list[SiteResult]: ...


@dataclass
class SiteLedgerView:
    """What the coordinator learnt of a site: its latest declared metrics."""

    site: str
    last: dict[str, Any] = field(default_factory=dict)
    rounds_trained: int = 0
    rounds_refused: int = 0
    rounds_failed: int = 0


def _site_name(result: SiteResult) -> str:
    """The name a site declares (its site-id), else its Flower node id."""
    return result.report.site if result.report is not None else f"node-{result.node_id}"


def _check_update(update: Arrays, reference: Arrays) -> str | None:
    if set(update) != set(reference):
        return "update arrays differ from the global model's"
    for k, v in update.items():
        if tuple(v.shape) != tuple(reference[k].shape):
            return f"update array {k!r} has shape {tuple(v.shape)}"
    return None


def _ema(average: Arrays | None, current: Arrays, decay: float) -> Arrays:
    """Exponential moving average of the global model (starts at the first iterate)."""
    if average is None or decay == 0:
        return {k: v.clone() for k, v in current.items()}
    return {k: decay * average[k] + (1 - decay) * current[k] for k in current}


def run_federation(
    cfg: RunConfig, transport: Transport, out_dir: Path, reporter: Reporter
) -> dict[str, Any]:
    """Run all rounds; returns the summary (also written to ``out_dir``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    test = load_builtin(cfg.dataset, "test", seed=cfg.seed)
    spec = cfg.model_spec(len(test.label_names))
    model = build_model(spec, seed=cfg.seed)
    weights: Arrays = {k: v.clone() for k, v in model.trainable_state().items()}
    shipped: Arrays | None = None  # what is evaluated and saved: the EMA of `weights`
    test_data = Batchable.from_encoded(encode(test.texts, cfg.max_length), test.labels)
    device = default_device()
    optimizer = ServerOptimizer(
        cfg.server_optimizer, learning_rate=cfg.server_learning_rate, momentum=cfg.server_momentum
    )
    sampler = random.Random(cfg.seed)
    sites: dict[str, SiteLedgerView] = {}
    rows: list[RoundRow] = []
    reporter.start(cfg, num_params=sum(v.numel() for v in weights.values()))

    for rnd in range(1, cfg.num_server_rounds + 1):
        started = time.monotonic()
        available = sorted(transport.node_ids())
        k = max(1, math.ceil(cfg.fraction_train * len(available)))
        chosen = sorted(sampler.sample(available, min(k, len(available))))
        row = RoundRow(round=rnd, sites_asked=len(chosen))
        if len(available) < cfg.min_sites:
            row.fail(f"only {len(available)} sites connected, min-sites is {cfg.min_sites}")
            results: list[SiteResult] = []
        else:
            results = transport.train(chosen, RoundPlan(round=rnd, config=cfg), weights)
        updates, counts = [], []
        for res in results:
            name = _site_name(res)
            view = sites.setdefault(name, SiteLedgerView(site=name))
            report = res.report
            if report is None:
                view.rounds_failed += 1
                row.note(name, "failed", res.error or "no reply")
                continue
            if report.status != "failed":  # a failure report carries no accounting
                view.last = report_dict(report)
                if report.dp and not math.isnan(report.epsilon):
                    row.epsilon_per_site[name] = report.epsilon
                if report.ledger_head and report.dp:
                    row.ledger_heads[name] = {
                        "hash": report.ledger_head,
                        "signature": report.ledger_signature,
                        "epsilon": report.epsilon,
                    }
            if report.status == "ok" and res.update is not None:
                problem = _check_update(res.update, weights)
                if problem:
                    view.rounds_failed += 1
                    row.note(name, "rejected", problem)
                    continue
                view.rounds_trained += 1
                updates.append(res.update)
                counts.append(float(report.num_examples))
                row.trained += 1
            elif report.status == "refused":
                view.rounds_refused += 1
                row.note(name, "refused", report.reason)
            else:
                view.rounds_failed += 1
                row.note(name, "failed", report.reason)
        if updates:
            weights = optimizer.step(weights, weighted_mean(updates, counts))
            shipped = _ema(shipped, weights, cfg.server_ema)
            model.load_trainable_state(shipped)
        elif row.status == "ok":
            row.fail("no site trained this round; the global model is unchanged")
        result = evaluate(model, test_data, device=device)
        row.accuracy, row.loss = result.accuracy, result.loss
        row.seconds = time.monotonic() - started
        final = shipped if shipped is not None else weights
        save_arrays(
            out_dir / "checkpoints" / f"round-{rnd:03d}.safetensors",
            final,
            spec,
            test.label_names,
            rnd,
        )
        rows.append(row)
        reporter.round(row)

    final = shipped if shipped is not None else weights
    summary = write_outputs(out_dir, cfg, rows, sites, final, spec, test.label_names)
    reporter.finish(summary, out_dir)
    return summary
