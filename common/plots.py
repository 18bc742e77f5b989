"""The plots every run leaves: test accuracy per round, and each site's run epsilon
against the run's target (lifetime spend is the auditor's: ``fedsilo audit report
--plot``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.outputs import RunSummary


def plot_run(out_dir: Path, summary: RunSummary) -> None:
    """``accuracy.png`` and ``epsilon.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = summary.rounds
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r.round for r in rounds], [r.accuracy for r in rounds], marker="o", ms=3)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{summary.config.get('dataset')} ({summary.mode})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    names = sorted({s for r in rounds for s in r.epsilon_per_site})
    for name in names:
        pts = [(r.round, r.epsilon_per_site[name]) for r in rounds if name in r.epsilon_per_site]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=name)
    if names:
        ax.axhline(summary.run_config.epsilon, color="red", ls="--", lw=1, label="run target")
    ax.set_xlabel("round")
    ax.set_ylabel("run epsilon (PRV accountant, the run's fixed plan)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("privacy spent per site" if names else "no differential privacy in this run")
    if 0 < len(names) <= 12:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "epsilon.png", dpi=120)
    plt.close(fig)
