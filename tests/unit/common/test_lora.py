"""DP-LoRA on the pretrained encoder (issue 15, minilm-lora): the book-keeping engine
gives every adapter and head parameter its per-example clipped gradient (against
per-example autograd, one example at a time) and its noise; the frozen base gets
neither; and a few DP steps on a small task lower the loss (Opacus issue 820's silent
failure was LoRA that did not learn while epsilon looked normal)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.model import LoraClassifier, ModelSpec, build_model
from common.secure_random import SecureRandom
from common.text import encode
from common.training import Batchable, train_dp
from tests.unit.common.test_dp_engine import (
    _batch,
    _check_clipped_sum,
    _engine,
    _losses,
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
    assert len(names) == 2 * 6 * 6 + 2  # A and B of 6 layers in each of 6 blocks, head
    assert all(".lora_A." in n or ".lora_B." in n or n.startswith("head.") for n in names)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert base > 22_000_000 and trainable == 331_776 + 3 * 384 + 3
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


def test_a_few_dp_lora_steps_lower_the_loss() -> None:
    texts = (
        [f"great wonderful film {i}" for i in range(24)]
        + [f"awful dull boring mess {i}" for i in range(24)]
        + [f"the bank reported quarterly earnings {i}" for i in range(24)]
    )
    labels = [0] * 24 + [1] * 24 + [2] * 24
    data = Batchable.from_encoded(encode(texts, 12), labels)
    model = build_model(LORA, seed=0)

    def loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(data.ids, data.mask), data.labels))

    start = loss()
    train_dp(
        model, data, steps=12, sample_rate=0.5, noise_multiplier=0.5, clip_norm=1.0,
        learning_rate=1.0, rng=SecureRandom(bytes(32)), engine="bookkeeping",
        device=torch.device("cpu"),
    )  # fmt: skip
    assert loss() < start - 0.5, (start, loss())  # 1.099 to about 0.23
