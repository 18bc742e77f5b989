"""``fedsilo simulate --mode central``: the ceiling for the federated, private result.

The same model (``model_spec(cfg, ...)``, ``build_model(seed=cfg.seed)``) trained on the
pooled training split that the simulation partitions among its sites, without DP,
clipping, secure aggregation or sites, for the same number of example passes:
``num-server-rounds * local-epochs`` epochs over the pooled data (what the federation
does when every site trains every round), evaluated on the same public test split
after each round's worth of epochs.

The optimiser is Adam (no clipping, no noise, no weight decay) on minibatches of
``batch-size`` from a fresh permutation every epoch. Plain SGD was tried first, as the
sites use it; on the pooled data (seed 0, 90/10 split of the training split, 20
epochs, held-out accuracy) it is no usable ceiling: lr 0.3 underfits (0.66), lr 1.0
swings between 0.63 and 0.74 from one epoch to the next (0.70 at the end), lr 3.0
turns NaN in the first epoch. Adam learns steadily (0.75-0.76 held out after 20 epochs
for rates 1e-4 to 1e-3; see DEFAULT_LEARNING_RATES).

The learning rate is chosen honestly: each candidate trains the full schedule on 90%
of the training split and is scored on the held-out 10% (never on the test split); a
candidate whose loss turns non-finite counts as diverged. The winner is then trained
on the whole training split. The candidates run in parallel processes, one thread
each (on a shared 2-core machine two torch threads per process cost 4x the CPU time
per batch of one). The choice and every candidate's score are in ``summary.json``
under ``central``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from common.config import ConfigError, RunConfig
from common.data import TextDataset, load_builtin
from common.features import PUBLIC_CACHE, batchable
from common.model import build_model, model_spec
from common.outputs import (
    CENTRAL_MODE,
    Candidate,
    CentralRecord,
    RoundRecord,
    RunSummary,
    Selection,
    final_record,
    write_run_files,
)
from common.task import run_task
from common.training import default_device, evaluate
from server.report import round_progress
from simulations.pooled_training import (
    HOLDOUT_FRACTION,
    choose_learning_rate,
    make_optimizer,
    train_epoch,
)

# Adam, measured on seed 0's held-out part after 20 epochs: 3e-5 0.728 (underfits),
# 1e-4 0.765, 3e-4 0.755, 1e-3 0.750 and 3e-3 0.721 (held-out loss rising: overfits);
# after 5 epochs 1e-3 wins (0.754 against 0.740 for 3e-4), so the grid keeps it.
DEFAULT_OPTIMIZER = "adam"
DEFAULT_LEARNING_RATES: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
# Run-config keys central training does not use: privacy, secure aggregation, the
# federation and its server optimizer, the split among sites, the sites' own SGD rate.
IGNORED_KEYS: frozenset[str] = frozenset(
    {
        "dp",
        "epsilon",
        "delta",
        "clip-norm",
        "secure-aggregation",
        "secagg-bits",
        "secagg-threshold",
        "secagg-degree",
        "update-clip-norm",
        "weighting",
        "max-site-weight",
        "server-optimizer",
        "server-learning-rate",
        "server-momentum",
        "server-ema",
        "fraction-train",
        "min-sites",
        "round-timeout",
        "partition",
        "dirichlet-alpha",
        "min-partition-size",
        "text-column",
        "label-column",
        "learning-rate",
        "sites-dir",
        "num-sites",
    }
)


class CentralReporter:
    """The federated reporter's style: a header, one line per round, a final line."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._progress: Progress | None = None
        self._task: Any = None

    def start(self, cfg: RunConfig, *, num_params: int, num_train: int, epochs: int) -> None:
        self.console.print(
            f"[bold]fedsilo central[/] {cfg.dataset}, {num_train:,} pooled training examples, "
            f"{cfg.num_server_rounds} rounds x {cfg.local_epochs} epoch(s) = {epochs} epochs, "
            f"model {run_task(cfg).model_preset} ({num_params:,} trainable parameters)",
            soft_wrap=True,
        )
        self.console.print(
            "[bold red]NO DIFFERENTIAL PRIVACY, no sites, no secure aggregation (the ceiling): "
            "non-private training on the pooled data[/]",
            soft_wrap=True,
        )

    def selecting(
        self, optimizer: str, learning_rates: Sequence[float], num_fit: int, num_val: int
    ) -> None:
        rates = ", ".join(f"{lr:g}" for lr in learning_rates)
        self.console.print(
            f"choosing the {optimizer} learning rate among {rates}: full schedule on {num_fit:,} "
            f"training examples, scored on {num_val:,} held out from the training split",
            soft_wrap=True,
        )

    def candidate(self, result: dict[str, Any]) -> None:
        if result["diverged"]:
            text = "diverged (non-finite loss)"
        else:
            text = f"held-out acc {result['val_accuracy']:.4f}  loss {result['val_loss']:.4f}"
        self.console.print(
            f"  lr {result['learning_rate']:<5g} {text}  ({result['seconds']:.1f}s)",
            highlight=False,
        )

    def training(self, optimizer: str, learning_rate: float, rounds: int) -> None:
        self.console.print(
            f"training on the whole training split with {optimizer}, lr {learning_rate:g}"
        )
        self.console.print(
            f"{'round':>5}  {'acc':>6}  {'loss':>6}  {'train':>6}  {'time':>6}", style="bold"
        )
        self._progress, self._task = round_progress(self.console, rounds)

    def round(self, row: RoundRecord) -> None:
        self.console.print(
            f"{row.round:>5}  {row.accuracy:6.4f}  {row.loss:6.4f}  {row.train_loss:6.4f}  "
            f"{row.seconds:5.1f}s",
            highlight=False,
        )
        if self._progress is not None:
            self._progress.advance(self._task)

    def finish(self, summary: RunSummary, out_dir: Path) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        central = summary.central
        assert central is not None  # a central run's summary always has it
        self.console.print(
            f"[bold]final accuracy {summary.final.accuracy:.4f}[/] after "
            f"{central.epochs} epochs on the pooled data (central, NO DP, "
            f"{central.optimizer} lr {central.learning_rate:g}); outputs in {out_dir}",
            soft_wrap=True,
        )


