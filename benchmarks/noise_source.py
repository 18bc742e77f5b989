"""What one DP-SGD step's randomness costs: torch.Generator against common/secure_random.py.

For the fedsilo ``tiny`` model's trainable parameters (17 tensors, 139,138 numbers):

  noise   the Gaussian noise of one step, one call per parameter tensor as
          common/dp_engine.py draws it: (a) torch.normal on a torch.Generator (float32),
          (b) SecureRandom.normal; then, for reference, SecureRandom.normal in one flat
          call over all 139,138 numbers, and Opacus's secure_mode recipe (four
          torch.normal draws summed, halved) on a torch.Generator
  poisson (c) the Poisson sampling of 1,700 examples: torch.rand(...) < q on a
          torch.Generator against SecureRandom.bernoulli

Each round times every variant once, in a rotating order; the figures are medians over
rounds after a warm-up, with the interquartile range, 1 thread by default.

    .venv/bin/python benchmarks/noise_source.py [--reps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from common.model import ModelSpec, build_model
from common.secure_random import SecureRandom

EXAMPLES = 1_700
SAMPLE_RATE = 0.15
STD = 1.5


def shapes() -> list[torch.Size]:
    model = build_model(ModelSpec.preset("tiny", num_classes=2, max_length=48), seed=0)
    return [p.shape for p in model.parameters() if p.requires_grad]


def variants(sizes: list[torch.Size]) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    sec = SecureRandom.fresh()
    total = sum(s.numel() for s in sizes)

    def opacus_secure() -> list[torch.Tensor]:
        out = []
        for s in sizes:
            acc = torch.zeros(s)
            for _ in range(4):
                acc += torch.normal(0.0, STD, s, generator=gen)
            out.append(acc / 2)
        return out

    return {
        "noise (a) torch.normal, per tensor": lambda: [
            torch.normal(0.0, STD, s, generator=gen) for s in sizes
        ],
        "noise (b) SecureRandom, per tensor": lambda: [sec.normal(s, STD) for s in sizes],
        "noise SecureRandom, one flat call": lambda: sec.normal((total,), STD).split(  # type: ignore[no-untyped-call]
            [s.numel() for s in sizes]
        ),
        "noise Opacus secure_mode recipe": opacus_secure,
        "poisson (c) torch.rand < q": lambda: torch.rand(EXAMPLES, generator=gen) < SAMPLE_RATE,
        "poisson (c) SecureRandom": lambda: sec.bernoulli(EXAMPLES, SAMPLE_RATE),
    }


def interleaved(
    steps: dict[str, Callable[[], object]], reps: int, warmup: int
) -> dict[str, list[float]]:
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            steps[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sizes = shapes()
    total = sum(s.numel() for s in sizes)
    times = interleaved(variants(sizes), a.reps, a.warmup)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{len(sizes)} tensors, {total:,} numbers; {EXAMPLES} examples at q = {SAMPLE_RATE}; "
        f"{a.threads} thread(s), median of {a.reps} rounds (load {load}), torch {torch.__version__}"
    )
    print(f"{'variant':<38} {'ms':>8} {'IQR':>7} {'x (a) or torch.rand':>20}")
    for name, ts in times.items():
        q1, _, q3 = statistics.quantiles(ts, n=4)
        ref = med["poisson (c) torch.rand < q" if name.startswith("poisson") else next(iter(med))]
        print(f"{name:<38} {med[name] * 1e3:8.3f} {(q3 - q1) * 1e3:7.3f} {med[name] / ref:19.1f}x")


if __name__ == "__main__":
    main()
