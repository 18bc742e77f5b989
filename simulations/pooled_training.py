"""Plain (non-private) minibatch training on pooled data, and the honest choice of its
learning rate: each candidate trains the full schedule on 90% of the training split
and is scored on the held-out 10% (never on the test split); a candidate whose loss
turns non-finite counts as diverged. simulations/central.py uses both for the ceiling.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import RunConfig
from common.model import build_model, model_spec
from common.task import run_task
from common.training import Batchable, evaluate

HOLDOUT_FRACTION = 0.1


def _split_holdout(data: Batchable, fraction: float, seed: int) -> tuple[Batchable, Batchable]:
    """A seeded random (fit, held-out) split of the training examples."""
    n = len(data)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"{n} training examples are too few to hold {fraction:.0%} out")
    perm = torch.from_numpy(np.random.default_rng(seed + 1).permutation(n))
    val, fit = perm[:n_val], perm[n_val:]

    def take(idx: torch.Tensor) -> Batchable:
        return Batchable(data.ids[idx], data.mask[idx], data.labels[idx])

    return take(fit), take(val)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Batchable,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> float:
    """One pass of plain minibatch SGD in a fresh order; the mean training loss
    (NaN as soon as a loss is non-finite: the caller treats that as divergence)."""
    model.train()
    perm = torch.randperm(len(data), generator=generator)
    total, seen = 0.0, 0
    for start in range(0, len(data), batch_size):
        idx = perm[start : start + batch_size]
        ids, mask, y = (t[idx].to(device) for t in (data.ids, data.mask, data.labels))
        loss = F.cross_entropy(model(ids, mask), y)
        if not torch.isfinite(loss):
            return math.nan
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
    return total / max(1, seen)


def make_optimizer(name: str, model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate)
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate)
    raise ValueError(f"unknown central optimizer {name!r}; choose 'sgd' or 'adam'")


def score_candidate(
    cfg: RunConfig,
    fit: Batchable,
    val: Batchable,
    num_classes: int,
    optimizer: str,
    learning_rate: float,
    device: torch.device,
) -> dict[str, Any]:
    """The full schedule on ``fit`` at one rate, scored on ``val``."""
    started = time.monotonic()
    model = build_model(model_spec(run_task(cfg)), seed=cfg.seed).to(device)
    opt = make_optimizer(optimizer, model, learning_rate)
    generator = torch.Generator().manual_seed(cfg.seed)
    diverged = False
    for _ in range(cfg.num_server_rounds * cfg.local_epochs):
        loss = train_epoch(
            model, opt, fit, batch_size=cfg.batch_size, generator=generator, device=device
        )
        if math.isnan(loss):
            diverged = True
            break
    result: dict[str, Any] = {"learning_rate": learning_rate, "diverged": diverged}
    scored = None if diverged else evaluate(model, val, device=device)
    if scored is None or not math.isfinite(scored.loss):
        result.update(diverged=True, val_accuracy=None, val_loss=None)
    else:
        result.update(val_accuracy=scored.accuracy, val_loss=scored.loss)
    result["seconds"] = time.monotonic() - started
    return result


def _score_in_child(payload: dict[str, Any]) -> dict[str, Any]:
    """``score_candidate`` in a worker process (one thread, like a simulated site)."""
    torch.set_num_threads(1)

    def tensors(arrays: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Batchable:
        ids, mask, labels = (torch.from_numpy(a) for a in arrays)
        return Batchable(ids, mask, labels)

    return score_candidate(
        RunConfig.from_user_config(payload["config"]),
        tensors(payload["fit"]),
        tensors(payload["val"]),
        payload["num_classes"],
        payload["optimizer"],
        payload["learning_rate"],
        torch.device("cpu"),
    )


def choose_learning_rate(
    cfg: RunConfig,
    data: Batchable,
    num_classes: int,
    learning_rates: Sequence[float],
    *,
    optimizer: str = "adam",
    device: torch.device,
    workers: int = 1,
    on_candidate: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Train each candidate for the full schedule on the fit part of ``data`` and score
    it on the held-out part; the best held-out accuracy wins (then the lower loss, then
    the smaller rate). ``workers`` > 1 trains candidates in parallel processes."""
    fit, val = _split_holdout(data, HOLDOUT_FRACTION, cfg.seed)
    results: list[dict[str, Any]] = []
    if workers <= 1 or len(learning_rates) == 1:
        for lr in learning_rates:
            results.append(score_candidate(cfg, fit, val, num_classes, optimizer, lr, device))
            if on_candidate is not None:
                on_candidate(results[-1])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        def arrays(b: Batchable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return (b.ids.cpu().numpy(), b.mask.cpu().numpy(), b.labels.cpu().numpy())

        base = {
            "config": cfg.to_user_config(),
            "fit": arrays(fit),
            "val": arrays(val),
            "num_classes": num_classes,
            "optimizer": optimizer,
        }
        with ProcessPoolExecutor(
            max_workers=min(workers, len(learning_rates)),
            mp_context=multiprocessing.get_context("spawn"),
        ) as pool:
            futures = [
                pool.submit(_score_in_child, {**base, "learning_rate": lr}) for lr in learning_rates
            ]
            for future in futures:  # in the order of the rates
                results.append(future.result())
                if on_candidate is not None:
                    on_candidate(results[-1])
    usable = [r for r in results if not r["diverged"]]
    if not usable:
        raise RuntimeError(
            "central training diverged at every learning rate tried "
            f"({', '.join(f'{lr:g}' for lr in learning_rates)})"
        )
    best = min(usable, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["learning_rate"]))
    return float(best["learning_rate"]), results