def default_out_dir() -> Path:
    return Path("runs") / (datetime.now().strftime("%Y%m%d-%H%M%S") + "-central")


def central_config(options: Mapping[str, Any]) -> tuple[RunConfig, list[str]]:
    """The run config for a central run from simulate's options, and the keys given
    there that central training ignores (sorted)."""
    overrides = {k: v for k, v in options.items() if k != "num-sites"}
    cfg = RunConfig().with_overrides(overrides)  # validates every key, used or not
    return cfg, sorted(k for k in options if k in IGNORED_KEYS)


def run_central(options: Mapping[str, Any], console: Console | None = None) -> RunSummary:
    """``fedsilo simulate --mode central``: say what is ignored, then train."""
    console = console or Console()
    cfg, ignored = central_config(options)
    if ignored:
        console.print(
            f"central mode: no DP, no secure aggregation, no sites; ignoring {', '.join(ignored)}",
            highlight=False,
            soft_wrap=True,
        )
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir()
    return train_central(cfg, out_dir, CentralReporter(console))


def _subsample(data: TextDataset, max_examples: int | None, seed: int) -> TextDataset:
    if max_examples is None or max_examples >= len(data):
        return data
    if max_examples < 1:
        raise ValueError(f"max_train must be at least 1, got {max_examples}")
    chosen = np.random.default_rng(seed).permutation(len(data))[:max_examples]
    return data.subset(np.sort(chosen))


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Intra-op threads for the duration (torch's setting is process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_central(
    cfg: RunConfig,
    out_dir: Path,
    reporter: CentralReporter | None = None,
    *,
    max_train: int | None = None,
    optimizer: str = DEFAULT_OPTIMIZER,
    learning_rates: Sequence[float] | None = None,
    workers: int | None = None,
) -> RunSummary:
    """Train centrally without DP; writes summary.json, accuracy.png, epsilon.png (empty:
    no DP) and model/ like a federated run, and returns the summary.

    ``max_train`` keeps a seeded random subset of the training split (for tests);
    ``learning_rates`` are the candidates (one: used as it is, no selection);
    ``workers``: candidates trained in parallel processes (default: one per CPU core,
    one on a GPU)."""
    reporter = reporter or CentralReporter()
    rates = tuple(learning_rates) if learning_rates is not None else DEFAULT_LEARNING_RATES
    if not rates or any(not (math.isfinite(lr) and lr > 0) for lr in rates):
        raise ValueError(f"learning rates must be positive finite numbers, got {rates}")
    device = default_device()
    if workers is None:
        workers = 1 if device.type == "cuda" else max(1, os.cpu_count() or 1)
    with _threads(1 if device.type == "cpu" else torch.get_num_threads()):
        return _train_central(cfg, out_dir, reporter, max_train, optimizer, rates, workers, device)


