"""Local training: the DP mechanism is the one the accountant counts."""

from __future__ import annotations

import pytest
import torch

from common.model import ModelSpec, build_model
from common.secure_random import SecureRandom
from common.training import (
    Batchable,
    Engine,
    batches_per_epoch,
    evaluate,
    full_fp32,
    sample_rate,
    train_dp,
    trainable_delta,
)

SPEC = ModelSpec(num_classes=2, max_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=16)
CPU = torch.device("cpu")


def _data(n: int = 64) -> Batchable:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30000, (n, 8), generator=g)
    return Batchable(ids, torch.ones(n, 8, dtype=torch.bool), (ids[:, 0] % 2).long())


def test_sample_rate_matches_opacus_loader_convention() -> None:
    assert batches_per_epoch(1000, 256) == 4 and sample_rate(1000, 256) == 0.25
    assert sample_rate(10, 256) == 1.0


def test_dp_training_moves_the_model_and_reports_its_steps() -> None:
    model = build_model(SPEC, seed=0)
    before = {k: v.clone() for k, v in model.trainable_state().items()}
    result = train_dp(
        model,
        _data(),
        steps=3,
        sample_rate=0.5,
        noise_multiplier=1.0,
        clip_norm=1.0,
        learning_rate=0.1,
        rng=SecureRandom(bytes([1]) * 32),
        device=CPU,
    )
    delta = trainable_delta(before, model.trainable_state())
    assert result.steps == 3 and 0 < result.examples_seen <= 3 * 64
    assert all(torch.isfinite(d).all() for d in delta.values())
    assert any(d.abs().sum() > 0 for d in delta.values())
    assert not hasattr(next(iter(model.parameters())), "grad_sample") or all(
        getattr(p, "grad_sample", None) is None for p in model.parameters()
    )


def test_empty_poisson_batches_still_release_calibrated_noise() -> None:
    # Prepare: a rate so small that every batch is empty; only noise moves the weights.
    model = build_model(SPEC, seed=0)
    before = {k: v.clone() for k, v in model.trainable_state().items()}
    sigma, clip, lr, n, q = 2.0, 1.5, 0.5, 64, 1e-9

    # Execute
    result = train_dp(
        model,
        _data(n),
        steps=4,
        sample_rate=q,
        noise_multiplier=sigma,
        clip_norm=clip,
        learning_rate=lr,
        rng=SecureRandom(bytes([2]) * 32),
        device=CPU,
    )

    # Assert: 4 steps of N(0, (sigma*clip/expected_batch)^2) each, times lr
    delta = torch.cat(
        [d.flatten() for d in trainable_delta(before, model.trainable_state()).values()]
    )
    assert result.examples_seen == 0
    expected_std = lr * sigma * clip / 1 * 4**0.5  # expected batch rounds up to 1
    assert delta.std().item() == pytest.approx(expected_std, rel=0.05)


def test_noise_free_clipped_training_learns_a_trivial_rule() -> None:
    # Half of each example's tokens are "good" (label 1) or "bad" (label 0).
    from common.text import encode

    good, bad = (int(encode([w], 3).ids[0, 1]) for w in ("good", "bad"))
    base = _data(256)
    cue = torch.where(base.labels[:, None] == 1, good, bad).expand(-1, 4)
    data = Batchable(torch.cat([base.ids[:, :4], cue], 1), base.mask, base.labels)
    model = build_model(SPEC, seed=0)
    start = evaluate(model, data, device=CPU)
    train_dp(
        model,
        data,
        steps=60,
        sample_rate=0.25,
        noise_multiplier=0.0,
        clip_norm=1.0,
        learning_rate=1.0,
        rng=SecureRandom(bytes([0]) * 32),
        device=CPU,
    )
    end = evaluate(model, data, device=CPU)
    assert end.loss < start.loss and end.accuracy > 0.95 and end.num_examples == 256


def test_batchable_checks_label_count() -> None:
    from common.text import encode

    with pytest.raises(ValueError, match="labels"):
        Batchable.from_encoded(encode(["a", "b"], 4), [0])


@pytest.mark.parametrize("engine", ["bookkeeping", "opacus"])
def test_each_parameter_steps_by_its_own_factor_also_on_empty_batches(engine: Engine) -> None:
    # A model that gives its parameters step factors (as minilm-lora does): every
    # parameter moves by its own rate times the same noise, batch or no batch.
    model = build_model(SPEC, seed=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    factors = {n: (0.25 if i % 2 else 1.0) for i, n in enumerate(names)}
    model.learning_rate_factor = factors.__getitem__  # type: ignore[attr-defined]
    before = {k: v.clone() for k, v in model.trainable_state().items()}
    sigma, clip, lr = 2.0, 1.5, 0.5
    train_dp(
        model, _data(), steps=4, sample_rate=1e-9, noise_multiplier=sigma, clip_norm=clip,
        learning_rate=lr, rng=SecureRandom(bytes([2]) * 32), device=CPU, engine=engine,
    )  # fmt: skip
    delta = trainable_delta(before, model.trainable_state())
    for factor in (1.0, 0.25):
        moved = torch.cat([delta[n].flatten() for n in names if factors[n] == factor])
        assert moved.numel() > 500
        expected = factor * lr * sigma * clip * 4**0.5  # expected batch rounds up to 1
        assert moved.std().item() == pytest.approx(expected, rel=0.1), factor


def test_full_fp32_switches_tf32_off_and_restores_it() -> None:
    # The settings exist on a CPU-only build too: train_dp's guard for a GPU.
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.fp32_precision, cudnn.fp32_precision
    matmul.fp32_precision = cudnn.fp32_precision = "tf32"
    try:
        with full_fp32(torch.device("cuda")):
            assert matmul.fp32_precision == cudnn.fp32_precision == "ieee"
        assert matmul.fp32_precision == cudnn.fp32_precision == "tf32"
        with full_fp32(CPU):  # nothing to switch on the CPU
            assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision, cudnn.fp32_precision = saved
