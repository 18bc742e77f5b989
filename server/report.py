"""What the coordinator shows while a run goes: a header, one table row per round with a
progress bar, and a site table at the end. What it writes is common/outputs.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.config import RunConfig
from common.evaluation import eval_rounds, evaluation_modes
from common.outputs import SUMMARY_FILE, PrivateEval, RoundRecord, RunSummary
from common.task import Task, run_task

MAX_SITE_ROWS = 20  # the site table on screen; summary.json has them all


def round_progress(console: Console, total: int) -> tuple[Progress | None, Any]:
    """A transient rounds bar on a terminal (started), else none."""
    if not console.is_terminal:
        return None, None
    progress = Progress(
        TextColumn("rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    progress.start()
    return progress, progress.add_task("rounds", total=total)


class Reporter:
    """Prints a header, one table row per round with a progress bar, and a summary."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._progress: Progress | None = None
        self._task: Any = None
        self._dp = True

    def start(self, cfg: RunConfig, *, num_params: int, task: Task | None = None) -> None:
        self._dp = cfg.dp
        task = task or run_task(cfg)
        privacy = (
            f"DP-SGD per site: run epsilon {cfg.epsilon:g}, delta {cfg.delta:g}, clip "
            f"{cfg.clip_norm:g}; privacy unit: one row of a site's data"
            if cfg.dp
            else "[bold red]NO DIFFERENTIAL PRIVACY (baseline): sites' updates are not private[/]"
        )
        self.console.print(
            f"[bold]fedsilo[/] task {task.name} ({len(task.labels)} labels) on {cfg.dataset}, "
            f"split {cfg.partition}, {cfg.num_server_rounds} rounds, "
            f"model {task.model_preset} ({num_params:,} trainable parameters), "
            f"server optimizer {cfg.server_optimizer}"
        )
        self.console.print(privacy)
        central, federated = evaluation_modes(cfg, task)
        if federated:
            self.console.print(
                f"private federated evaluation after rounds {list(eval_rounds(cfg))}: each "
                f"site's confusion matrix on its held-out share, "
                + (
                    f"Gaussian noise for evaluation epsilon {cfg.eval_epsilon:g} per site"
                    if cfg.eval_noise
                    else "[bold red]WITHOUT NOISE (simulation option): no privacy[/]"
                )
                + ("" if central else "; no public test set, so no central accuracy")
            )
        aggregation = (
            f"secure aggregation (SecAgg+, {cfg.secagg_bits}-bit updates, clip "
            f"{cfg.update_clip_norm:g}): the coordinator sees only the sum"
            if cfg.secure_aggregation
            else "[bold yellow]plain aggregation: the coordinator sees every site's update[/]"
        )
        self.console.print(aggregation)
        self.console.print(
            f"{'round':>5}  {'acc':>6}  {'loss':>6}  {'eps max':>7}  {'sites':>5}  {'time':>6}  "
            f"{'KiB/site':>8}  note",
            style="bold",
        )
        self._progress, self._task = round_progress(self.console, cfg.num_server_rounds)

    def round(self, row: RoundRecord) -> None:
        eps = row.epsilon_max
        eps_text = f"{eps:7.3f}" if eps is not None else ("    n/a" if self._dp else "  no-DP")
        note = (
            row.reason
            if row.status != "ok"
            else "; ".join(f"{n.site} {n.status}: {n.reason}" for n in row.notes)
        )
        style = "red" if row.status != "ok" else None
        kib = row.upload_kib
        kib_text = f"{kib:8.1f}" if kib is not None else f"{'-':>8}"
        self.console.print(
            f"{row.round:>5}  {_fmt(row.accuracy, 4):>6}  {_fmt(row.loss, 4):>6}  {eps_text}  "
            f"{row.trained:>2}/{row.sites_asked:<2}  {row.seconds:5.1f}s  {kib_text}  {note}",
            style=style,
            highlight=False,
        )
        if row.private_eval is not None:
            self.private_eval(row.round, row.private_eval)
        if self._progress is not None:
            self._progress.advance(self._task)

    def finish(self, summary: RunSummary, out_dir: Path) -> None:
        if self._progress is not None:
            self._progress.stop()
        shown = summary.sites[:MAX_SITE_ROWS]
        more = len(summary.sites) - len(shown)
        caption = f"... and {more} more sites in {SUMMARY_FILE}" if more else None
        table = Table(title="sites", caption=caption, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0))
        # eps: this run's (PRV); life: the lifetime filter's, of the lifetime budget
        for col in (
            "site",
            "n",
            "sigma",
            "q",
            "steps",
            "eps",
            "life",
            "budget",
            "ok",
            "ref",
            "fail",
        ):
            table.add_column(col, justify="right")
        for s in shown:
            table.add_row(
                s.site,
                str(s.num_examples) if s.num_examples else "-",  # declared public size
                _fmt(s.noise_multiplier, 3),
                _fmt(s.sample_rate, 3),
                str(s.steps),
                _fmt(s.epsilon, 3) if s.epsilon is not None else "no-DP",
                _fmt(s.lifetime_epsilon, 2),
                _fmt(s.budget, 2),
                str(s.rounds_trained),
                str(s.rounds_refused),
                str(s.rounds_failed),
            )
        self.console.print(table)
        final = summary.final
        scores = (
            f"final accuracy {_fmt(final.accuracy, 4)}"
            + (" (private federated evaluation)" if final.source == "federated" else "")
            + (f", macro-F1 {final.macro_f1:.4f}" if final.macro_f1 is not None else "")
            + (f" (noise std {final.noise_std:.2f} per count)" if final.noise_std else "")
        )
        self.console.print(
            f"[bold]{scores}[/] after {final.rounds_completed} "
            f"successful rounds; max site run epsilon {_fmt(final.epsilon_max, 3)}"
            f"{'' if summary.dp else ' (NO DP)'}; outputs in {out_dir}"
        )

    def private_eval(self, rnd: int, ev: PrivateEval) -> None:
        """The private evaluation of a round: its scores, per class, and its noise."""
        noise = (
            f"noise std {ev.noise_std:.2f} per count of the sum"
            if ev.noise
            else "[bold red]NO NOISE (simulation option): exact counts, no privacy[/]"
        )
        self.console.print(
            f"      private evaluation after round {rnd}: accuracy {ev.accuracy:.4f}, "
            f"macro-F1 {ev.macro_f1:.4f} (always the majority class: "
            f"{ev.majority_macro_f1:.4f}) over {len(ev.sites)} sites; {noise}",
            highlight=False,
        )
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0))
        for col in ("label", "precision", "recall", "F1", "support"):
            table.add_column(col, justify="right")
        for c in ev.classes:
            table.add_row(
                c.label, f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.f1:.3f}", str(c.support)
            )
        self.console.print(table)
        for n in ev.notes:
            self.console.print(
                f"      {n.site} {n.status}: {n.reason}", style="yellow", highlight=False
            )


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
