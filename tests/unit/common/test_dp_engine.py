"""Book-keeping DP-SGD against independent references: per-example autograd one
example at a time, Opacus's hooks and DPOptimizer, and the Gaussian noise's moments."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

from common.dp_engine import BookkeepingDPSGD, SparseRows, UnsupportedModelError
from common.model import ModelSpec, TextClassifier, build_model
from common.secure_random import SecureRandom
from common.training import Batchable, Engine, SecureNoiseDPOptimizer, train_dp

TINY = ModelSpec.preset("tiny", num_classes=2, max_length=16)
Inputs = tuple[torch.Tensor, ...]


def _model(spec: ModelSpec = TINY, scale: float = 0.1) -> TextClassifier:
    """The preset with its trainable weights nudged off zero, in eval mode."""
    model = build_model(spec, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _batch(n: int, num_classes: int = 2, length: int = 16, seed: int = 2) -> Inputs:
    """Random token ids, 3 to ``length`` real tokens each, padding id 0 after them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30000, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    assert not mask.all()
    return ids * mask, mask, torch.randint(0, num_classes, (n,), generator=g)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _engine(model: nn.Module, clip: float, sigma: float = 0.0, **kw: object) -> BookkeepingDPSGD:
    args: dict[str, object] = {
        "expected_batch": 1,
        "learning_rate": 1.0,
        "rng": SecureRandom(bytes(32)),
    }
    return BookkeepingDPSGD(model, clip_norm=clip, noise_multiplier=sigma, **(args | kw))  # type: ignore[arg-type]


def _losses(model: nn.Module, inputs: Inputs) -> Callable[[], torch.Tensor]:
    *x, y = inputs
    return lambda: F.cross_entropy(model(*x), y, reduction="none")


