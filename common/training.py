"""Local training and evaluation in plain torch (no Flower here).

DP-SGD is fed by Poisson sampling that we draw ourselves from a passed-in
cryptographically secure source (common/secure_random.py, a keyed ChaCha20 stream; tests
fix its key): each example joins each step independently with probability
``sample_rate``, which is what the accountant assumes; the noise comes from the same
source, with either engine. Two engines clip, sum and add Gaussian noise, with the
same update: "bookkeeping" (default, common/dp_engine.py: one backward, no
per-example gradient tensors of the big layers) and "opacus" (Opacus's per-sample
gradient hooks and DPOptimizer; any layer Opacus supports).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from common.dp_engine import BookkeepingDPSGD, SparseRows, draw_noise
from common.secure_random import SecureRandom
from common.text import Encoded

Engine = Literal["bookkeeping", "opacus"]


def default_device() -> torch.device:
    """CUDA when there is one, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def full_fp32(device: torch.device) -> Iterator[None]:
    """DP training runs in float32 with exact float32 matmuls on a GPU too: autocast off,
    and TF32 (10-bit mantissa, which torch or the process may have switched on for
    speed) off for the duration, through torch's fp32_precision settings, read back,
    and restored on exit. Per-example norms decide the clipping that the sensitivity
    rests on; in TF32 or half precision they are off by about 1e-3, so a clipped
    gradient could exceed the clip norm the accountant assumes. (The environment
    variable TORCH_ALLOW_TF32_CUBLAS_OVERRIDE overrides every setting: do not set it.)"""
    if device.type != "cuda":
        yield
        return
    knobs: tuple[Any, ...] = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "ieee"
        if any(k.fp32_precision != "ieee" for k in knobs):
            raise RuntimeError("could not switch TF32 off for DP training on the GPU")
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        for k, value in zip(knobs, saved, strict=True):
            k.fp32_precision = value


@dataclass(frozen=True)
class Batchable:
    """A site's tokenized examples as tensors."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_encoded(cls, enc: Encoded, labels: object) -> Batchable:
        y = torch.tensor(np.asarray(labels), dtype=torch.long)  # a copy: inputs may be read-only
        if y.shape != (len(enc),):
            raise ValueError(f"{len(enc)} texts but labels of shape {tuple(y.shape)}")
        return cls(torch.from_numpy(enc.ids), torch.from_numpy(enc.mask), y)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> Batchable:
        return Batchable(self.ids.to(device), self.mask.to(device), self.labels.to(device))


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(num_examples / batch_size))


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson rate giving ``batch_size`` expected examples (Opacus's 1/len(loader))."""
    return 1.0 / batches_per_epoch(num_examples, batch_size)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    examples_seen: int


def train_dp(
    model: nn.Module,
    data: Batchable,
    *,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    clip_norm: float,
    learning_rate: float,
    rng: SecureRandom,
    device: torch.device,
    engine: Engine = "bookkeeping",
    expected_batch: int | None = None,
    canaries: SparseRows | None = None,
) -> TrainResult:
    """``steps`` DP-SGD steps with plain SGD; the mechanism is exactly
    SubsampledGaussianEvent(noise_multiplier, sample_rate, steps) with either engine.

    ``noise_multiplier=0`` is the no-DP baseline: the same per-example clipping and
    sampling, no noise (unclipped SGD with these settings flipped between classes
    here), so the gap to it is the cost of the noise alone.

    ``expected_batch`` divides the noisy sum (default: ``sample_rate * len(data)``); a
    site passes the one of its declared public size, so nothing depends on its count.

    ``canaries`` (the local empirical audit only, simulations/empirical_audit.py): extra
    examples with given gradients, at random places among the data in the Poisson draw
    (one shuffle from the secure source, so no sampler bug that depends on the place
    spares them), picked by the same sampler and clipped by the engine with the rest."""
    model.to(device).train()
    data = data.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    rates = step_sizes(model, learning_rate)
    if expected_batch is None:
        expected_batch = max(1, round(sample_rate * len(data)))
    if engine not in ("bookkeeping", "opacus"):
        raise ValueError(f"unknown DP engine {engine!r}; choose 'bookkeeping' or 'opacus'")
    stepper = _bookkeeping_steps if engine == "bookkeeping" else _opacus_steps
    settings = _Settings(noise_multiplier, clip_norm, expected_batch, rates, rng)
    seen, n = 0, len(data)
    population, order = n, None
    if canaries is not None:
        canaries = canaries.to(device)
        population += len(canaries)
        order = torch.argsort(rng.uniform(population))  # who sits at each place
    with full_fp32(device), stepper(model, params, data, settings) as dp_step:
        for _ in range(steps):
            chosen = rng.bernoulli(population, sample_rate).nonzero().squeeze(1)
            if order is not None:
                chosen = order[chosen]
            idx = chosen[chosen < n].to(device)
            rows = canaries.take(chosen[chosen >= n] - n) if canaries is not None else None
            if idx.numel() == 0 and (rows is None or len(rows) == 0):
                _noise_only_step(params, noise_multiplier * clip_norm / expected_batch, rates, rng)
                continue
            dp_step(idx, rows)
            seen += int(idx.numel())
    return TrainResult(steps=steps, examples_seen=seen)


def step_sizes(model: nn.Module, learning_rate: float) -> list[float]:
    """Each trainable parameter's SGD step, in the model's order: the run's learning rate
    times the model's own factor for it (``learning_rate_factor(name)``, if the model
    has one: DP-LoRA's adapters step more finely than its head). A step size is applied
    to the released noisy gradient: post-processing, no bearing on privacy."""
    factor = getattr(model, "learning_rate_factor", None)
    return [
        learning_rate * (float(factor(name)) if factor is not None else 1.0)
        for name, p in model.named_parameters()
        if p.requires_grad
    ]


