"""The sweep's numbers, without running anything: the epsilon list, each run's options,
the table (mean, spread over seeds, gap to central), ``sweep.json`` and the plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from common.config import ConfigError

SWEEP_VERSION = 1
NO_DP_LABEL = "inf (no DP)"
# Keys the sweep sets for every run, whatever the scenario says.
SWEEP_KEYS = ("seed", "dp", "epsilon", "out-dir", "sites-dir")


def parse_epsilons(text: str) -> list[float]:
    """``"1,2,4,8,inf"`` -> sorted epsilons, ``math.inf`` (no DP) last; every bad item
    is a ConfigError naming it."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip():
        raise ConfigError("--epsilon is empty; give a list such as 1,2,4,8,inf")
    values: list[float] = []
    for item in items:
        if item.lower() in ("inf", "infinity", "∞"):
            value = math.inf
        else:
            try:
                value = float(item)
            except ValueError:
                raise ConfigError(
                    f"--epsilon: {item!r} is not a number (give e.g. 1,2,4,8,inf)"
                ) from None
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"--epsilon: {item!r} is not a positive finite number (inf means no DP)"
                )
        if value in values:
            raise ConfigError(f"--epsilon: {item!r} is given twice")
        values.append(value)
    return sorted(values)


def epsilon_label(epsilon: float) -> str:
    return NO_DP_LABEL if math.isinf(epsilon) else f"{epsilon:g}"


def epsilon_dirname(epsilon: float) -> str:
    return "eps-inf" if math.isinf(epsilon) else f"eps-{epsilon:g}"


def run_options(
    base: Mapping[str, Any], epsilon: float, seed: int, run_dir: Path
) -> dict[str, Any]:
    """One federated run's options: the scenario's, with the sweep's own keys set."""
    options = {k: v for k, v in base.items() if k not in SWEEP_KEYS}
    options.update({"seed": seed, "out-dir": str(run_dir), "sites-dir": ""})
    if math.isinf(epsilon):
        options["dp"] = False
    else:
        options.update({"dp": True, "epsilon": epsilon})
    return options


def central_options(base: Mapping[str, Any], seed: int, run_dir: Path) -> dict[str, Any]:
    options = {k: v for k, v in base.items() if k not in SWEEP_KEYS}
    options.update({"seed": seed, "out-dir": str(run_dir)})
    return options


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values)."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class RunResult:
    """One finished (or failed) run of the sweep."""

    kind: str  # "federated" or "central"
    epsilon: float | None  # math.inf: federated without DP; None: central
    seed: int
    run_dir: str
    accuracy: float | None = None
    seconds: float = 0.0
    error: str | None = None
    learning_rate: float | None = None  # central: the rate it chose

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.epsilon is not None:
            out["dp"] = not math.isinf(self.epsilon)
            out["epsilon"] = None if math.isinf(self.epsilon) else self.epsilon
            out["label"] = epsilon_label(self.epsilon)
        return out


@dataclass
class SweepRow:
    epsilon: float
    accuracies: list[float]
    seeds: list[int]
    failed: int
    mean: float | None
    std: float | None
    gap_points: float | None  # central - federated, accuracy points, paired by seed

    @property
    def label(self) -> str:
        return epsilon_label(self.epsilon)

    def to_json(self) -> dict[str, Any]:
        return {
            "epsilon": None if math.isinf(self.epsilon) else self.epsilon,
            "dp": not math.isinf(self.epsilon),
            "label": self.label,
            "accuracies": self.accuracies,
            "seeds": self.seeds,
            "failed": self.failed,
            "mean": self.mean,
            "std": self.std,
            "gap_to_central_points": self.gap_points,
        }


