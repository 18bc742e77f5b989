"""DP-LoRA on the pretrained encoder (issue 15, minilm-lora): the book-keeping engine
gives every adapter and head parameter its per-example clipped gradient (against
per-example autograd, one example at a time) and its noise; the frozen base gets
neither; and a few DP steps on a small task lower the loss (Opacus issue 820's silent
failure was LoRA that did not learn while epsilon looked normal); and Opacus's hooks
give the same update (the cross-check)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from common.features import LORA_STEP
from common.model import LoraClassifier, ModelSpec, build_model
from common.secure_random import SecureRandom
from common.text import encode
from common.training import Batchable, Engine, train_dp
from tests.unit.common.test_dp_engine import (
    _batch,
    _check_clipped_sum,
    _engine,
    _losses,
    _max_diff,
    _naive,
    _opacus_update,
)

LORA = ModelSpec.preset("minilm-lora", num_classes=3, max_length=12)


def _lora(scale: float = 0.05) -> LoraClassifier:
    model = build_model(LORA, seed=0)
    assert isinstance(model, LoraClassifier)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B and the head off zero: every adapter has a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def test_only_adapters_and_head_train_and_travel() -> None:
    model = _lora()
    names = list(model.trainable_state())
    assert len(names) == 2 * 2 * 6 + 2  # A and B of query and value in 6 blocks, head
    assert all(".lora_A." in n or ".lora_B." in n or n.startswith("head.") for n in names)
    assert all(".query." in n or ".value." in n for n in names if not n.startswith("head."))
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert base > 22_000_000 and trainable == 73_728 + 3 * 384 + 3
    # what travels: under 0.02x the encoder's fp32 size
    assert trainable / base < 0.02


def test_clipped_sum_equals_per_example_autograd_on_every_adapter() -> None:
    model = _lora()
    _check_clipped_sum(model, _batch(6, 3, length=12))


def test_noise_reaches_every_trainable_parameter_and_nothing_else() -> None:
    model = _lora()
    inputs = _batch(4, 3, length=12)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = _engine(model, clip=1.0, sigma=1.0)
    engine.step(_losses(model, inputs))
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        assert moved == p.requires_grad, name


def few_dp_steps(device: torch.device) -> tuple[float, float, LoraClassifier]:
    """12 DP-LoRA steps (sigma 0.5) of the sites' loop on a 3-class toy task: the loss
    before and after, and the model (also run on a GPU by test_cuda.py)."""
    texts = (
        [f"great wonderful film {i}" for i in range(24)]
        + [f"awful dull boring mess {i}" for i in range(24)]
        + [f"the bank reported quarterly earnings {i}" for i in range(24)]
    )
    data = Batchable.from_encoded(encode(texts, 12), [0] * 24 + [1] * 24 + [2] * 24)
    model = build_model(LORA, seed=0).to(device)
    assert isinstance(model, LoraClassifier)

    def loss() -> float:
        with torch.no_grad():
            on = data.to(device)
            return float(F.cross_entropy(model(on.ids, on.mask), on.labels))

    start = loss()
    train_dp(
        model, data, steps=12, sample_rate=0.5, noise_multiplier=0.5, clip_norm=1.0,
        learning_rate=1.0, rng=SecureRandom(bytes(32)), engine="bookkeeping", device=device,
    )  # fmt: skip
    return start, loss(), model


def test_a_few_dp_lora_steps_lower_the_loss() -> None:
    start, end, _ = few_dp_steps(torch.device("cpu"))
    assert end < start - 0.5, (start, end)  # 1.099 to about 0.2


def test_the_update_equals_opacus_hooks_update_on_the_lora_model() -> None:
    # Opacus is the cross-check: its per-sample hooks and DPOptimizer on the same adapters,
    # in train mode (Opacus records activations only there; the encoder has no dropout).
    model = _lora()
    inputs = _batch(8, 3, length=12)
    _, norms = _naive(model, inputs, clip=1e9)
    clip, lr = float(norms.median()), 0.5
    ours, theirs = copy.deepcopy(model).train(), copy.deepcopy(model).train()

    _engine(ours, clip, 1.0, expected_batch=8, learning_rate=lr).step(_losses(ours, inputs))
    _opacus_update(theirs, inputs, clip, 1.0, lr, seed=0)

    start = list(model.trainable_state().values())
    diff, scale = _max_diff(
        [a - s for a, s in zip(ours.trainable_state().values(), start, strict=True)],
        [b - s for b, s in zip(theirs.trainable_state().values(), start, strict=True)],
    )
    assert scale > 0 and diff <= 1e-5 * max(1.0, scale), (diff, scale)


def test_merging_the_adapters_gives_a_probe_that_computes_the_same_function() -> None:
    # What export does with a minilm-lora run: W + B A scaling in the encoder, same head.
    model = _lora(scale=0.2)
    ids, mask, _ = _batch(5, 3, length=12)
    probe = model.merged()

    with torch.no_grad():
        assert torch.allclose(probe(ids, mask), model(ids, mask), atol=1e-3)  # float32 merge
        assert not torch.allclose(probe(ids, mask), build_model(LORA, seed=0)(ids, mask))
    assert probe.spec.kind == "minilm-probe"
    assert any(".lora_A." in n for n, _ in model.named_parameters())  # left as it was


def test_training_mode_has_no_dropout() -> None:
    # Each example's loss is a fixed function of the weights in training: the engine and
    # Opacus (and a GPU and the CPU) compute the same per-example gradients.
    model = _lora().train()
    ids, mask, _ = _batch(4, 3, length=12)
    with torch.no_grad():
        assert torch.equal(model(ids, mask), model(ids, mask))


def _train(model: LoraClassifier, engine: Engine, sigma: float, steps: int = 2) -> None:
    ids, mask, y = _batch(24, 3, length=12)
    train_dp(
        model, Batchable(ids, mask, y), steps=steps, sample_rate=0.5, noise_multiplier=sigma,
        clip_norm=0.05, learning_rate=2.0, rng=SecureRandom(bytes([7]) * 32),
        device=torch.device("cpu"), engine=engine,
    )  # fmt: skip


def test_the_adapters_step_at_their_fraction_of_the_heads_learning_rate() -> None:
    # One noise-free step: the same clipped gradient, the adapters' step LORA_STEP of
    # the head's (the model's learning_rate_factor), under both engines.
    start = _lora()
    engines: tuple[Engine, ...] = ("bookkeeping", "opacus")
    for engine in engines:
        ours, plain = copy.deepcopy(start), copy.deepcopy(start)
        plain.learning_rate_factor = lambda name: 1.0  # type: ignore[method-assign]
        _train(ours, engine, 0.0, steps=1)
        _train(plain, engine, 0.0, steps=1)
        before = start.trainable_state()
        for name, p in ours.trainable_state().items():
            moved, full = p - before[name], plain.trainable_state()[name] - before[name]
            factor = 1.0 if name.startswith("head.") else LORA_STEP
            assert full.abs().max() > 0, name
            # float32 weights of about 0.05 resolve steps to about 4e-9
            assert torch.allclose(moved, factor * full, rtol=1e-3, atol=2e-8), (engine, name)
    assert LORA_STEP < 1.0


@pytest.mark.parametrize("sigma", [0.0, 0.8])
def test_train_dp_engines_agree_on_the_lora_model(sigma: float) -> None:
    # The sites' loop with either engine, the per-parameter steps and the secure noise:
    # the same weights after a few steps.
    engines: tuple[Engine, ...] = ("bookkeeping", "opacus")
    models = {engine: _lora().train() for engine in engines}
    for engine, model in models.items():
        _train(model, engine, sigma, steps=3)
    start = list(_lora().trainable_state().values())
    diff, scale = _max_diff(
        [
            a - s
            for a, s in zip(models["bookkeeping"].trainable_state().values(), start, strict=True)
        ],
        [b - s for b, s in zip(models["opacus"].trainable_state().values(), start, strict=True)],
    )
    assert scale > 0 and diff <= 1e-4 * max(1.0, scale), (diff, scale)
