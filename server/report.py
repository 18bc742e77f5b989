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
from common.outputs import SUMMARY_FILE, PreflightRow, PrivateEval, RoundRecord, RunSummary
from common.task import Task, run_task

MAX_SITE_ROWS = 20  # the site table on screen; summary.json has them all
WAITING_EVERY = 15.0  # seconds between "still waiting" lines of one exchange
REHEARSAL = (
    "[bold magenta]REHEARSAL[/]: every site trains on public stand-in data, not its own; "
    "no budget is spent and no result says anything about the sites' data"
)


def exchange_label(group: str) -> str:
    """A message group in words: ``3/advertise`` is round 3's advertise stage, ``3``
    its training, ``3/evaluation`` the evaluation after it."""
    if group == "preflight":
        return "pre-flight"
    rnd, _, stage = group.partition("/")
    return f"round {rnd} {stage.replace('/', ' ') or 'train'}"


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

    def __init__(self, console: Console | None = None, *, deployed: bool = False) -> None:
        self.console = console or Console()
        self.deployed = deployed
        self._progress: Progress | None = None
        self._task: Any = None
        self._dp = True
        self._rehearsal = False
        self._waited: dict[str, float] = {}

    def start(self, cfg: RunConfig, *, num_params: int, task: Task | None = None) -> None:
        self._dp = cfg.dp
        self._rehearsal = cfg.rehearsal
        task = task or run_task(cfg)
        privacy = (
            f"DP-SGD per site: run epsilon {cfg.epsilon:g}, delta {cfg.delta:g}, clip "
            f"{cfg.clip_norm:g}; privacy unit: one row of a site's data"
            if cfg.dp
            else "[bold red]NO DIFFERENTIAL PRIVACY (baseline): sites' updates are not private[/]"
        )
        # A deployed run's data is the sites' own: no data set, split or sites folder.
        data = "at the sites" if self.deployed else f"on {cfg.dataset}, split {cfg.partition}"
        self.console.print(
            f"[bold]fedsilo[/] task {task.name} ({len(task.labels)} labels) {data}, "
            f"{cfg.num_server_rounds} rounds, "
            f"model {task.model_preset} ({num_params:,} trainable parameters), "
            f"server optimizer {cfg.server_optimizer}"
        )
        if cfg.rehearsal:
            self.console.print(REHEARSAL)
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
        self._progress, self._task = round_progress(self.console, cfg.num_server_rounds)

    def preflight(self, rows: tuple[PreflightRow, ...], *, rehearsal: bool = False) -> None:
        """Each site's answer to the pre-flight: what the plan would cost it, what its
        lifetime budget leaves, or why it refuses (nothing was trained or spent)."""
        head = (
            "pre-flight (what a real run of this plan would cost; the rehearsal spends nothing)"
            if rehearsal
            else "pre-flight: what this run will cost each site (nothing is spent yet)"
        )
        self.console.print(head, style="bold", highlight=False)
        accepting = [r for r in rows if r.status == "ok"]
        hidden = accepting[MAX_SITE_ROWS:]  # every refusal is shown, and the first accepting
        skip = {id(r) for r in hidden}
        for r in rows:
            if id(r) in skip:
                continue
            if r.status == "ok":
                self.console.print(
                    f"      {r.site}: run epsilon {_fmt(r.epsilon, 3)} (sigma "
                    f"{_fmt(r.noise_multiplier, 3)}, {r.steps} steps); lifetime "
                    f"{_fmt(r.spent, 3)} -> {_fmt(r.after, 3)} of {_fmt(r.budget, 3)}"
                    f" (reserve {_fmt(r.reserve, 3)})",
                    highlight=False,
                )
            else:
                style = "yellow" if rehearsal else "red"
                self.console.print(
                    f"      {r.site} {r.status.upper()}: {r.reason}", style=style, highlight=False
                )
        if hidden:
            self.console.print(
                f"      ... and {len(hidden)} more sites accept ({SUMMARY_FILE}: preflight)",
                highlight=False,
            )

    def stopped(self, reason: str) -> None:
        self.console.print(f"[bold red]{reason}[/]", highlight=False)

    def exchange(self, group: str, answered: int, asked: int, seconds: float, done: bool) -> None:
        """One exchange with the sites as it happens (server/app.py ``GridTransport``): on
        a terminal, the bar's caption; in a deployed run's log, a line per exchange and
        one every ``WAITING_EVERY`` seconds while sites are slow to answer."""
        label = exchange_label(group)
        if self._progress is not None:
            self._progress.update(
                self._task, description=f"{label}: {answered}/{asked} sites, {seconds:.0f} s"
            )
        if done:
            self._waited.pop(group, None)
            if self.deployed:
                self.console.print(
                    f"      {label}: {answered}/{asked} sites answered in {seconds:.1f} s",
                    highlight=False,
                )
            return
        last = self._waited.get(group, 0.0)
        if seconds - last >= WAITING_EVERY:
            self._waited[group] = seconds
            self.console.print(
                f"      {label}: {answered}/{asked} sites answered, waiting ({seconds:.0f} s)",
                highlight=False,
            )

    def round_header(self) -> None:
        self.console.print(
            f"{'round':>5}  {'acc':>6}  {'loss':>6}  {'eps max':>7}  {'sites':>5}  {'time':>6}  "
            f"{'KiB/site':>8}  note",
            style="bold",
        )

    def round(self, row: RoundRecord) -> None:
        eps = row.epsilon_max
        eps_text = f"{eps:7.3f}" if eps is not None else ("    n/a" if self._dp else "  no-DP")
        notes = [f"{n.site} {n.status}: {n.reason}" for n in row.notes]
        note = "; ".join([row.reason, *notes] if row.status != "ok" else notes)
        if self._rehearsal:
            note = f"REHEARSAL {note}".strip()
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
        if not summary.rounds:  # stopped before its first round (the pre-flight)
            self.console.print(f"no round ran; outputs in {out_dir.resolve()}", highlight=False)
            return
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
                _fmt(s.lifetime_epsilon, 3),  # 7.996 of 8 must not read as 8.00
                _fmt(s.budget, 3),
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
        label = (
            "[bold magenta]REHEARSAL[/] (public stand-in data, nothing spent): "
            if (summary.rehearsal)
            else ""
        )
        self.console.print(
            f"{label}[bold]{scores}[/] after {final.rounds_completed} "
            f"successful rounds; max site run epsilon {_fmt(final.epsilon_max, 3)}"
            f"{'' if summary.dp else ' (NO DP)'}; outputs in {out_dir.resolve()}"
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
