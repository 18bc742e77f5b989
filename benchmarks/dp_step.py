"""DP-SGD step time against a non-private step on the same model and batch (issue P1).

The fedsilo ``tiny`` model (max_length 48) on a fixed batch of real Rotten Tomatoes
training texts (batch 256, the default expected Poisson batch, and 64). One step is
forward, backward and update; for DP also per-example clipping and Gaussian noise.

Modes:
  non-private  plain SGD (the reference of every ratio)
  hooks        Opacus GradSampleModule + DPOptimizer, built as common/training.py does
  ghost        Opacus ghost clipping (GradSampleModuleFastGradientClipping,
               DPOptimizerFastGradientClipping, DPLossFastGradientClipping): two backwards
  functorch    Opacus GradSampleModule(force_functorch=True) + DPOptimizer
  bookkeeping (fedsilo default)
               common/dp_engine.py, what common/training.py uses: "book-keeping" clipping
               (ghost norms from the one backward's activations and output gradients,
               then the clipped sum as one matmul per layer; autograd computes no
               parameter gradient at all), noise from the secure source
               (common/secure_random.py: ChaCha20, float64 Box-Muller, sum of four)
  bookkeeping, torch noise
               the same engine with torch.normal on a torch.Generator (what it drew
               before issue 12): the cost of the secure noise source alone

Each mode has its own copy of the model. Steps are interleaved (the order rotates every
round) and each figure is the median over rounds after a warm-up, since the machine is
shared. The ratio is median DP step / median non-private step of the same rounds.
After the table: an equivalence check of every mode's clipped update against hooks
(noise 0, clip at the median per-example norm), then the attempts to bring the ratio
down (1 thread, batch 256): frozen LayerNorms (3 fewer hooked modules), a summed loss
(no rescaling of the output gradients), and, in fresh processes, torch's transparent
huge pages for large CPU tensors (THP_MEM_ALLOC_ENABLE=1, read once at startup).

    .venv/bin/python benchmarks/dp_step.py             # everything
    .venv/bin/python benchmarks/dp_step.py --threads 1 --no-attempts   # the 1-thread table only
    .venv/bin/python benchmarks/dp_step.py --compile   # adds torch.compile (slow to compile)
    .venv/bin/python benchmarks/dp_step.py --model minilm-lora   # P1 for DP-LoRA (below)

``--model minilm-lora``: the pretrained MiniLM encoder with rank-8 LoRA adapters and a
linear head (73,728 + 770 trainable of 22.7M parameters), batch 32 (and 8), the modes
non-private, hooks and book-keeping only (its equivalence with Opacus is a unit test,
tests/unit/common/test_lora.py); ``--device cuda`` times it on a GPU
(benchmarks/gpu_check.sh does).

Wall time depends on the machine's load: 6 to 9 minutes were measured at load 7-10 on
2 cores, most of it in the rows with torch's default 2 threads, which other processes
slow down 4-15x (a simulated site gets 1 CPU from Ray).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from common.config import Preset
from common.data import load_builtin
from common.dp_engine import BookkeepingDPSGD
from common.model import LoraClassifier, ModelSpec, TextClassifier, build_model
from common.secure_random import SecureRandom
from common.text import encode

MAX_LENGTH = 48
CLIP = 1.5
SIGMA = 1.0
LR = 1.0
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Step = Callable[[], None]

warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
warnings.filterwarnings("ignore", category=UserWarning, module="opacus")


# --------------------------------------------------------------------------- setup


def real_batch(size: int) -> Batch:
    """``size`` Rotten Tomatoes training texts, drawn with a fixed seed."""
    train = load_builtin("rotten-tomatoes", "train")
    pick = np.random.default_rng(0).choice(len(train.texts), size=size, replace=False)
    enc = encode([train.texts[i] for i in pick], MAX_LENGTH)
    labels = torch.tensor(np.asarray(train.labels)[pick], dtype=torch.long)
    return (
        torch.from_numpy(enc.ids).to(DEVICE),
        torch.from_numpy(enc.mask).to(DEVICE),
        labels.to(DEVICE),
    )


PRESET: Preset = "tiny"  # --model
DEVICE = torch.device("cpu")  # --device


def base_model(scale: float = 0.02) -> TextClassifier | LoraClassifier:
    """The ``tiny`` preset (or ``--model``), its trainable weights nudged off their zero
    initialisation so that every layer has a gradient (a model some rounds into
    training: LoRA's B and the head start at zero)."""
    model = build_model(ModelSpec.preset(PRESET, num_classes=2, max_length=MAX_LENGTH), seed=0)
    assert isinstance(model, TextClassifier | LoraClassifier)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.to(DEVICE).train()


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _freeze_layernorms(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.requires_grad_(False)


# --------------------------------------------------------------------------- modes


def non_private(model: nn.Module, batch: Batch, sigma: float, clip: float = CLIP) -> Step:
    ids, mask, y = batch
    opt = torch.optim.SGD(_trainable(model), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids, mask), y).backward()  # type: ignore[no-untyped-call]
        opt.step()

    return step


def opacus_hooks(
    model: nn.Module,
    batch: Batch,
    sigma: float,
    clip: float = CLIP,
    *,
    functorch: bool = False,
    sum_loss: bool = False,
) -> Step:
    """As common/training.py train_dp builds it (mean loss, expected batch = batch)."""
    ids, mask, y = batch
    reduction = "sum" if sum_loss else "mean"
    gsm = GradSampleModule(
        model, batch_first=True, loss_reduction=reduction, force_functorch=functorch
    )
    # With a summed loss the optimizer does not divide by the expected batch: the
    # learning rate does, so the update is the same.
    lr = LR / len(y) if sum_loss else LR
    opt = DPOptimizer(
        torch.optim.SGD(_trainable(model), lr=lr),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=len(y),
        loss_reduction=reduction,
        generator=torch.Generator(device=DEVICE).manual_seed(0),
    )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(ids, mask), y, reduction=reduction).backward()  # type: ignore[no-untyped-call]
        opt.step()

    return step


