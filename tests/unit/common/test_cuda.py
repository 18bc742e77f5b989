"""The CUDA path (issue 15): sites train on the GPU when there is one, and the DP step
there is the CPU's step. Skipped without a CUDA device (this development machine has
none); benchmarks/gpu_check.sh runs them on a GPU machine (`pytest -m cuda`)."""

from __future__ import annotations

import copy

import pytest
import torch

from common.features import embed, load_encoder, sentence_embedding
from common.secure_random import SecureRandom
from common.text import encode
from common.training import Batchable, default_device, train_dp
from tests.unit.common.test_dp_engine import _batch, _engine, _losses, _max_diff
from tests.unit.common.test_lora import _lora, few_dp_steps

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_sites_pick_the_gpu() -> None:
    assert default_device().type == "cuda"


def test_lora_clipped_sum_on_cuda_is_the_cpu_sum() -> None:
    model, inputs = _lora(), _batch(16, 3, length=12)
    cpu = _engine(model, 0.5).clipped_sum(_losses(model, inputs))[0]
    gpu_model = copy.deepcopy(model).cuda()
    gpu = _engine(gpu_model, 0.5).clipped_sum(_losses(gpu_model, tuple(t.cuda() for t in inputs)))[
        0
    ]
    diff, scale = _max_diff([g.cpu() for g in gpu], cpu)
    assert diff <= 1e-4 * max(1.0, scale), (diff, scale)


def test_a_dp_step_on_cuda_is_exact_float32_even_with_tf32_switched_on() -> None:
    # train_dp turns TF32 off for its duration: per-example norms in TF32 are off by
    # about 1e-3, and the clipping the accountant assumes rests on them.
    model, (ids, mask, y) = _lora(), _batch(24, 3, length=12)
    data = Batchable(ids, mask, y)
    kwargs = dict(steps=2, sample_rate=0.5, noise_multiplier=0.0, clip_norm=0.05,
                  learning_rate=1.0)  # fmt: skip
    on_cpu, on_gpu = copy.deepcopy(model), copy.deepcopy(model)
    train_dp(on_cpu, data, rng=SecureRandom(bytes(32)), device=torch.device("cpu"), **kwargs)
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        train_dp(on_gpu, data, rng=SecureRandom(bytes(32)), device=torch.device("cuda"), **kwargs)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # restored afterwards
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved
    start = list(model.trainable_state().values())
    diff, scale = _max_diff(
        [a.cpu() - s for a, s in zip(on_gpu.trainable_state().values(), start, strict=True)],
        [b - s for b, s in zip(on_cpu.trainable_state().values(), start, strict=True)],
    )
    assert scale > 0 and diff <= 1e-4 * scale, (diff, scale)


def test_dp_lora_learns_on_cuda() -> None:
    start, end, model = few_dp_steps(torch.device("cuda"))
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert end < start - 0.5, (start, end)


def test_features_computed_on_the_gpu_are_the_cpu_features() -> None:
    # A site's cached features must not depend on where they were computed.
    enc = encode(["a quietly moving film", "the bank reported earnings", "dull"], 16)
    ids, mask = torch.from_numpy(enc.ids), torch.from_numpy(enc.mask)
    on_gpu = embed(ids, mask)  # the GPU when there is one
    with torch.no_grad():
        hidden = load_encoder()(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        on_cpu = sentence_embedding(hidden, mask)
    assert torch.allclose(on_gpu, on_cpu, atol=1e-4)


@pytest.mark.parametrize("engine", ["bookkeeping", "opacus"])
def test_audit_canaries_on_cuda_give_the_cpu_weights(engine: str) -> None:
    # The empirical audit's Dirac canaries (issue 16) on the GPU: the same draws, the
    # same clipped rows, the same update as on the CPU.
    from tests.unit.common.test_dp_engine import _canaries, _model, _state

    ids, mask, y = _batch(8)
    out = {}
    for device in ("cpu", "cuda"):
        model = _model()
        train_dp(
            model,
            Batchable(ids, mask, y),
            steps=4,
            sample_rate=0.4,
            noise_multiplier=0.5,
            clip_norm=1.0,
            learning_rate=1.0,
            rng=SecureRandom(bytes([3]) * 32),
            device=torch.device(device),
            engine=engine,  # type: ignore[arg-type]
            canaries=_canaries(model, 20, 5.0),
        )
        out[device] = [t.cpu() for t in _state(model)]
    diff, scale = _max_diff(out["cuda"], out["cpu"])
    assert diff <= 1e-4 * max(1.0, scale), (diff, scale)
