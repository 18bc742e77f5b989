"""Book-keeping DP-SGD (Bu et al. 2023): per-example clipping in one backward pass.

A step, for a model whose trainable parameters all sit in ``nn.Linear``,
``nn.LayerNorm`` and ``nn.Embedding`` layers (exact types):

1. The trainable parameters are set ``requires_grad=False``, so autograd computes no
   parameter gradient; a forward hook keeps each trainable layer's input ``a`` and a
   tensor hook the gradient ``g`` of its output (one backward of the summed loss).
2. Per-example squared gradient norms, layer by layer, from ``a`` and ``g``: ghost
   norms ``<a a^T, g g^T>`` for sequence Linear layers (or the per-example gradient
   where that is smaller), ``[i_t = i_s] <g_t, g_s>`` for Embedding, the small
   per-example gradients for LayerNorm and biases.
3. Clip factors exactly as Opacus's DPOptimizer: ``min(1, C / (norm + 1e-6))``.
4. The clipped sum per parameter from the same ``a`` and ``g`` (one matmul per Linear),
   Gaussian noise of std ``noise_multiplier * C`` from the site's cryptographically
   secure source (common/secure_random.py: one draw for all parameters, split in
   ``model.parameters()`` order), division by the expected batch, plain SGD.

Privacy rests on two things checked here: each example's contribution to the sum has
norm at most C because norm and sum come from the same per-example quantities; and
dim 0 of every trainable layer's input is the batch (checked against the loss), with
no mixing across examples elsewhere in the model (as for Opacus; not checkable here).
Numerical trouble is data-independent (it must not let a coordinator probe the data
through a failing round): the squared norms are computed in float32 and, where one
overflows, again in float64 from inputs rescaled per example, so a norm is found
wherever the true norm fits; an example whose norm is still not finite (an infinite or
NaN activation) gets clip factor 0, exactly as if it had not been sampled, and its
rows are zeroed before the sum. Anything else fails closed: unsupported trainable
layers and tied weights are refused when the engine is built, and a layer called twice
or never raises before any parameter changes. The model's flags and hooks are restored
after every step, also on error, so nothing outlives a call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.secure_random import SecureRandom

SUPPORTED = (nn.Linear, nn.LayerNorm, nn.Embedding)

Grads = dict[torch.Tensor, torch.Tensor]
# (squared per-example norms (batch,), clipped sums given the clip factors)
Rule = tuple[torch.Tensor, Callable[[torch.Tensor], Grads]]


def draw_noise(rng: SecureRandom, like: Sequence[torch.Tensor], std: float) -> list[torch.Tensor]:
    """Gaussian noise of ``std`` shaped like each tensor of ``like``: one draw from the
    secure source for all of them (cheaper than one per tensor), split in order; zeros,
    drawing nothing, when ``std`` is 0 (as Opacus)."""
    if not like:
        return []
    sizes = [t.numel() for t in like]
    if std == 0:
        return [torch.zeros_like(t) for t in like]
    flat = rng.normal((sum(sizes),), std, dtype=like[0].dtype, device=like[0].device)
    return [
        part.view(t.shape).to(t.device, t.dtype)
        for part, t in zip(torch.split(flat, sizes), like, strict=True)
    ]


class UnsupportedModelError(TypeError):
    """The model has a trainable part the engine cannot clip per example."""


def trainable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module owning a trainable parameter; refuses any the
    engine has no per-example rule for, and parameters shared between modules."""
    layers = []
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        label = f"{type(m).__name__} '{name or '<root>'}'"
        if type(m) not in SUPPORTED:
            raise UnsupportedModelError(
                f"{label} has trainable parameters but no per-example rule "
                f"(supported: {', '.join(t.__name__ for t in SUPPORTED)}); freeze it or use "
                "the opacus engine"
            )
        if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq):
            raise UnsupportedModelError(
                f"{label}: max_norm / scale_grad_by_freq couple examples of a batch"
            )
        layers.append((name, m))
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad and seen.setdefault(id(p), name) != name:
            raise UnsupportedModelError(f"tied weights: '{seen[id(p)]}' is also '{name}'")
    return layers