@dataclass(frozen=True)
class _Settings:
    noise_multiplier: float
    clip_norm: float
    expected_batch: int
    learning_rates: list[float]
    rng: SecureRandom


class SecureNoiseDPOptimizer(DPOptimizer):  # type: ignore[misc]
    """Opacus's DPOptimizer with its noise from the site's secure source (Opacus's own
    ``secure_mode`` needs torchcsprng, which torch 2.13 lacks): the same draw as the
    book-keeping engine's, in the same parameter order; and an example with a
    non-finite per-sample gradient counts as not sampled."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, rng: SecureRandom, **kw: float) -> None:
        super().__init__(optimizer, **kw)
        self.rng = rng

    def clip_and_accumulate(self) -> None:
        """Opacus's clipping, after zeroing the per-sample gradients of every example
        that has a non-finite one: it counts as not sampled (clip factor 0), as in the
        book-keeping engine, instead of turning the whole update into NaN."""
        samples = self.grad_samples
        if samples and len(samples[0]):
            device = samples[0].device
            finite = torch.stack(
                [torch.isfinite(g.reshape(len(g), -1)).all(1).to(device) for g in samples]
            ).all(0)
            if not bool(finite.all()):
                for g in samples:
                    g[~finite.to(g.device)] = 0.0
        super().clip_and_accumulate()

    def add_noise(self) -> None:
        sums = [p.summed_grad for p in self.params]
        for s in sums:
            _check_processed_flag(s)
        noises = draw_noise(self.rng, sums, self.noise_multiplier * self.max_grad_norm)
        for p, s, noise in zip(self.params, sums, noises, strict=True):
            p.grad = (s + noise).view_as(p)
            _mark_as_processed(s)


# A DP step on the data's examples ``idx`` and the given rows (audit canaries).
Stepper = Iterator[Callable[[torch.Tensor, SparseRows | None], None]]


@contextmanager
def _opacus_steps(
    model: nn.Module, params: list[nn.Parameter], data: Batchable, s: _Settings
) -> Stepper:
    """Opacus hooks and DPOptimizer; yields a DP step on the examples ``idx``."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = SecureNoiseDPOptimizer(
        torch.optim.SGD(
            [{"params": [p], "lr": lr} for p, lr in zip(params, s.learning_rates, strict=True)]
        ),
        rng=s.rng,
        noise_multiplier=s.noise_multiplier,
        max_grad_norm=s.clip_norm,
        expected_batch_size=s.expected_batch,
    )

    def step(idx: torch.Tensor, rows: SparseRows | None) -> None:
        optimizer.zero_grad(set_to_none=True)
        if idx.numel():
            logits = gsm(data.ids[idx], data.mask[idx])
            F.cross_entropy(logits, data.labels[idx]).backward()  # type: ignore[no-untyped-call]
        if rows is not None and len(rows):  # more per-sample rows, clipped by Opacus
            for p, dense in zip(params, rows.dense(params), strict=True):
                before = p.grad_sample if idx.numel() else dense[:0]  # type: ignore[attr-defined]
                p.grad_sample = torch.cat([before, dense])  # type: ignore[attr-defined]
        optimizer.step()

    try:
        with warnings.catch_warnings():
            # The frozen embedding feeds no input that requires grad: torch notes that
            # the full backward hook fires on outputs; Opacus's per-sample grads are right.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield step
    finally:
        optimizer.zero_grad(set_to_none=True)
        gsm._close()


@contextmanager
def _bookkeeping_steps(
    model: nn.Module, params: list[nn.Parameter], data: Batchable, s: _Settings
) -> Stepper:
    """common/dp_engine.py; yields a DP step on the examples ``idx``."""
    engine = BookkeepingDPSGD(
        model,
        clip_norm=s.clip_norm,
        noise_multiplier=s.noise_multiplier,
        expected_batch=s.expected_batch,
        learning_rate=s.learning_rates,
        rng=s.rng,
    )

    def step(idx: torch.Tensor, rows: SparseRows | None) -> None:
        engine.step(
            (
                lambda: F.cross_entropy(
                    model(data.ids[idx], data.mask[idx]), data.labels[idx], reduction="none"
                )
            )
            if idx.numel()
            else None,
            rows,
        )

    yield step


@torch.no_grad()
def _noise_only_step(
    params: Sequence[torch.Tensor], std: float, rates: Sequence[float], rng: SecureRandom
) -> None:
    """An empty Poisson batch still releases noise: the sum of no gradients plus the
    Gaussian noise, exactly the step the accountant counts (skipping it would reveal
    that the batch was empty)."""
    for p, noise, lr in zip(params, draw_noise(rng, params, std), rates, strict=True):
        p.add_(noise, alpha=-lr)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Batchable, *, device: torch.device, batch_size: int = 1024
) -> EvalResult:
    model.to(device).eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        ids = data.ids[start : start + batch_size].to(device)
        mask = data.mask[start : start + batch_size].to(device)
        y = data.labels[start : start + batch_size].to(device)
        logits = model(ids, mask)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = max(1, len(data))
    return EvalResult(loss=total_loss / n, accuracy=correct / n, num_examples=len(data))


def trainable_delta(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """new - global, per trainable tensor, on the CPU."""
    return {k: (after[k].detach().cpu() - before[k].detach().cpu()) for k in before}
