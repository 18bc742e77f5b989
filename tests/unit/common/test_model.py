"""The classifier: equivalence with torch's encoder layer, Opacus compatibility."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from common.model import EncoderLayer, ModelSpec, TextClassifier, build_model

SPEC = ModelSpec(num_classes=3, max_length=12, d_model=32, num_layers=2, num_heads=4, d_ff=64)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _batch(n: int = 6, length: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30000, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return ids * mask, mask


def test_encoder_layer_matches_torch_pre_ln_encoder_layer() -> None:
    # Prepare: our layer and torch's, same weights (fused in_proj == our qkv).
    ours = EncoderLayer(d_model=32, num_heads=4, d_ff=64)
    _randomize(ours)
    ref = nn.TransformerEncoderLayer(
        d_model=32,
        nhead=4,
        dim_feedforward=64,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(ours.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(ours.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(ours.out.weight)
        ref.self_attn.out_proj.bias.copy_(ours.out.bias)
        ref.linear1.weight.copy_(ours.ff1.weight)
        ref.linear1.bias.copy_(ours.ff1.bias)
        ref.linear2.weight.copy_(ours.ff2.weight)
        ref.linear2.bias.copy_(ours.ff2.bias)
        for a, b in ((ref.norm1, ours.norm1), (ref.norm2, ours.norm2)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    ours.eval()
    ref.eval()
    x = torch.randn(5, 12, 32)
    _, mask = _batch(5, 12)

    # Execute
    got = ours(x, mask)
    want = ref(x, src_key_padding_mask=~mask)

    # Assert: equal on real tokens (torch's fast path may zero padded rows)
    assert torch.allclose(got[mask], want[mask], atol=1e-5)


def test_fresh_model_is_a_linear_classifier_on_mean_pooled_projected_embeddings() -> None:
    model = build_model(SPEC, seed=0).eval()
    with torch.no_grad():  # a non-zero head, so the comparison means something
        model.head.weight.normal_()
        model.head.bias.normal_()
    ids, mask = _batch()
    with torch.no_grad():
        x = model.proj(model.embed(ids))  # pos embeddings start at zero
        w = mask.unsqueeze(-1).float()
        pooled = (x * w).sum(1) / w.sum(1)
        want = model.head(model.norm(pooled))
        got = model(ids, mask)
    assert torch.allclose(got, want, atol=1e-5)


def test_opacus_accepts_the_model_as_is() -> None:
    model = build_model(SPEC, seed=0)
    assert ModuleValidator.validate(model, strict=False) == []


def test_opacus_per_sample_gradients_match_autograd() -> None:
    # Prepare: non-trivial weights so every layer has a gradient.
    model = build_model(SPEC, seed=0)
    _randomize(model, seed=3)
    ids, mask = _batch(n=5)
    labels = torch.tensor([0, 1, 2, 1, 0])
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    # Execute
    F.cross_entropy(gsm(ids, mask), labels, reduction="sum").backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    gsm._close()

    # Assert: each example's gradient, computed alone by autograd
    for i in range(len(labels)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids[i : i + 1], mask[i : i + 1]), labels[i : i + 1]).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(per_sample[name][i], p.grad, atol=1e-5), name


def test_frozen_public_embeddings_neither_train_nor_travel() -> None:
    model = build_model(SPEC, seed=0)
    state = model.trainable_state()
    assert "embed.weight" not in state
    assert not model.embed.weight.requires_grad
    trainable = sum(v.numel() for v in state.values())
    assert trainable < 100_000 < model.embed.weight.numel()


def test_load_trainable_state_rejects_missing_extra_and_misshaped() -> None:
    model = build_model(SPEC, seed=0)
    state = dict(model.trainable_state())
    with pytest.raises(ValueError, match="missing"):
        model.load_trainable_state({k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(ValueError, match="unexpected"):
        model.load_trainable_state({**state, "evil": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        model.load_trainable_state({**state, "head.bias": torch.zeros(7)})


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(SPEC, seed=5).trainable_state()
    after = torch.rand(1)
    b = build_model(SPEC, seed=5).trainable_state()
    assert torch.equal(before, after)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_projection_is_the_pca_table_and_does_not_train() -> None:
    spec = ModelSpec(
        num_classes=2,
        max_length=8,
        d_model=16,
        num_layers=1,
        num_heads=2,
        d_ff=16,
        projection="frozen",
    )
    model = build_model(spec, seed=0)
    assert model.embed.weight.shape == (30522, 16) and not model.embed.weight.requires_grad
    assert not any(n.startswith("proj") for n in model.trainable_state())


def test_presets_and_bad_specs() -> None:
    tiny = ModelSpec.preset("tiny", num_classes=2, max_length=48)
    assert (tiny.d_model, tiny.num_layers, tiny.projection) == (128, 1, "frozen")
    with pytest.raises(ValueError, match="preset"):
        ModelSpec.preset("huge", num_classes=2, max_length=48)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        EncoderLayer(d_model=30, num_heads=4, d_ff=8)
    assert isinstance(TextClassifier(SPEC), TextClassifier)