class BookkeepingDPSGD:
    """DP-SGD steps on ``model`` with book-keeping clipping (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_batch: int,
        learning_rate: float,
        rng: SecureRandom,
    ) -> None:
        self.model = model
        self.layers = trainable_layers(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._ids = [id(p) for p in self.params]
        self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
        self.expected_batch, self.learning_rate = expected_batch, learning_rate
        self.rng = rng

    def clipped_sum(
        self, per_example_loss: Callable[[], torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The clipped per-example gradients summed, one per trainable parameter in
        order, and the per-example gradient norms. ``per_example_loss()`` runs the
        model's forward and returns the (batch,) losses."""
        if [id(p) for p in self.model.parameters() if p.requires_grad] != self._ids:
            raise RuntimeError(
                "the model's trainable parameters changed since the engine was built"
            )
        with self._recording() as saved:
            loss = per_example_loss()
            if loss.dim() != 1:
                raise ValueError(f"expected per-example losses (batch,), got {tuple(loss.shape)}")
            loss.sum().backward()  # type: ignore[no-untyped-call]
        batch = loss.shape[0]
        with torch.no_grad():  # flags restored: requires_grad says again what trains
            rules = [self._rule(name, m, saved.get(m, []), batch) for name, m in self.layers]
            norms = torch.stack([n2 for n2, _ in rules]).sum(0).clamp(min=0).sqrt()
            dtype = norms.dtype
            safe = not bool(torch.isfinite(norms).all())
            if safe:
                norms, rules = self._safe_norms(saved, batch, dtype)
            grads = self._sums(rules, norms)
            if not safe and not _all_finite(grads):  # float32 overflowed in a sum
                norms, rules = self._safe_norms(saved, batch, dtype)
                grads = self._sums(rules, norms)
            if not _all_finite(grads):  # each row is clipped to C: float64 cannot overflow
                raise FloatingPointError("non-finite clipped sum after the float64 recompute")
        missing = [
            n for n, p in self.model.named_parameters() if p.requires_grad and p not in grads
        ]
        if missing:
            raise RuntimeError(f"no clipped gradient for trainable parameters {missing}")
        return [grads[p] for p in self.params], norms

    def _sums(self, rules: list[Rule], norms: torch.Tensor) -> Grads:
        """The clipped sums: factor min(1, C / (norm + 1e-6)), 0 where a norm is not
        finite (the example counts as not sampled)."""
        factor = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
        factor = torch.where(torch.isfinite(norms), factor, 0.0).to(norms.dtype)
        grads: Grads = {}
        for _, summed in rules:
            grads.update(summed(factor))
        return grads

    def _safe_norms(
        self, saved: dict[nn.Module, list[torch.Tensor]], batch: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[Rule]]:
        """The rare path: per-example norms in float64 from per-example rescaled inputs
        (no overflow where the true norm fits); examples whose norm is still not finite
        get their recorded rows zeroed (norm NaN: clip factor 0) and the sums are rebuilt
        from the cleaned records, in float64 where float32 overflowed."""
        parts = [_exact_n2(m, *saved[m]) for _, m in self.layers]
        norms = torch.stack(parts).sum(0).clamp(min=0).sqrt()
        bad = ~torch.isfinite(norms)

        def cleaned(x: torch.Tensor) -> torch.Tensor:  # a copy: records may alias inputs
            if not x.is_floating_point():
                return x
            keep = (~bad).reshape(-1, *([1] * (x.dim() - 1)))
            return torch.where(keep, x.double(), 0.0)

        rules = [
            self._rule(name, m, [cleaned(x) for x in saved[m]], batch) for name, m in self.layers
        ]
        exact = torch.where(bad, torch.nan, norms)
        return exact, [(n2, _cast(summed, dtype)) for n2, summed in rules]

    @torch.no_grad()
    def step(self, per_example_loss: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One DP-SGD step (Opacus's DPOptimizer update, mean loss); returns the
        per-example gradient norms."""
        with torch.enable_grad():
            sums, norms = self.clipped_sum(per_example_loss)
        noises = draw_noise(self.rng, self.params, self.noise_multiplier * self.clip_norm)
        for p, summed, noise in zip(self.params, sums, noises, strict=True):
            p.add_((summed + noise) / self.expected_batch, alpha=-self.learning_rate)
        return norms

    @contextmanager
    def _recording(self) -> Iterator[dict[nn.Module, list[torch.Tensor]]]:
        """Parameters frozen and hooks on for one forward and backward; both undone on
        exit, also on error."""
        saved: dict[nn.Module, list[torch.Tensor]] = {}

        def keep(m: nn.Module, inputs: tuple[Any, ...], out: Any) -> Any:
            if m in saved:
                raise RuntimeError(
                    f"{type(m).__name__} called twice in one forward (tied or reused layer)"
                )
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                raise RuntimeError(f"{type(m).__name__}: expected a positional tensor input")
            record = [inputs[0].detach()]
            saved[m] = record
            if not out.requires_grad:  # nothing trainable upstream: start the graph here
                out = out.detach().requires_grad_()
            out.register_hook(record.append)
            return out

        handles = [m.register_forward_hook(keep) for _, m in self.layers]
        try:
            for p in self.params:
                p.requires_grad_(False)
            yield saved
        finally:
            for h in handles:
                h.remove()
            for p in self.params:
                p.requires_grad_(True)

    def _rule(self, name: str, m: nn.Module, record: list[torch.Tensor], batch: int) -> Rule:
        label = f"{type(m).__name__} '{name}'"
        if len(record) != 2:
            raise RuntimeError(f"{label}: no input or output gradient recorded in this step")
        a, g = record
        if a.shape[0] != batch or g.shape[0] != batch:
            raise RuntimeError(
                f"{label}: dim 0 of its input {tuple(a.shape)} is not the batch of {batch}"
            )
        if isinstance(m, nn.Linear):
            return _linear(m, a, g)
        if isinstance(m, nn.LayerNorm):
            return _layer_norm(m, a, g)
        assert isinstance(m, nn.Embedding)
        return _embedding(m, a, g)


def _all_finite(grads: Grads) -> bool:
    return bool(torch.stack([torch.isfinite(v).all() for v in grads.values()]).all())


def _bcast(c: torch.Tensor) -> torch.Tensor:
    return c[:, None, None]


def _cast(
    summed: Callable[[torch.Tensor], Grads], dtype: torch.dtype
) -> Callable[[torch.Tensor], Grads]:
    """A float64 rule's sums, given float clip factors, back in the parameters' dtype."""

    def run(c: torch.Tensor) -> Grads:
        return {p: v.to(dtype) for p, v in summed(c.double()).items()}

    return run


def _per_example_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| over each example's entries (float64), at least the smallest normal."""
    peak = x.double().abs().reshape(x.shape[0], -1).amax(1)
    return peak.clamp(min=torch.finfo(torch.float64).tiny)


def _exact_n2(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A layer's squared per-example norms in float64, without overflow where the true
    norm fits: Linear inputs and output gradients are rescaled to max 1 per example
    and the scales multiplied back in float64 (an infinite or NaN entry gives NaN)."""
    b = a.shape[0]
    if not isinstance(m, nn.Linear):
        ids_or_input = a.double() if a.is_floating_point() else a
        rule = _layer_norm if isinstance(m, nn.LayerNorm) else _embedding
        return rule(m, ids_or_input, g.double())[0]  # type: ignore[arg-type]
    sa, sg = _per_example_max(a), _per_example_max(g)
    a_s = a.double().reshape(b, -1, m.in_features) / sa[:, None, None]
    g_s = g.double().reshape(b, -1, m.out_features) / sg[:, None, None]
    n2 = torch.zeros(b, dtype=torch.float64, device=g.device)
    if m.weight.requires_grad:
        ghost = (a_s @ a_s.transpose(1, 2) * (g_s @ g_s.transpose(1, 2))).sum((1, 2))
        n2 = n2 + ghost * (sa * sg).square()
    if m.bias is not None and m.bias.requires_grad:
        n2 = n2 + g_s.sum(1).square().sum(1) * sg.square()
    return n2


def _linear(m: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> Rule:
    b = a.shape[0]
    a = a.reshape(b, -1, m.in_features)  # (batch, tokens, in); tokens = 1 for 2-D inputs
    g = g.reshape(b, -1, m.out_features)
    n2 = torch.zeros(b, device=g.device, dtype=g.dtype)
    if m.weight.requires_grad:
        t = a.shape[1]
        if t * t <= m.in_features * m.out_features:  # ghost norm: (t, t) per example
            n2 = n2 + (a @ a.transpose(1, 2) * (g @ g.transpose(1, 2))).sum((1, 2))
        else:  # the per-example gradient is the smaller tensor
            n2 = n2 + (g.transpose(1, 2) @ a).square().sum((1, 2))
    bias = m.bias if m.bias is not None and m.bias.requires_grad else None
    gb = g.sum(1)
    if bias is not None:
        n2 = n2 + gb.square().sum(1)

    def summed(c: torch.Tensor) -> Grads:
        out: Grads = {}
        if m.weight.requires_grad:  # scale the narrower of g and a by c
            gc, ac = (g * _bcast(c), a) if g.shape[-1] <= a.shape[-1] else (g, a * _bcast(c))
            out[m.weight] = gc.reshape(-1, m.out_features).T @ ac.reshape(-1, m.in_features)
        if bias is not None:
            out[bias] = c @ gb
        return out

    return n2, summed


def _layer_norm(m: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor) -> Rule:
    b, shape = a.shape[0], m.normalized_shape
    normed = F.layer_norm(a, shape, eps=m.eps)  # the forward's normalised input
    k = math.prod(shape)
    gw = (normed * g).reshape(b, -1, k).sum(1)  # (batch, k): per-example gradients
    gb = g.reshape(b, -1, k).sum(1)
    parts = {p: v for p, v in ((m.weight, gw), (m.bias, gb)) if p is not None and p.requires_grad}
    n2 = sum(
        (v.square().sum(1) for v in parts.values()), torch.zeros(b, device=g.device, dtype=g.dtype)
    )

    def summed(c: torch.Tensor) -> Grads:
        return {p: (c @ v).view(p.shape) for p, v in parts.items()}

    return n2, summed


def _embedding(m: nn.Embedding, ids: torch.Tensor, g: torch.Tensor) -> Rule:
    b = ids.shape[0]
    ids = ids.reshape(b, -1)
    g = g.reshape(b, -1, m.embedding_dim)
    if m.padding_idx is not None:  # torch gives the padding row no gradient
        g = g * (ids != m.padding_idx).unsqueeze(-1).to(g.dtype)
    same = (ids[:, :, None] == ids[:, None, :]).to(g.dtype)
    n2 = (same * (g @ g.transpose(1, 2))).sum((1, 2))

    def summed(c: torch.Tensor) -> Grads:
        weight = torch.zeros_like(m.weight)
        rows = (g * _bcast(c)).reshape(-1, m.embedding_dim).to(weight.dtype)
        return {m.weight: weight.index_add_(0, ids.reshape(-1), rows)}

    return n2, summed