def _naive(
    model: nn.Module, inputs: Inputs, clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Autograd one example at a time, each whole gradient clipped as Opacus does
    (``min(1, C / (norm + 1e-6))``), summed."""
    *x, y = inputs
    params = _trainable(model)
    sums = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(y)):
        loss = F.cross_entropy(model(*(t[i : i + 1] for t in x)), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = tuple(
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)
        )
        norm = torch.stack([g.norm() for g in grads]).norm()
        factor = (clip / (norm + 1e-6)).clamp(max=1.0)
        for s, g in zip(sums, grads, strict=True):
            s += factor * g
        norms.append(norm)
    return sums, torch.stack(norms)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """max |a - b| and max |b| over all tensors."""
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    return diff, max(float(y.abs().max()) for y in b)


def _check_clipped_sum(model: nn.Module, inputs: Inputs) -> None:
    _, norms = _naive(model, inputs, clip=1e9)
    clip = float(norms.median())  # about half of the examples clipped
    expected, ref_norms = _naive(model, inputs, clip)
    got, got_norms = _engine(model, clip).clipped_sum(_losses(model, inputs))
    assert (ref_norms > clip).any() and (ref_norms < clip).any()
    torch.testing.assert_close(got_norms, ref_norms, rtol=1e-5, atol=1e-6)
    diff, scale = _max_diff(got, expected)
    assert diff <= 1e-5 * max(1.0, scale), (diff, scale)


# --------------------------------------------------------------------------- clipped sum


@pytest.mark.parametrize(
    "spec",
    [
        TINY,
        dataclasses.replace(TINY, projection="trainable"),
        ModelSpec.preset("tiny", num_classes=5, max_length=16),
    ],
    ids=["tiny", "trainable-projection", "5-classes"],
)
def test_clipped_sum_equals_per_example_autograd(spec: ModelSpec) -> None:
    model = _model(spec)
    _check_clipped_sum(model, _batch(12, spec.num_classes))


class _Toy(nn.Module):
    """Every branch of every rule: an Embedding with padding_idx and repeated ids,
    LayerNorms over 1 and 2 dims (one without bias, one without affine), Linear on 2-D,
    3-D (ghost norm) and 4-D inputs (per-example gradient), a frozen weight with a
    trainable bias, and a frozen layer of an unsupported type."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.seq = nn.Linear(6, 12)  # 4 tokens: 4 (6 + 12) <= 6 x 12, ghost norm
        self.wide = nn.Linear(12, 3)  # on (b, 2, 2, 12): 4 (12 + 3) > 12 x 3, per-example
        self.ln2 = nn.LayerNorm((2, 3), bias=False)
        self.plain = nn.LayerNorm(3, elementwise_affine=False)
        self.frozen_conv = nn.Conv1d(4, 4, 1).requires_grad_(False)
        self.bias_only = nn.Linear(12, 12)
        self.bias_only.weight.requires_grad_(False)
        self.head = nn.Linear(12, 3, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.seq(self.ln(self.emb(ids)))
        x = self.wide(F.gelu(x).view(-1, 2, 2, 12))
        x = self.plain(self.ln2(x)).reshape(-1, 4, 3)
        x = self.frozen_conv(x).flatten(1)
        return self.head(torch.tanh(self.bias_only(x)))  # type: ignore[no-any-return]


def test_every_layer_rule_equals_per_example_autograd() -> None:
    torch.manual_seed(0)
    model = _Toy()
    with torch.no_grad():
        for p in _trainable(model):
            p.add_(torch.randn(p.shape))
    ids = torch.tensor([[1, 1, 2, 0], [3, 0, 0, 0], [4, 5, 4, 5], [6, 6, 6, 6]] * 3)
    ids[4:] = torch.randint(0, 7, (8, 4), generator=torch.Generator().manual_seed(3))
    _check_clipped_sum(model, (ids, torch.randint(0, 3, (12,))))
    # the padding row gets no gradient, as in torch
    got, _ = _engine(model, 1.0).clipped_sum(_losses(model, (ids, torch.zeros(12).long())))
    assert float(got[0][0].abs().max()) == 0.0


# --------------------------------------------------------------------------- against Opacus


def _opacus_update(
    model: nn.Module, inputs: Inputs, clip: float, sigma: float, lr: float, seed: int
) -> None:
    *x, y = inputs
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    # Opacus's clipping and update; its noise from the same secure source and key as
    # the book-keeping engine (what common/training.py's opacus engine does).
    opt = SecureNoiseDPOptimizer(
        torch.optim.SGD(_trainable(model), lr=lr),
        rng=SecureRandom(bytes([seed]) * 32),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=len(y),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        F.cross_entropy(gsm(*x), y).backward()  # type: ignore[no-untyped-call]
    opt.step()
    gsm._close()


def _state(model: TextClassifier) -> list[torch.Tensor]:
    return [v.clone() for v in model.trainable_state().values()]


@pytest.mark.parametrize(("sigma", "dropout"), [(0.0, 0.0), (1.0, 0.0), (0.0, 0.3)])
def test_update_equals_opacus_hooks_update(sigma: float, dropout: float) -> None:
    # Prepare: the same model, batch, generator seed and (train mode) dropout masks
    spec = dataclasses.replace(TINY, dropout=dropout)
    model = _model(spec).train()
    inputs = _batch(16)
    clip, lr = 2.2, 0.7  # about the median per-example norm
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)

    # Execute
    torch.manual_seed(5)
    norms = _engine(ours, clip, sigma, expected_batch=16, learning_rate=lr).step(
        _losses(ours, inputs)
    )
    torch.manual_seed(5)
    _opacus_update(theirs, inputs, clip, sigma, lr, seed=0)

    # Assert: the same update (the noise too: same draws in the same order)
    assert (norms > clip).any() and (norms < clip).any()
    start = _state(model)
    diff, scale = _max_diff(
        [a - s for a, s in zip(_state(ours), start, strict=True)],
        [b - s for b, s in zip(_state(theirs), start, strict=True)],
    )
    assert scale > 0 and diff <= 1e-5 * max(1.0, scale), (diff, scale)
    assert all(p.requires_grad and p.grad is None for p in _trainable(ours))


def test_noise_has_the_calibrated_std_and_zero_mean() -> None:
    # Prepare: one step with noise and one without, from the same model and batch
    model, inputs = _model(), _batch(16)
    sigma, clip, expected_batch, lr = 1.3, 0.8, 40, 0.5
    noisy, clean = copy.deepcopy(model), copy.deepcopy(model)

    # Execute
    for m, s in ((noisy, sigma), (clean, 0.0)):
        _engine(m, clip, s, expected_batch=expected_batch, learning_rate=lr).step(
            _losses(m, inputs)
        )

    # Assert: the difference is -lr * N(0, (sigma * clip)^2) / expected_batch
    noise = torch.cat(
        [(a - b).flatten() for a, b in zip(_state(noisy), _state(clean), strict=True)]
    )
    std = lr * sigma * clip / expected_batch
    assert noise.numel() >= 100_000
    assert abs(float(noise.std()) / std - 1) < 0.02
    assert abs(float(noise.mean())) < 5 * std / noise.numel() ** 0.5


@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_train_dp_engines_agree(sigma: float) -> None:
    n = 40
    ids, mask, y = _batch(n)
    data = Batchable(ids, mask, y)
    models = {}
    engines: tuple[Engine, ...] = ("bookkeeping", "opacus")
    for engine in engines:
        models[engine] = _model()
        result = train_dp(
            models[engine],
            data,
            steps=5,
            sample_rate=0.3,
            noise_multiplier=sigma,
            clip_norm=2.2,
            learning_rate=1.0,
            rng=SecureRandom(bytes([7]) * 32),
            device=torch.device("cpu"),
            engine=engine,
        )
        assert result.examples_seen > 0
    start = _state(_model())
    diff, scale = _max_diff(
        [a - s for a, s in zip(_state(models["bookkeeping"]), start, strict=True)],
        [b - s for b, s in zip(_state(models["opacus"]), start, strict=True)],
    )
    assert scale > 0 and diff <= 1e-4 * max(1.0, scale), (diff, scale)


def _canaries(model: nn.Module, count: int, value: float, seed: int = 5) -> SparseRows:
    """Dirac rows on distinct coordinates spread over the trainable Linear weights."""
    weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = _trainable(model)
    hosts = [i for i, p in enumerate(params) if id(p) in weights]
    sizes = torch.tensor([params[i].numel() for i in hosts])
    flat = torch.randperm(int(sizes.sum()), generator=torch.Generator().manual_seed(seed))[:count]
    ends = torch.cumsum(sizes, 0)
    host = torch.searchsorted(ends, flat, right=True)
    param = torch.tensor(hosts)[host]
    return SparseRows(param, flat - (ends - sizes)[host], torch.full((count,), value))


def test_given_rows_are_clipped_and_summed_with_the_examples() -> None:
    # The audit's Dirac canaries: one above the clip norm (clipped to it), one below.
    model, inputs = _model(), _batch(6)
    clip = 0.8
    rows = _canaries(model, 2, 1.0)
    rows = SparseRows(rows.param, rows.coord, torch.tensor([5 * clip, 0.3 * clip]))
    expected, ref_norms = _naive(model, inputs, clip)
    for i in range(2):  # by hand: min(1, C / (|v| + 1e-6)) v at the row's coordinate
        v = float(rows.value[i])
        expected[int(rows.param[i])].view(-1)[int(rows.coord[i])] += min(1, clip / (v + 1e-6)) * v
    got, norms = _engine(model, clip).clipped_sum(_losses(model, inputs), rows)
    torch.testing.assert_close(norms, torch.cat([ref_norms, rows.value]), rtol=1e-5, atol=1e-6)
    diff, scale = _max_diff(got, expected)
    assert diff <= 1e-5 * max(1.0, scale), (diff, scale)
    alone, _ = _engine(model, clip).clipped_sum(None, rows)  # a step of canaries only
    assert sum(float(t.abs().sum()) for t in alone) == pytest.approx(clip + 0.3 * clip, rel=1e-5)


def test_given_rows_sit_on_linear_weights_only() -> None:
    model = _model()
    norm = next(i for i, (n, _) in enumerate(_named_trainable(model)) if "norm" in n)
    rows = SparseRows(torch.tensor([norm]), torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="Linear weights"):
        _engine(model, 1.0).clipped_sum(None, rows)


def _named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_train_dp_engines_agree_with_canaries(sigma: float) -> None:
    # 4 examples at rate 0.3: some steps draw canaries only. Opacus clips the canaries'
    # rows appended to its per-sample gradients; both engines give the same weights.
    ids, mask, y = _batch(4)
    models = {}
    for engine in ("bookkeeping", "opacus"):
        models[engine] = _model()
        train_dp(
            models[engine],
            Batchable(ids, mask, y),
            steps=6,
            sample_rate=0.3,
            noise_multiplier=sigma,
            clip_norm=1.1,
            learning_rate=1.0,
            rng=SecureRandom(bytes([9]) * 32),
            device=torch.device("cpu"),
            engine=engine,  # type: ignore[arg-type]
            expected_batch=2,
            canaries=_canaries(models[engine], 30, 4.0),
        )
    start = _state(_model())
    diff, scale = _max_diff(
        [a - s for a, s in zip(_state(models["bookkeeping"]), start, strict=True)],
        [b - s for b, s in zip(_state(models["opacus"]), start, strict=True)],
    )
    assert scale > 0 and diff <= 1e-4 * max(1.0, scale), (diff, scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    model, inputs = _model(), _batch(16)
    cpu = _engine(model, 0.5).clipped_sum(_losses(model, inputs))[0]
    gpu_model = copy.deepcopy(model).cuda()
    gpu_inputs = tuple(t.cuda() for t in inputs)
    engine = _engine(gpu_model, 0.5, 1.0)
    gpu = engine.clipped_sum(_losses(gpu_model, gpu_inputs))[0]
    diff, scale = _max_diff([g.cpu() for g in gpu], cpu)
    assert diff <= 1e-4 * max(1.0, scale), (diff, scale)
    engine.step(_losses(gpu_model, gpu_inputs))  # noise drawn on the CPU, applied on cuda
    assert all(torch.isfinite(p).all() for p in gpu_model.parameters())


# --------------------------------------------------------------------------- fail closed


class _Net(nn.Module):
    def __init__(self, extra: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.extra = extra


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (nn.Conv1d(4, 4, 1), "Conv1d 'extra'"),
        (nn.MultiheadAttention(4, 2, batch_first=True), "MultiheadAttention 'extra'"),
        (nn.Embedding(5, 4, max_norm=1.0), "max_norm"),
    ],
)
def test_unsupported_trainable_layers_are_refused_by_name(extra: nn.Module, named: str) -> None:
    with pytest.raises(UnsupportedModelError, match=named):
        _engine(_Net(extra), 1.0)
    _engine(_Net(extra.requires_grad_(False)), 1.0)  # frozen, it is fine


def test_tied_weights_are_refused() -> None:
    net = _Net(nn.Linear(4, 4))
    net.extra.weight = net.lin.weight
    with pytest.raises(UnsupportedModelError, match="tied weights"):
        _engine(net, 1.0)


class _Faulty(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "transposed":  # dim 0 of b's input is not the batch
            h: torch.Tensor = self.a(x).reshape(-1, 2, 4).transpose(0, 1)  # (2, batch / 2, 4)
            out: torch.Tensor = self.b(h).transpose(0, 1).reshape(-1, 2)
            return out
        h = self.a(x)
        if self.mode == "twice":
            h = self.a(h)
        if self.mode == "raise":
            raise ValueError("boom")
        if self.mode == "dead":  # b runs but does not reach the loss
            self.b(h)
            return h[:, :2]
        if self.mode == "nan":
            h = h * float("nan")
        out = self.b(h)
        return out


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        ("twice", RuntimeError, "called twice"),
        ("raise", ValueError, "boom"),
        ("dead", RuntimeError, "no input or output gradient"),
        ("transposed", RuntimeError, "not the batch"),
    ],
)
def test_a_failed_step_changes_nothing(mode: str, error: type[Exception], match: str) -> None:
    model = _Faulty(mode)
    before = copy.deepcopy(model.state_dict())
    engine = _engine(model, 1.0, 1.0)
    x, y = torch.randn(8, 4), torch.zeros(8).long()
    with pytest.raises(error, match=match):
        engine.step(_losses(model, (x, y)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    model.mode = "ok"  # and the engine still works
    engine.step(_losses(model, (x, y)))


def test_parameters_made_trainable_after_build_are_refused() -> None:
    net = _Net(nn.Conv1d(4, 4, 1).requires_grad_(False))
    engine = _engine(net, 1.0)
    net.extra.requires_grad_(True)
    with pytest.raises(RuntimeError, match="trainable parameters changed"):
        engine.step(lambda: net.lin(torch.randn(3, 4)).sum(1))


# --------------------------------------------------------------------------- numerical trouble


class _Scaled(nn.Module):
    """Linear -> Linear whose second layer's input is scaled by ``scale`` for the
    examples flagged in ``hot``: the coordinator's crafted weights, in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        self.scale = 1.0
        self.hot = torch.zeros(0, dtype=torch.bool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        factor = torch.where(self.hot, self.scale, 1.0).to(h.dtype)
        h = h * factor[:, None, None]
        return self.b(h).mean(1)


def _clipped(model: _Scaled, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    engine = _engine(model, clip)
    return engine.clipped_sum(lambda: F.cross_entropy(model(x), y, reduction="none"))[0]


def _reference_clipped(
    model: _Scaled, x: torch.Tensor, y: torch.Tensor, clip: float
) -> list[torch.Tensor]:
    """Per-example gradients one example at a time in float64, clipped as Opacus does."""
    ref = copy.deepcopy(model).double()
    total = [torch.zeros_like(p) for p in ref.parameters()]
    for i in range(len(y)):
        ref.hot = model.hot[i : i + 1]
        ref.zero_grad()
        F.cross_entropy(ref(x[i : i + 1].double()), y[i : i + 1]).backward()  # type: ignore[no-untyped-call]
        grads = [p.grad for p in ref.parameters()]
        norm = torch.sqrt(sum((g.square().sum() for g in grads), torch.tensor(0.0)))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return [t.float() for t in total]


def test_a_norm_that_overflows_float32_ghost_norms_is_still_clipped_right() -> None:
    # Attack: activations near 1e20 make a a^T overflow float32 (1e40) while the true
    # per-example norm fits; the engine raised, so a round failed only for data that
    # reached the crafted activations.
    torch.manual_seed(0)
    model = _Scaled()
    x, y = torch.randn(6, 3, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    model.hot = torch.tensor([True, False, False, True, False, False])
    model.scale = 1e20
    with torch.no_grad():
        model.b.weight.mul_(1e-21)  # the true gradient of b stays moderate

    got = _clipped(model, x, y, clip=1.0)

    want = _reference_clipped(model, x, y, clip=1.0)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5), (g, w)


def test_an_example_with_a_non_finite_norm_counts_as_not_sampled() -> None:
    torch.manual_seed(1)
    model = _Scaled()
    x, y = torch.randn(6, 3, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    model.hot = torch.tensor([False, True, False, False, True, False])
    model.scale = float("inf")  # their activations overflow: inf and NaN downstream

    got = _clipped(model, x, y, clip=0.5)

    keep = ~model.hot
    clean = copy.deepcopy(model)
    clean.hot = torch.zeros(int(keep.sum()), dtype=torch.bool)
    want = _clipped(clean, x[keep], y[keep], clip=0.5)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-7)
    # and a whole step goes through, data-independently, leaving finite weights
    engine = _engine(model, 0.5, 1.0)
    engine.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_opacus_engine_also_drops_an_example_with_a_non_finite_gradient() -> None:
    torch.manual_seed(2)
    model = _Scaled()
    x, y = torch.randn(6, 3, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    model.hot = torch.tensor([False, True, False, False, False, False])
    model.scale = float("inf")
    before = copy.deepcopy(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = SecureNoiseDPOptimizer(
        torch.optim.SGD(_trainable(model), lr=1.0),
        rng=SecureRandom(bytes(32)),
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        expected_batch_size=6,
    )
    F.cross_entropy(gsm(x), y).backward()  # type: ignore[no-untyped-call]
    opt.step()
    gsm._close()

    keep = ~model.hot
    clean = copy.deepcopy(before)
    clean.hot = torch.zeros(int(keep.sum()), dtype=torch.bool)
    want = _clipped(clean, x[keep], y[keep], clip=0.5)
    for p, q, w in zip(model.parameters(), before.parameters(), want, strict=True):
        assert torch.isfinite(p).all()
        assert torch.allclose(q - p, w / 6, rtol=1e-4, atol=1e-6)


class _Keys(nn.Module):
    """One sequence Linear whose per-token output gradients sum to zero over the tokens
    (as attention keys' do) and whose token inputs share a large common part: the
    tokens' terms of the ghost norm cancel."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(128, 384)

    def forward(self, x: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ((self.lin(x) @ v) * w).sum(1)  # per example: sum_t w_t (lin(x_t) . v)


@pytest.mark.parametrize("spread", [1e-3, 1e-4, 1e-7])
def test_cancelling_tokens_cannot_carry_an_example_past_the_clip_bound(spread: float) -> None:
    # Attack (found in review): near-identical token inputs and zero-sum gradients made
    # the float32 ghost norm 0 while the float32 clipped sum was up to 15.7 C. Now such
    # examples are recomputed in float64 (equal to the reference), or dropped where
    # even float64 cannot tell (contributing 0).
    torch.manual_seed(0)
    model = _Keys()
    b, t = 16, 48
    base = torch.randn(b, 1, 128)
    x = (base + spread * torch.randn(b, t, 128)) * 100
    w = torch.randn(b, t)
    w = w - w.mean(1, keepdim=True)  # zero-sum over the tokens
    v = torch.randn(384)
    clip = 1.0

    def contribution(rows: slice) -> list[torch.Tensor]:
        return _engine(model, clip).clipped_sum(lambda: model(x[rows], w[rows], v))[0]

    alone = [contribution(slice(i, i + 1)) for i in range(b)]
    together = contribution(slice(0, b))

    # Each example's clipped contribution, alone, is within C (it was 15.7 C) ...
    norms = [float(torch.sqrt(sum(g.double().square().sum() for g in c))) for c in alone]
    assert max(norms) <= clip * (1 + 1e-5), max(norms)
    assert (max(norms) == 0.0) == (spread < 1e-5)  # dropped where float64 cannot tell
    # ... and the batch adds exactly those contributions.
    for i, g in enumerate(together):
        summed = torch.stack([c[i] for c in alone]).sum(0)
        assert torch.allclose(g, summed, rtol=1e-4, atol=1e-6 * clip)


class _Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 64)

    def forward(self, ids: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (self.emb(ids) * v).sum((1, 2))  # per example: sum_t v_t . emb(ids_t)


@pytest.mark.parametrize("scale", [1e2, 1e4, 1e6])
def test_a_repeated_id_whose_gradients_cancel_is_clipped_to_c(scale: float) -> None:
    # Found in review: the ghost formula over pairs of equal ids rounded to 0 where the
    # two gradients nearly cancel, while the sum did not (3 C at scale 1e4).
    torch.manual_seed(0)
    model = _Lookup()
    x = torch.randn(64) * scale
    delta = torch.randn(64)
    delta = delta / delta.norm() * 3.0  # the true per-example gradient has norm 3
    v = torch.stack([x, -x + delta])[None]
    ids = torch.tensor([[5, 5]])

    got, norms = _engine(model, 1.0).clipped_sum(lambda: model(ids, v))

    true = float((v[0, 0].double() + v[0, 1].double()).norm())
    assert float(norms[0]) == pytest.approx(true, rel=1e-3 * scale / 1e2)
    assert float(got[0].double().norm()) <= 1.0 + 1e-5


class _Bias(nn.Module):
    """A Linear whose bias alone trains, with crafted output gradients ``w``; and a
    second Linear whose huge input overflows float32 (gradient 0): it sends the step to
    the float64 path."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.lin.weight.requires_grad_(False)
        self.trigger = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, w: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
        return (self.lin(x) * w).sum((1, 2)) + 0.0 * self.trigger(big).sum((1, 2))


@pytest.mark.parametrize("pattern", [[3.0, -1.75, -1.25, 2**-52], [3.0, -1.1, -1.9, 2**-51]])
def test_the_float64_path_builds_a_bias_norm_and_sum_from_the_same_values(
    pattern: list[float],
) -> None:
    # Found in review: the float64 path summed the rescaled bias gradients for the norm
    # but the unscaled ones for the sum: norm 0, contribution 1.13e15 C.
    model = _Bias()
    w = torch.tensor(pattern)[None, :, None] * 2.0**100
    t = w.shape[1]
    x, big = torch.zeros(1, t, 2), torch.full((1, t, 8), 1e20)

    got, _ = _engine(model, 1.0).clipped_sum(lambda: model(x, w, big))

    assert float(torch.sqrt(sum(g.double().square().sum() for g in got))) <= 1.0 + 1e-6