def opacus_ghost(model: nn.Module, batch: Batch, sigma: float, clip: float = CLIP) -> Step:
    """What PrivacyEngine.make_private(grad_sample_mode="ghost") assembles."""
    ids, mask, y = batch
    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=clip, use_ghost_clipping=True
    )
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(_trainable(model), lr=LR),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=len(y),
        loss_reduction="mean",
        generator=torch.Generator(device=DEVICE).manual_seed(0),
    )
    criterion = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), "mean")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        criterion(gsm(ids, mask), y).backward()
        opt.step()

    return step


class TorchNoise:
    """torch.normal on a seeded torch.Generator in SecureRandom's place (the old noise)."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def normal(
        self, shape: tuple[int, ...], std: float, *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.normal(0.0, std, shape, generator=self.generator, dtype=dtype).to(device)


def bookkeeping(
    model: nn.Module, batch: Batch, sigma: float, clip: float = CLIP, *, torch_noise: bool = False
) -> Step:
    """common/dp_engine.py, as common/training.py builds it."""
    ids, mask, y = batch
    rng = cast(SecureRandom, TorchNoise()) if torch_noise else SecureRandom(bytes(32))
    engine = BookkeepingDPSGD(
        model,
        clip_norm=clip,
        noise_multiplier=sigma,
        expected_batch=len(y),
        learning_rate=LR,
        rng=rng,
    )

    def step() -> None:
        engine.step(lambda: F.cross_entropy(model(ids, mask), y, reduction="none"))

    return step


def engine_at(rev: str) -> Builder:
    """The book-keeping engine as of a git revision, with torch noise (as it was built
    before issue 12: a ``generator`` argument; after: ``rng``)."""
    import importlib.util
    import tempfile

    source = subprocess.run(
        ["git", "show", f"{rev}:common/dp_engine.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "dp_engine_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("dp_engine_at_rev", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def build(model: nn.Module, batch: Batch, sigma: float, clip: float = CLIP) -> Step:
        ids, mask, y = batch
        kw: dict[str, object] = {
            "clip_norm": clip,
            "noise_multiplier": sigma,
            "expected_batch": len(y),
            "learning_rate": LR,
        }
        try:
            engine = module.BookkeepingDPSGD(model, rng=TorchNoise(), **kw)
        except TypeError:
            engine = module.BookkeepingDPSGD(
                model, generator=torch.Generator(device=DEVICE).manual_seed(0), **kw
            )

        def step() -> None:
            engine.step(lambda: F.cross_entropy(model(ids, mask), y, reduction="none"))

        return step

    return build


BK = "bookkeeping (fedsilo default)"
Builder = Callable[[nn.Module, Batch, float, float], Step]
MODES: dict[str, Builder] = {
    "non-private": non_private,
    "hooks": opacus_hooks,
    "ghost": opacus_ghost,
    "functorch": lambda m, b, s, c: opacus_hooks(m, b, s, c, functorch=True),
    BK: bookkeeping,
    "bookkeeping, torch noise": lambda m, b, s, c: bookkeeping(m, b, s, c, torch_noise=True),
}


# --------------------------------------------------------------------------- timing


def interleaved(steps: dict[str, Step], *, reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each mode: rounds of one step per mode, rotating order."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            steps[name]()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def summarise(
    times: dict[str, list[float]], ref: str = "non-private"
) -> list[tuple[str, float, float, float]]:
    """(mode, median ms, interquartile range ms, ratio to the reference median)."""
    base = statistics.median(times[ref])
    rows = []
    for name, ts in times.items():
        q1, _, q3 = statistics.quantiles(ts, n=4)
        rows.append(
            (name, statistics.median(ts) * 1e3, (q3 - q1) * 1e3, statistics.median(ts) / base)
        )
    return rows


def build_steps(builders: dict[str, Builder], batch: Batch, model: nn.Module) -> dict[str, Step]:
    return {name: make(copy.deepcopy(model), batch, SIGMA, CLIP) for name, make in builders.items()}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# --------------------------------------------------------------------------- checks


def equivalence(batch: Batch) -> None:
    """Every mode's noise-free update equals hooks' (weights large enough that some
    examples are clipped and some are not)."""
    torch.set_num_threads(1)
    model = base_model(scale=0.1)
    m = copy.deepcopy(model)
    norms = BookkeepingDPSGD(
        m,
        clip_norm=1.0,
        noise_multiplier=0.0,
        expected_batch=1,
        learning_rate=LR,
        rng=SecureRandom(bytes(32)),
    ).clipped_sum(lambda: F.cross_entropy(m(*batch[:2]), batch[2], reduction="none"))[1]
    clip = float(norms.median())  # half of the examples clipped, half not
    updates = {}
    for name, make in MODES.items():
        m = copy.deepcopy(model)
        before = {k: v.clone() for k, v in m.trainable_state().items()}
        make(m, batch, 0.0, clip)()
        after = dict(m.named_parameters())
        updates[name] = torch.cat([(after[k].detach() - v).flatten() for k, v in before.items()])
    ref = updates["hooks"]
    scale = float(ref.abs().max())
    print(
        f"\nEquivalence, batch {len(batch[2])}, noise 0: {int((norms > clip).sum())} of "
        f"{len(norms)} examples clipped (norms {float(norms.min()):.2f}-{float(norms.max()):.2f}, "
        f"clip {clip:.2f}); max |update - hooks update| / max |hooks update|:"
    )
    for name, u in updates.items():
        if name not in ("hooks", "non-private"):
            print(f"  {name:<29} {float((u - ref).abs().max()) / scale:.1e}")
    # and the per-example norms, against autograd one example at a time
    worst = 0.0
    for i in range(8):
        m = copy.deepcopy(model)
        ids, mask, y = (t[i : i + 1] for t in batch)
        F.cross_entropy(m(ids, mask), y).backward()  # type: ignore[no-untyped-call]
        own = torch.cat([p.grad.flatten() for p in _trainable(m) if p.grad is not None]).norm()
        worst = max(worst, abs(float(own) - float(norms[i])) / float(own))
    print(
        f"  bookkeeping per-example norms vs autograd (8 examples): max relative error {worst:.1e}"
    )


# --------------------------------------------------------------------------- attempts


def attempts(batch: Batch, reps: int, warmup: int) -> None:
    torch.set_num_threads(1)
    model = base_model()
    ln_frozen = copy.deepcopy(model)
    _freeze_layernorms(ln_frozen)
    gsm = GradSampleModule(copy.deepcopy(model), batch_first=True)
    hooked = sorted(
        {n.rsplit(".", 1)[0] for n, p in gsm._module.named_parameters() if p.requires_grad}
    )
    print(
        f"\nOpacus hooks {len(gsm.autograd_grad_sample_hooks)} hooks on {len(hooked)} modules with "
        f"trainable parameters; the frozen embedding 'embed' hooked: {'embed' in hooked}"
    )
    gsm._close()
    steps = build_steps(
        {
            "non-private": non_private,
            "hooks": opacus_hooks,
            "hooks, sum loss": lambda m, b, s, c: opacus_hooks(m, b, s, c, sum_loss=True),
            BK: bookkeeping,
        },
        batch,
        model,
    )
    steps |= build_steps(
        {
            "non-private, LNs frozen": non_private,
            "hooks, LNs frozen": opacus_hooks,
            "bookkeeping, LNs frozen": bookkeeping,
        },
        batch,
        ln_frozen,
    )
    times = interleaved(steps, reps=reps, warmup=warmup)
    print(f"\nAttempts, 1 thread, batch {len(batch[2])}, median of {reps} (load {load()}):")
    print(f"{'variant':<29} {'ms/step':>8} {'IQR':>6} {'x non-private':>14}")
    base = statistics.median(times["non-private"])
    base_ln = statistics.median(times["non-private, LNs frozen"])
    for name, ms, iqr, ratio in summarise(times):
        if "LNs frozen" in name:  # against the non-private step of the same model
            ratio = ratio * base / base_ln
        print(f"{name:<29} {ms:8.1f} {iqr:6.1f} {ratio:13.2f}x")


def thp_child(reps: int, warmup: int) -> None:
    """Run in a fresh process, so that THP_MEM_ALLOC_ENABLE is read at startup."""
    torch.set_num_threads(1)
    steps = build_steps(
        {k: MODES[k] for k in ("non-private", "hooks", BK)},
        real_batch(256),
        base_model(),
    )
    print(json.dumps(summarise(interleaved(steps, reps=reps, warmup=warmup))))


def thp_attempt(reps: int, warmup: int) -> None:
    """Each large CPU tensor (per-example gradients) is fresh memory from the kernel,
    page-faulted 4 KiB at a time; torch can ask for 2 MiB transparent huge pages."""
    print(
        f"\nTransparent huge pages for torch's CPU allocations, 1 thread, batch 256, {reps} steps:"
    )
    for env in ("0", "1"):
        out = subprocess.run(
            [sys.executable, __file__, "--thp-child", "--reps", str(reps), "--warmup", str(warmup)],
            env={**os.environ, "THP_MEM_ALLOC_ENABLE": env},
            capture_output=True,
            text=True,
            check=True,
        )
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        cells = "  ".join(f"{n} {ms:.0f} ms {r:.2f}x" for n, ms, _, r in rows)
        print(f"  THP_MEM_ALLOC_ENABLE={env}: {cells}  (load {load()})")


def compile_attempt(batch: Batch, reps: int, warmup: int) -> None:
    """torch.compile of the whole model (non-private) and of the encoder blocks under
    Opacus hooks (the hooked Linear/LayerNorm modules sit inside them)."""
    torch.set_num_threads(1)
    model = base_model()
    assert isinstance(model, TextClassifier)
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward)  # type: ignore[method-assign]
    hooked = copy.deepcopy(model)
    steps = {
        "non-private": non_private(copy.deepcopy(model), batch, SIGMA),
        "non-private, compiled": non_private(compiled, batch, SIGMA),
        "hooks": opacus_hooks(copy.deepcopy(model), batch, SIGMA),
        "hooks, compiled blocks": opacus_hooks(hooked, batch, SIGMA),
    }
    for layer in hooked.layers:
        layer.forward = torch.compile(layer.forward)
    t0 = time.perf_counter()
    for step in steps.values():
        step()
    print(
        f"\ntorch.compile, 1 thread, batch {len(batch[2])} (first steps incl. compiling: {time.perf_counter() - t0:.0f} s):"
    )
    for name, ms, iqr, ratio in summarise(interleaved(steps, reps=reps, warmup=warmup)):
        print(f"{name:<29} {ms:8.1f} {iqr:6.1f} {ratio:13.2f}x")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=20, help="timed rounds per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attempt-reps", type=int, default=10, help="timed rounds per attempt")
    ap.add_argument(
        "--threads", default="1,default", help="thread counts to time (default: 1 and torch's)"
    )
    ap.add_argument("--no-attempts", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument(
        "--against",
        metavar="REV",
        help="also time common/dp_engine.py as of git revision REV (torch noise), to tell "
        "a change of the code from a change of the machine",
    )
    ap.add_argument("--model", choices=("tiny", "minilm-lora"), default="tiny")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--thp-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.thp_child:
        thp_child(a.reps, a.warmup)
        return
    global PRESET, DEVICE
    PRESET = "minilm-lora" if a.model == "minilm-lora" else "tiny"
    DEVICE = torch.device(a.device)
    lora = a.model == "minilm-lora"
    started = time.perf_counter()
    default_threads = torch.get_num_threads()
    print(
        f"{os.cpu_count()} cores, torch {torch.__version__}, model {a.model} on {DEVICE}, "
        f"load average {load()} (1/5/15 min)"
    )
    sizes = (32, 8) if lora and DEVICE.type == "cpu" else (256, 64)
    big = real_batch(sizes[0])
    batches: dict[int, Batch] = {n: (big[0][:n], big[1][:n], big[2][:n]) for n in sizes}
    model = base_model()
    rows = []
    modes = {k: MODES[k] for k in ("non-private", "hooks", BK)} if lora else dict(MODES)
    if a.against:
        modes[f"bookkeeping @{a.against[:8]}"] = engine_at(a.against)
    counts = [default_threads if t == "default" else int(t) for t in a.threads.split(",")]
    for threads in counts:
        torch.set_num_threads(threads)
        for size, batch in batches.items():
            times = interleaved(build_steps(modes, batch, model), reps=a.reps, warmup=a.warmup)
            rows += [(threads, size, *r) for r in summarise(times)]
            print(
                f"  measured {threads} thread(s), batch {size}: "
                f"{time.perf_counter() - started:.0f} s so far (load {load()})",
                flush=True,
            )
    print(
        f"\nP1 DP-SGD step / plain step, median of {a.reps} interleaved rounds after {a.warmup} warm-up:"
    )
    print(
        f"P1 {'threads':>7} {'batch':>5}  {'mode':<29} {'ms/step':>8} {'IQR':>6} {'x non-private':>14}"
    )
    for threads, size, name, ms, iqr, ratio in rows:
        print(f"P1 {threads:>7} {size:>5}  {name:<29} {ms:8.1f} {iqr:6.1f} {ratio:13.2f}x")
    if lora:  # equivalence with Opacus: tests/unit/common/test_lora.py
        print(f"\n{time.perf_counter() - started:.0f} s in all, load average {load()}")
        return
    equivalence(batches[64])
    if not a.no_attempts:
        attempts(big, reps=a.attempt_reps, warmup=a.warmup)
        thp_attempt(reps=8, warmup=a.warmup)
    if a.compile:
        compile_attempt(big, reps=a.attempt_reps, warmup=a.warmup)
    print(
        f"\n{os.cpu_count()} cores, load average {load()}; {time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
