"""The coordinator's round loop, independent of how messages travel.

``server/app.py`` supplies a ``Transport`` over Flower's Grid; tests can supply the
in-process grid through the same app. Each round: sample sites, let the aggregation
workflow (secure by default: server/secure.py; plain: server/aggregation.py) bring back
the mean of their clipped updates, apply the server optimizer, evaluate centrally on
the task's public test set (if it has one) and, after the rounds the plan names,
privately at the sites (``federated_evaluation``: the sum of their noisy confusion
matrices), checkpoint, report. A round without a mean (no site trained, or secure
aggregation aborted) leaves the global model unchanged and says why. The plan carries
the run's task (common/task.py).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import RunConfig
from common.data import load_builtin, load_site_file
from common.evaluation import (
    COUNTS_KEY,
    MAX_DECLARED_SIGMA,
    SENSITIVITY,
    count_bound,
    eval_rounds,
    evaluation_modes,
    scores,
    sum_noise_std,
)
from common.features import PUBLIC_CACHE, batchable
from common.messages import REHEARSAL_NOTE, RoundPlan, SiteReport, TrainRequest
from common.model import build_model, model_spec
from common.outputs import (
    ClassScore,
    LedgerHead,
    Note,
    NoteStatus,
    PreflightRow,
    PrivateEval,
    RoundRecord,
    RunOutputError,
    RunSummary,
    SiteSummary,
    checkpoint_path,
    final_record,
    save_model,
    write_run_files,
    write_summary,
)
from common.task import Task, run_task, test_file_path
from common.training import Batchable, default_device, evaluate
from server import resume
from server.aggregation import RoundOutcome, SiteResult, Transport, plain_round
from server.optimizers import ServerOptimizer
from server.report import Reporter
from server.resume import Resumable
from server.secure import secure_round

Arrays = dict[str, torch.Tensor]
log = logging.getLogger("fedsilo.coordinator")


@dataclass
class DeclaredSite:
    """What the coordinator learnt of a site: its latest declared numbers (which only
    its signed ledger can prove) and how its rounds went."""

    site: str
    last: SiteReport | None = None
    rounds_trained: int = 0
    rounds_refused: int = 0
    rounds_failed: int = 0

    def summary(self, cfg: RunConfig) -> SiteSummary:
        last = self.last
        if last is None:  # it never declared anything: only failures
            return SiteSummary(
                site=self.site,
                dp=cfg.dp,
                rounds_trained=self.rounds_trained,
                rounds_refused=self.rounds_refused,
                rounds_failed=self.rounds_failed,
            )
        return SiteSummary(
            site=self.site,
            num_examples=last.num_examples,
            noise_multiplier=_declared(last.noise_multiplier),
            sample_rate=_declared(last.sample_rate),
            steps=last.total_steps,
            epsilon=_declared(last.epsilon),
            delta=_declared(last.delta),
            budget=_declared(last.budget),
            lifetime_epsilon=_declared(last.lifetime_epsilon) if last.dp else None,
            identity=last.identity or None,
            dp=last.dp,
            rounds_trained=self.rounds_trained,
            rounds_refused=self.rounds_refused,
            rounds_failed=self.rounds_failed,
            ledger_head=last.ledger_head or None,
        )


def _declared(value: float) -> float | None:
    """A declared number for the summary: NaN (a no-DP site's epsilon) becomes None."""
    return None if math.isnan(value) else value


@dataclass
class RoundTally:
    """One round while it happens; ``record`` freezes it for the summary."""

    round: int
    sites_asked: int = 0
    trained: int = 0
    status: str = "ok"
    reason: str = ""
    aggregate_seconds: float = 0.0
    epsilon_per_site: dict[str, float] = field(default_factory=dict)
    ledger_heads: dict[str, LedgerHead] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)
    upload_bytes: dict[str, int] = field(default_factory=dict)
    clipped: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    trained_sites: list[str] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason

    def note(self, site: str, what: NoteStatus, reason: str) -> None:
        self.notes.append(Note(site=site, status=what, reason=reason))

    def record(
        self,
        *,
        accuracy: float | None,
        loss: float | None,
        seconds: float,
        private_eval: PrivateEval | None = None,
    ) -> RoundRecord:
        return RoundRecord(
            round=self.round,
            sites_asked=self.sites_asked,
            trained=self.trained,
            accuracy=accuracy,
            loss=loss,
            status="ok" if self.status == "ok" else "failed",
            reason=self.reason,
            seconds=seconds,
            aggregate_seconds=self.aggregate_seconds,
            epsilon_per_site=self.epsilon_per_site,
            ledger_heads=self.ledger_heads,
            notes=tuple(self.notes),
            upload_bytes=self.upload_bytes,
            clipped=self.clipped,
            stage_seconds=self.stage_seconds,
            trained_sites=tuple(self.trained_sites),
            private_eval=private_eval,
        )


