"""The plots every run leaves: test accuracy per round, and each site's run epsilon
against the run's target (lifetime spend is the auditor's: ``fedsilo audit report
--plot``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.outputs import PrivateEval, RunSummary


def plot_run(out_dir: Path, summary: RunSummary) -> None:
    """``accuracy.png`` and ``epsilon.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = summary.rounds
    fig, ax = plt.subplots(figsize=(6, 4))
    central = [(r.round, r.accuracy) for r in rounds if r.accuracy is not None]
    private = [(r.round, r.private_eval) for r in rounds if r.private_eval is not None]
    if central:
        ax.plot(*zip(*central, strict=True), marker="o", ms=3, label="public test set")
    if private:
        xs = [x for x, _ in private]
        ax.errorbar(
            xs,
            [p.accuracy for _, p in private],
            yerr=[_accuracy_noise(p) for _, p in private],
            marker="s",
            ms=4,
            capsize=3,
            label="private federated evaluation (+- 1 noise std)",
        )
        ax.plot(xs, [p.macro_f1 for _, p in private], marker="^", ms=4, ls=":", label="macro-F1")
    if private:
        ax.legend(fontsize=7)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    kind = f"REHEARSAL, {summary.mode}" if summary.rehearsal else summary.mode
    ax.set_title(f"{summary.config.get('dataset')} ({kind})")
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


def _accuracy_noise(private: PrivateEval) -> float:
    """About one standard deviation of a noisy accuracy: the diagonal's noise over the
    total (whose own noise is second order)."""
    k = len(private.counts)
    total = max(1, sum(sum(row) for row in private.counts))
    return float(private.noise_std * k**0.5 / total)