def _train_central(
    cfg: RunConfig,
    out_dir: Path,
    reporter: CentralReporter,
    max_train: int | None,
    optimizer_name: str,
    rates: tuple[float, ...],
    workers: int,
    device: torch.device,
) -> RunSummary:
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not cfg.bundled:
        raise ConfigError(
            "--mode central runs on the bundled data sets; on data of your own, a central "
            "run would pool every site's rows, which this simulation does not yet do"
        )
    task = run_task(cfg)
    train_set = _subsample(load_builtin(cfg.dataset, "train", seed=cfg.seed), max_train, cfg.seed)
    test_set = load_builtin(cfg.dataset, "test", seed=cfg.seed)
    label_names = test_set.label_names
    spec = model_spec(task)
    train, test = (
        batchable(
            part.texts,
            part.labels,
            max_length=task.max_length,
            preset=task.model_preset,
            cache=PUBLIC_CACHE,
        )
        for part in (train_set, test_set)
    )
    model = build_model(spec, seed=cfg.seed).to(device)
    epochs = cfg.num_server_rounds * cfg.local_epochs
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    reporter.start(cfg, num_params=num_params, num_train=len(train), epochs=epochs)

    candidates: list[dict[str, Any]] = []
    if len(rates) == 1:
        learning_rate = rates[0]
    else:
        n_val = max(1, round(len(train) * HOLDOUT_FRACTION))
        reporter.selecting(optimizer_name, rates, len(train) - n_val, n_val)
        learning_rate, candidates = choose_learning_rate(
            cfg,
            train,
            len(label_names),
            rates,
            optimizer=optimizer_name,
            device=device,
            workers=workers,
            on_candidate=reporter.candidate,
        )

    optimizer = make_optimizer(optimizer_name, model, learning_rate)
    generator = torch.Generator().manual_seed(cfg.seed)
    reporter.training(optimizer_name, learning_rate, cfg.num_server_rounds)
    rows: list[RoundRecord] = []
    for rnd in range(1, cfg.num_server_rounds + 1):
        round_started = time.monotonic()
        losses = [
            train_epoch(
                model,
                optimizer,
                train,
                batch_size=cfg.batch_size,
                generator=generator,
                device=device,
            )
            for _ in range(cfg.local_epochs)
        ]
        if any(math.isnan(v) for v in losses):
            raise RuntimeError(
                f"central training diverged in round {rnd} at lr {learning_rate:g} "
                "(non-finite loss); try other learning rates"
            )
        result = evaluate(model, test, device=device)
        row = RoundRecord(
            round=rnd,
            accuracy=result.accuracy,
            loss=result.loss,
            seconds=time.monotonic() - round_started,
            train_loss=losses[-1],
        )
        reporter.round(row)
        rows.append(row)

    central = CentralRecord(
        optimizer=optimizer_name,
        learning_rate=learning_rate,
        batch_size=cfg.batch_size,
        epochs=epochs,
        epochs_per_round=cfg.local_epochs,
        train_examples=len(train),
        test_examples=len(test),
        max_train=max_train,
        selection=Selection(
            candidates=tuple(Candidate(**c) for c in candidates),
            holdout_fraction=HOLDOUT_FRACTION if candidates else None,
            criterion="held-out accuracy (part of the training split, never the test split)"
            if candidates
            else "a single learning rate given: no selection",
        ),
        wall_seconds=time.monotonic() - started,
        note=(
            "the same model on the pooled training split, no DP, no clipping, "
            "num-server-rounds x local-epochs passes over the data; the final iterate "
            "is evaluated (no EMA). Plain SGD is no usable ceiling here (lr 0.3 "
            "underfits, lr 1 oscillates, lr 3 diverges: see simulations/central.py)"
        ),
    )
    summary = RunSummary(
        dp=False,
        mode=CENTRAL_MODE,
        config=cfg.to_user_config(),
        rounds=tuple(rows),
        sites=(),
        final=final_record(tuple(rows), ()),
        central=central,
    )
    weights = {k: v.detach().cpu() for k, v in model.trainable_state().items()}
    write_run_files(out_dir, summary, weights, spec, label_names)
    reporter.finish(summary, out_dir)
    return summary
