"""``fedsilo sweep``: privacy against utility, over epsilons and seeds.

For every epsilon (``inf`` = the labelled no-DP federated baseline, ``dp = false``)
and seed 0..seeds-1 the real federated simulation runs (``simulations.runner.simulate``)
into ``OUT/eps-<e>/seed-<s>``; the same model is trained centrally on the pooled data,
without DP, once per seed into ``OUT/central/seed-<s>`` (the ceiling). The run-config
key ``seed`` also changes the train/test split, the split among sites and the model's
initialisation, so the spread over seeds covers all of those, not only the DP noise.

The table gives per epsilon the mean test accuracy, its standard deviation over seeds
(sample std; ``-`` with one seed) and the gap to central in accuracy points: the mean
over seeds of (central - federated) for the same seed, which equals central mean -
federated mean when every run finished. ``sweep.json`` keeps every run's accuracy and
folder; ``privacy_utility.png`` plots accuracy against epsilon.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.config import ConfigError
from common.outputs import RunSummary

SWEEP_VERSION = 1
NO_DP_LABEL = "inf (no DP)"
# Keys the sweep sets for every run, whatever the scenario says.
SWEEP_KEYS = ("seed", "dp", "epsilon", "out-dir", "sites-dir")

SimulateFn = Callable[[Mapping[str, Any]], RunSummary]
CentralFn = Callable[[Mapping[str, Any]], RunSummary]


# ---- pure parts -------------------------------------------------------------------


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


# ---- running ------------------------------------------------------------------------


@contextlib.contextmanager
def _captured(path: Path) -> Iterator[None]:
    """Send everything a run prints (its own table, Ray's and Flower's logs, child
    processes) to ``path``: at the file-descriptor level when stdout has one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as log:
        try:
            fds = (sys.stdout.fileno(), sys.stderr.fileno())
        except (AttributeError, io.UnsupportedOperation, ValueError):
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(fd) for fd in fds]
        try:
            for fd in fds:
                os.dup2(log.fileno(), fd)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip(fds, saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


def _own_stdout() -> TextIO:
    """A handle on the real stdout that survives the per-run redirection."""
    try:
        return os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    except (AttributeError, io.UnsupportedOperation, ValueError):
        return sys.stdout


def _default_simulate(options: Mapping[str, Any]) -> RunSummary:
    from simulations.runner import simulate

    return simulate(options)


def _default_central(options: Mapping[str, Any]) -> RunSummary:
    from simulations.central import central_config, train_central

    cfg, _ = central_config(options)
    return train_central(cfg, Path(cfg.out_dir))


def default_out_dir() -> Path:
    return Path("runs") / ("sweep-" + datetime.now().strftime("%Y%m%d-%H%M%S"))


def validate(base: Mapping[str, Any], epsilons: Sequence[float], seeds: int) -> None:
    """Every run's config is checked before the first one starts."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if not epsilons:
        raise ConfigError("--epsilon is empty; give a list such as 1,2,4,8,inf")
    from simulations.runner import check_options

    for eps in epsilons:
        check_options(run_options(base, eps, 0, Path("x")))


def run_sweep(
    scenario_options: Mapping[str, Any],
    epsilons: Sequence[float],
    seeds: int,
    out_dir: Path,
    *,
    scenario: str | None = None,
    console: Console | None = None,
    simulate_fn: SimulateFn | None = None,
    central_fn: CentralFn | None = None,
) -> dict[str, Any]:
    """Run the sweep; returns what it writes to ``out_dir/sweep.json``."""
    epsilons = sorted(epsilons)
    validate(scenario_options, epsilons, seeds)
    simulate_fn = simulate_fn or _default_simulate
    central_fn = central_fn or _default_central
    own = _own_stdout() if console is None else None
    console = console or Console(file=own)
    out_dir.mkdir(parents=True, exist_ok=True)
    overridden = sorted(k for k in scenario_options if k in SWEEP_KEYS)
    total = seeds * (len(epsilons) + 1)
    console.print(
        f"[bold]fedsilo sweep[/] {scenario or 'defaults'}: epsilon "
        f"{', '.join(epsilon_label(e) for e in epsilons)}; seeds 0..{seeds - 1}; "
        f"{total} runs ({seeds * len(epsilons)} federated + {seeds} central); outputs in {out_dir}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        "the seed also changes the train/test split, the split among sites and the model's "
        "initialisation" + (f"; the sweep sets {', '.join(overridden)}" if overridden else ""),
        highlight=False,
        soft_wrap=True,
    )
    plan: list[RunResult] = [
        RunResult("central", None, s, str(out_dir / "central" / f"seed-{s}")) for s in range(seeds)
    ] + [
        RunResult("federated", eps, s, str(out_dir / epsilon_dirname(eps) / f"seed-{s}"))
        for eps in epsilons
        for s in range(seeds)
    ]
    started = time.monotonic()
    progress = None
    if console.is_terminal:
        progress = Progress(
            TextColumn("sweep"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        progress.start()
    task = progress.add_task("", total=total) if progress is not None else None

    finished: list[RunResult] = []

    def record(complete: bool) -> dict[str, Any]:
        return sweep_record(
            scenario=scenario,
            options=scenario_options,
            epsilons=epsilons,
            seeds=seeds,
            runs=[r for r in finished if r.kind == "federated"],
            central=[r for r in finished if r.kind == "central"],
            wall_seconds=time.monotonic() - started,
            complete=complete,
        )

    try:
        for result in plan:
            name = (
                "central" if result.epsilon is None else f"epsilon {epsilon_label(result.epsilon)}"
            )
            if progress is not None and task is not None:
                progress.update(task, description=f"{name}, seed {result.seed}")
            run_dir = Path(result.run_dir)
            if result.epsilon is None:
                options = central_options(scenario_options, result.seed, run_dir)
                fn = central_fn
            else:
                options = run_options(scenario_options, result.epsilon, result.seed, run_dir)
                fn = simulate_fn
            run_started = time.monotonic()
            try:
                with _captured(run_dir / "log.txt"):
                    summary = fn(options)
                result.accuracy = summary.final.accuracy
                if summary.central is not None:
                    result.learning_rate = summary.central.learning_rate
            except Exception as err:  # noqa: BLE001 - one failed run must not lose the sweep
                result.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            result.seconds = time.monotonic() - run_started
            outcome = (
                f"acc {result.accuracy:.4f}"
                if result.accuracy is not None
                else f"[red]FAILED {escape(result.error or '')}[/] (log: {run_dir / 'log.txt'})"
            )
            console.print(
                f"{name:>20}  seed {result.seed}  {outcome}  {result.seconds:6.1f}s  {run_dir}",
                highlight=False,
                soft_wrap=True,
            )
            finished.append(result)
            if progress is not None and task is not None:
                progress.advance(task)
            (out_dir / "sweep.json").write_text(json.dumps(record(False), indent=2))
    finally:
        if progress is not None:
            progress.stop()
        if own is not None and own is not sys.stdout:
            own.flush()

    final = record(True)
    (out_dir / "sweep.json").write_text(json.dumps(final, indent=2))
    central = [r for r in plan if r.kind == "central"]
    rows = summarize(epsilons, [r for r in plan if r.kind == "federated"], central)
    title = f"{scenario or 'defaults'}: test accuracy against epsilon ({seeds} seed{'s' if seeds > 1 else ''})"
    plot_privacy_utility(rows, central, out_dir / "privacy_utility.png", title=title)
    console.print(results_table(rows, central))
    console.print(
        f"sweep.json and privacy_utility.png in {out_dir} "
        f"({time.monotonic() - started:.0f}s in all)",
        highlight=False,
        soft_wrap=True,
    )
    if own is not None and own is not sys.stdout:
        own.close()
    return final