def summarize(
    epsilons: Sequence[float], runs: Sequence[RunResult], central: Sequence[RunResult]
) -> list[SweepRow]:
    """One row per epsilon from the finished runs (failed ones are counted, not used)."""
    central_by_seed = {r.seed: r.accuracy for r in central if r.accuracy is not None}
    rows = []
    for eps in epsilons:
        mine = [r for r in runs if r.kind == "federated" and r.epsilon == eps]
        done = sorted((r for r in mine if r.accuracy is not None), key=lambda r: r.seed)
        accs = [float(r.accuracy) for r in done if r.accuracy is not None]
        mean, std = mean_std(accs)
        paired = [
            central_by_seed[r.seed] - r.accuracy
            for r in done
            if r.seed in central_by_seed and r.accuracy is not None
        ]
        gap = 100 * statistics.fmean(paired) if paired else None
        rows.append(
            SweepRow(
                epsilon=eps,
                accuracies=accs,
                seeds=[r.seed for r in done],
                failed=len(mine) - len(done),
                mean=mean,
                std=std,
                gap_points=gap,
            )
        )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_table(rows: Sequence[SweepRow], central: Sequence[RunResult]) -> Table:
    central_accs = [r.accuracy for r in central if r.accuracy is not None]
    c_mean, c_std = mean_std(central_accs)
    table = Table(title="privacy against utility (test accuracy; std over seeds)")
    for col in ("epsilon", "runs", "accuracy", "± std", "gap to central (points)"):
        table.add_column(col, justify="right")
    for row in rows:
        runs = f"{len(row.accuracies)}" + (f" ({row.failed} failed)" if row.failed else "")
        table.add_row(
            row.label,
            runs,
            _fmt(row.mean, ".4f"),
            _fmt(row.std, ".4f"),
            _fmt(row.gap_points, "+.2f"),
        )
    failed = sum(r.accuracy is None for r in central)
    table.add_row(
        "central, no DP",
        f"{len(central_accs)}" + (f" ({failed} failed)" if failed else ""),
        _fmt(c_mean, ".4f"),
        _fmt(c_std, ".4f"),
        "0" if c_mean is not None else "-",
        style="bold",
    )
    return table


def plot_privacy_utility(
    rows: Sequence[SweepRow], central: Sequence[RunResult], path: Path, title: str = ""
) -> None:
    """Accuracy against epsilon (log x), error bars over seeds; no DP at the right end
    with its own marker; central as a horizontal line (band: its std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in rows if not math.isinf(r.epsilon) and r.mean is not None]
    no_dp = [r for r in rows if math.isinf(r.epsilon) and r.mean is not None]
    finite_eps = [r.epsilon for r in rows if not math.isinf(r.epsilon)]
    hi = max(finite_eps) if finite_eps else 1.0
    lo = min(finite_eps) if finite_eps else 1.0
    x_inf = hi * 4 if finite_eps else 1.0  # two octaves right of the largest epsilon

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if finite:
        ax.errorbar(
            [r.epsilon for r in finite],
            [r.mean or 0.0 for r in finite],  # None was filtered out above
            yerr=[r.std or 0.0 for r in finite],
            marker="o",
            capsize=4,
            label="federated, DP (epsilon per site)",
        )
    for r in no_dp:
        ax.errorbar(
            [x_inf],
            [r.mean or 0.0],
            yerr=[r.std or 0.0],
            marker="*",
            ms=14,
            capsize=4,
            color="tab:red",
            ls="none",
            label="federated, no DP",
        )
    central_accs = [r.accuracy for r in central if r.accuracy is not None]
    c_mean, c_std = mean_std(central_accs)
    if c_mean is not None:
        ax.axhline(c_mean, color="black", ls="--", lw=1, label="central, no DP (pooled data)")
        if c_std:
            ax.axhspan(c_mean - c_std, c_mean + c_std, color="black", alpha=0.08)
    ax.set_xscale("log")
    ticks = [*finite_eps, *([x_inf] if any(math.isinf(r.epsilon) for r in rows) else [])]
    labels = [
        *(f"{e:g}" for e in finite_eps),
        *(["∞\n(no DP)"] if len(ticks) > len(finite_eps) else []),
    ]
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)
    ax.minorticks_off()
    ax.set_xlim(lo / 1.6, max(x_inf, hi) * 1.6)
    ax.set_xlabel("epsilon per site (delta fixed)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "privacy against utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_record(
    *,
    scenario: str | None,
    options: Mapping[str, Any],
    epsilons: Sequence[float],
    seeds: int,
    runs: Sequence[RunResult],
    central: Sequence[RunResult],
    wall_seconds: float,
    complete: bool,
) -> dict[str, Any]:
    rows = summarize(epsilons, runs, central)
    c_mean, c_std = mean_std([r.accuracy for r in central if r.accuracy is not None])
    return {
        "version": SWEEP_VERSION,
        "complete": complete,
        "scenario": scenario,
        "options": dict(options),
        "epsilons": [None if math.isinf(e) else e for e in epsilons],
        "seeds": list(range(seeds)),
        "rows": [r.to_json() for r in rows],
        "runs": [r.to_json() for r in runs],
        "central": [r.to_json() for r in central],
        "central_mean": c_mean,
        "central_std": c_std,
        "wall_seconds": wall_seconds,
        "notes": [
            "epsilon null = federated without DP (dp = false)",
            "seed changes the train/test split, the split among sites and the model's "
            "initialisation, not only the DP noise",
            "std: sample standard deviation over seeds (null with one seed)",
            "gap_to_central_points: mean over seeds of (central - federated) x 100",
        ],
    }
