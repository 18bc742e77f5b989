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
folder; ``privacy_utility.png`` plots accuracy against epsilon (the numbers and the
plot: simulations/sweep_results.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.config import ConfigError
from common.outputs import RunSummary
from simulations.sweep_results import (
    SWEEP_KEYS,
    RunResult,
    central_options,
    epsilon_dirname,
    epsilon_label,
    plot_privacy_utility,
    results_table,
    run_options,
    summarize,
    sweep_record,
)

SimulateFn = Callable[[Mapping[str, Any]], RunSummary]
CentralFn = Callable[[Mapping[str, Any]], RunSummary]


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