def _site_name(result: SiteResult, known: dict[int, str]) -> str:
    """The name a site declares (its site-id), else the one it declared before, else its
    Flower node id; remembered in ``known``."""
    if result.report is not None:
        known[result.node_id] = result.report.site
    return known.get(result.node_id, f"node-{result.node_id}")


def _wait_for_sites(transport: Transport, need: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    available = sorted(transport.node_ids())
    if len(available) < need and timeout > 0:
        log.info("waiting up to %.0f s for %d sites (%d connected)", timeout, need, len(available))
    while len(available) < need and time.monotonic() < deadline:
        time.sleep(1.0)
        available = sorted(transport.node_ids())
    return available


def _ema(average: Arrays | None, current: Arrays, decay: float) -> Arrays:
    """Exponential moving average of the global model (starts at the first iterate)."""
    if average is None or decay == 0:
        return {k: v.clone() for k, v in current.items()}
    return {k: decay * average[k] + (1 - decay) * current[k] for k in current}


def _account(res: SiteResult, view: DeclaredSite, row: RoundTally) -> None:
    """Fold one site's result into what it declared and the round's tally."""
    name, report = view.site, res.report
    if report is None:
        view.rounds_failed += 1
        row.note(name, "failed", res.error or "no reply")
        return
    if report.status != "failed":  # a failure report carries no accounting
        view.last = report
        if report.dp and not math.isnan(report.epsilon):
            row.epsilon_per_site[name] = report.epsilon
        if report.ledger_head and report.dp:
            row.ledger_heads[name] = LedgerHead(
                hash=report.ledger_head, signature=report.ledger_signature, epsilon=report.epsilon
            )
    if report.status == "ok" and res.contributed:
        view.rounds_trained += 1
        row.trained += 1
        if res.error:  # in the sum, but misbehaved after (a secure round names a liar)
            row.note(name, "rejected", res.error)
    elif report.status == "ok":
        view.rounds_failed += 1
        status: NoteStatus = "left" if res.left else "failed" if res.round_failed else "rejected"
        row.note(name, status, res.error or "update not used")
    elif report.status == "refused":
        view.rounds_refused += 1
        row.note(name, "refused", report.reason)
    else:
        view.rounds_failed += 1
        row.note(name, "failed", report.reason)


def run_federation(
    cfg: RunConfig, transport: Transport, out_dir: Path, reporter: Reporter, *, run_id: str = ""
) -> RunSummary:
    """Run all rounds (with ``resume``, those after the dead run's last checkpoint:
    server/resume.py); returns the summary (also written to ``out_dir``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    resumed: Resumable | None = None
    earlier: tuple[RoundRecord, ...] = ()
    if cfg.resume:
        dead, resumed, earlier = resume.load(Path(cfg.resume))
        cfg = resume.resumed_config(cfg, dead, resumed)
    resume.record_run(out_dir, cfg, run_id)
    task = run_task(cfg)
    central, federated = evaluation_modes(cfg, task)
    spec = model_spec(task)
    model = build_model(spec, seed=cfg.seed)
    weights: Arrays = {k: v.clone() for k, v in model.trainable_state().items()}
    shipped: Arrays | None = None  # what is evaluated and saved: the EMA of `weights`
    test_data = _public_test_set(cfg, task) if central else None
    evaluations = eval_rounds(cfg) if federated else ()
    device = default_device()
    optimizer = ServerOptimizer(
        cfg.server_optimizer, learning_rate=cfg.server_learning_rate, momentum=cfg.server_momentum
    )
    sampler = random.Random(cfg.seed)
    sites: dict[str, DeclaredSite] = {}
    known_names: dict[int, str] = {}
    banned: dict[int, int] = {}  # node -> the round it was proven to cheat in
    rows: list[RoundRecord] = list(earlier)
    if resumed is not None:  # the dead run's state after its last finished round
        if {k: v.shape for k, v in resumed.weights.items()} != {
            k: v.shape for k, v in weights.items()
        }:
            raise RunOutputError(f"resume {cfg.resume}: its weights do not fit the task's model")
        weights, shipped = resumed.weights, resumed.shipped
        optimizer.load_state(resumed.optimizer, weights)
        sampler.setstate(resumed.sampler)
        banned, known_names = dict(resumed.banned), dict(resumed.names)
        if shipped is not None:
            model.load_trainable_state(shipped)
    first = cfg.resume_round + 1
    reporter.start(cfg, num_params=sum(v.numel() for v in weights.values()), task=task)
    # Before anything is spent: what the plan would cost each site, and who would refuse
    # (not asked this run; a rehearsal spends nothing, so it asks everyone).
    checked: tuple[PreflightRow, ...] = ()
    declined: dict[int, str] = {}
    if cfg.dp and cfg.preflight:
        present = _wait_for_sites(transport, cfg.min_sites, cfg.round_timeout)
        checked, refusing = run_preflight(transport, present, cfg, task, weights, known_names)
        reporter.preflight(checked, rehearsal=cfg.rehearsal)
        declined = {} if cfg.rehearsal else refusing
    accepting = len(_wait_for_sites(transport, 0, 0)) - len(declined)
    stop = ""
    if declined and accepting < cfg.min_sites:
        stop = (
            f"only {accepting} connected sites accept the plan ({len(declined)} refused it at "
            f"the pre-flight), min-sites is {cfg.min_sites}: the run stops before its first "
            "round; nothing was spent"
        )
        reporter.stopped(stop)
    else:
        reporter.round_header()

    def summarize(complete: bool) -> RunSummary:
        site_rows = tuple(
            view.summary(cfg) for view in sorted(sites.values(), key=lambda v: _site_order(v.site))
        )
        return RunSummary(
            dp=cfg.dp,
            mode="federated-dp" if cfg.dp else "federated-no-dp",
            config=cfg.to_user_config(),
            rounds=tuple(rows),
            sites=site_rows,
            final=final_record(tuple(rows), site_rows),
            task=json.loads(task.canonical()),
            rehearsal=cfg.rehearsal,
            preflight=checked,
            complete=complete,
        )

    for rnd in range(first, first if stop else cfg.num_server_rounds + 1):
        started = time.monotonic()
        # Deployed sites connect when they start: give them one round timeout to reach
        # min-sites before the first round, rather than failing it at once.
        wait = cfg.round_timeout if rnd == first else 0
        available = _wait_for_sites(transport, cfg.min_sites, wait)
        # A site proven to cheat in secure aggregation is not asked again this run, nor
        # one that refused the plan at the pre-flight.
        available = [n for n in available if n not in banned and n not in declined]
        k = max(1, math.ceil(cfg.fraction_train * len(available)))
        chosen = sorted(sampler.sample(available, min(k, len(available))))
        row = RoundTally(round=rnd, sites_asked=len(chosen))
        if rnd == first:
            for nid, why in sorted(declined.items()):
                row.note(known_names.get(nid, f"node-{nid}"), "refused", why)
        if len(available) < cfg.min_sites:
            but = f" ({len(declined)} refused the plan at the pre-flight)" if declined else ""
            row.fail(f"only {len(available)} sites connected{but}, min-sites is {cfg.min_sites}")
            outcome = RoundOutcome(results=[], mean=None)
        else:
            plan = RoundPlan(round=rnd, config=cfg, task=task)
            if cfg.secure_aggregation:
                outcome = secure_round(transport, chosen, plan, weights)
            else:
                outcome = plain_round(transport, chosen, plan, weights)
        row.aggregate_seconds = time.monotonic() - started
        names = {res.node_id: _site_name(res, known_names) for res in outcome.results}
        row.upload_bytes = {names.get(n, f"node-{n}"): b for n, b in outcome.upload_bytes.items()}
        row.clipped = outcome.clipped
        row.stage_seconds = {k: round(v, 3) for k, v in outcome.stage_seconds.items()}
        row.trained_sites = sorted(names[res.node_id] for res in outcome.results if res.contributed)
        for res in outcome.results:
            _account(
                res, sites.setdefault(names[res.node_id], DeclaredSite(names[res.node_id])), row
            )
        for nid in outcome.cheaters:
            banned.setdefault(nid, rnd)
        for nid, when in sorted(banned.items()):
            if when == rnd:
                continue  # this round's notes say what it did
            name = known_names.get(nid, f"node-{nid}")
            why = f"proven to cheat in secure aggregation in round {when}: not asked this run"
            row.note(name, "rejected", why)
        if outcome.failure:
            row.fail(outcome.failure)
        if outcome.mean is not None:
            weights = optimizer.step(weights, outcome.mean)
            shipped = _ema(shipped, weights, cfg.server_ema)
            model.load_trainable_state(shipped)
        elif row.status == "ok":
            refused = sorted({n.site for n in row.notes if n.status == "refused"})
            why = f" ({len(refused)} refused: see the notes)" if refused else ""
            row.fail(f"no site trained this round{why}; the global model is unchanged")
        final = shipped if shipped is not None else weights
        result = evaluate(model, test_data, device=device) if test_data is not None else None
        private = None
        if rnd in evaluations:
            asked = [n for n in _wait_for_sites(transport, 0, 0) if n not in banned]
            try:
                private, cheaters = federated_evaluation(
                    transport, asked, cfg, task, rnd, final, known_names
                )
            except Exception:  # an evaluation that breaks never ends the run
                log.exception("round %d: the federated evaluation failed", rnd)
                private, cheaters = None, ()
            for nid in cheaters:
                banned.setdefault(nid, rnd)
        record = row.record(
            accuracy=result.accuracy if result else None,
            loss=result.loss if result else None,
            seconds=time.monotonic() - started,
            private_eval=private,
        )
        save_model(checkpoint_path(out_dir, rnd), final, spec, task.labels, rnd)
        rows.append(record)
        # A run that dies leaves what it did so far (`fedsilo audit verify` reads it),
        # then the state a new run resumes from (server/resume.py).
        write_summary(out_dir, summarize(False))
        resume.save_state(
            out_dir,
            Resumable(
                round=rnd,
                run_id=run_id,
                weights=weights,
                shipped=shipped,
                optimizer=optimizer.state(),
                sampler=sampler.getstate(),
                banned=banned,
                names=known_names,
            ),
        )
        reporter.round(record)

    final = shipped if shipped is not None else weights
    summary = summarize(True)
    write_run_files(out_dir, summary, final, spec, task.labels)
    reporter.finish(summary, out_dir)
    return summary


def run_preflight(
    transport: Transport,
    nodes: list[int],
    cfg: RunConfig,
    task: Task,
    weights: Arrays,
    known: dict[int, str],
) -> tuple[tuple[PreflightRow, ...], dict[int, str]]:
    """Ask every connected site what the run's plan would cost it (client/round.py
    ``preflight``): nothing is trained or charged. Returns each site's answer and the
    nodes that refused it, with their reasons."""
    plan = RoundPlan(round=cfg.resume_round + 1, config=cfg, task=task, preflight=True)
    replies = transport.train(
        {nid: TrainRequest(plan, weights) for nid in nodes}, group="preflight"
    )
    rows: list[PreflightRow] = []
    refused: dict[int, str] = {}
    for nid in sorted(replies):
        reply = replies[nid]
        message = reply.message
        if message is not None:
            known[nid] = message.report.site
        name = known.get(nid, f"node-{nid}")
        if message is None or message.update is not None or message.masked is not None:
            why = reply.error or "answered the pre-flight with an update (not used)"
            rows.append(PreflightRow(site=name, status="failed", reason=why or "no reply"))
            continue
        r = message.report
        if r.status == "refused":
            refused[nid] = f"refused the plan at the pre-flight: {r.reason}"
        if r.status != "ok" or not r.dp:
            rows.append(
                PreflightRow(
                    site=name,
                    status=r.status,
                    reason=r.reason,
                    spent=_declared(r.lifetime_epsilon) if r.status == "refused" else None,
                    budget=_declared(r.budget) if r.status == "refused" else None,
                )
            )
            continue
        rows.append(
            PreflightRow(
                site=name,
                status="ok",
                epsilon=r.epsilon,
                noise_multiplier=r.noise_multiplier,
                steps=r.total_steps,
                spent=r.lifetime_epsilon,
                after=r.lifetime_after,
                budget=r.budget,
                reserve=r.reserve,
            )
        )
    rows.sort(key=lambda row: _site_order(row.site))
    return tuple(rows), refused


def _public_test_set(cfg: RunConfig, task: Task) -> Batchable:
    """The public test set the coordinator evaluates on: a bundled data set's test
    split, or the task's test file (checked against the task's labels and columns)."""
    if cfg.bundled:
        test = load_builtin(cfg.dataset, "test", seed=cfg.seed)
    else:
        path = test_file_path(cfg, task)
        assert path is not None  # evaluation_modes checked it
        test = load_site_file(
            path,
            label_names=task.labels,
            text_column=task.text_column,
            label_column=task.label_column,
        )
    return batchable(
        test.texts,
        test.labels,
        max_length=task.max_length,
        preset=task.model_preset,
        cache=PUBLIC_CACHE,
    )


def federated_evaluation(
    transport: Transport,
    nodes: list[int],
    cfg: RunConfig,
    task: Task,
    rnd: int,
    weights: Arrays,
    known: dict[int, str],
) -> tuple[PrivateEval | None, tuple[int, ...]]:
    """One private federated evaluation of ``weights`` at every connected site: the sum
    of their noisy confusion matrices (inside the secure sum when secure aggregation is
    on), scored; and the nodes proven to cheat in its secure sum. None when no site's
    counts are in the sum, or the sum is more than the sites' declared sizes allow (the
    log says why)."""
    plan = RoundPlan(round=rnd, config=cfg, task=task, evaluate=True)
    if len(nodes) < cfg.min_sites:
        log.warning("round %d: only %d sites for the evaluation", rnd, len(nodes))
        return None, ()
    if cfg.secure_aggregation:
        outcome = secure_round(transport, sorted(nodes), plan, weights)
    else:
        outcome = plain_round(transport, sorted(nodes), plan, weights)
    notes: list[Note] = []
    sites, sigmas, noise = [], [], True
    epsilons: dict[str, float] = {}
    heads: dict[str, LedgerHead] = {}
    k = len(task.labels)
    bound = 0.0
    for res in outcome.results:
        name = _site_name(res, known)
        report = res.report
        if not res.contributed or report is None:
            why = res.error or (report.reason if report is not None else "no reply")
            status: NoteStatus = "refused" if report and report.status == "refused" else "failed"
            notes.append(Note(site=name, status=status, reason=why or "not in the sum"))
            continue
        sites.append(name)
        if report.reason and report.reason != REHEARSAL_NOTE:  # e.g. ignored eval-noise off
            notes.append(Note(site=name, status="said", reason=report.reason))
        sigma = report.noise_multiplier * SENSITIVITY if report.dp else 0.0
        if sigma > MAX_DECLARED_SIGMA:  # a false declaration: reported, not squared
            notes.append(
                Note(site=name, status="rejected", reason="declared an impossible noise scale")
            )
            sigma = MAX_DECLARED_SIGMA
        bound += count_bound(report.num_examples, sigma, k)
        if report.dp:
            sigmas.append(sigma)
            epsilons[name] = report.epsilon
            if report.ledger_head:
                heads[name] = LedgerHead(
                    hash=report.ledger_head,
                    signature=report.ledger_signature,
                    epsilon=report.epsilon,
                )
        else:
            noise = False
    cheaters = outcome.cheaters
    if outcome.mean is None or not sites:
        log.warning("round %d: the federated evaluation has no counts: %s", rnd, outcome.failure)
        return None, cheaters
    counts = outcome.mean[COUNTS_KEY].round().long().numpy().reshape(k, k)
    if abs(int(counts.sum())) > bound:  # one site claimed more rows than sites declared
        log.warning(
            "round %d: the evaluation's counts total %d, above the %.0f the sites' declared "
            "sizes allow: not used",
            rnd,
            int(counts.sum()),
            bound,
        )
        return None, cheaters
    scored = scores(counts, task.labels)
    return PrivateEval(
        accuracy=scored.accuracy,
        macro_f1=scored.macro_f1,
        majority_macro_f1=scored.majority_macro_f1,
        classes=tuple(
            ClassScore(
                label=c.label, precision=c.precision, recall=c.recall, f1=c.f1, support=c.support
            )
            for c in scored.classes
        ),
        counts=tuple(tuple(int(x) for x in row) for row in counts),
        noise_std=sum_noise_std(sigmas),
        noise=noise and bool(sigmas),
        sites=tuple(sorted(sites, key=_site_order)),
        epsilon_per_site=epsilons,
        ledger_heads=heads,
        notes=tuple(notes),
    ), cheaters


def _site_order(name: str) -> int:
    """Sites in the summary by the number their name ends with (site-2 before site-10)."""
    tail = name.split("-")[-1]
    return int(tail) if tail.isdigit() else 0
