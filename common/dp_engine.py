"""Book-keeping DP-SGD (Bu et al. 2023): per-example clipping in one backward pass.

A step, for a model whose trainable parameters all sit in ``nn.Linear``,
``nn.LayerNorm`` and ``nn.Embedding`` layers (exact types):

1. The trainable parameters are set ``requires_grad=False``, so autograd computes no
   parameter gradient; a forward hook keeps each trainable layer's input ``a`` and a
   tensor hook the gradient ``g`` of its output (one backward of the summed loss).
2. Per-example squared gradient norms, layer by layer, from ``a`` and ``g``: ghost
   norms ``<a a^T, g g^T>`` for sequence Linear layers (or the per-example gradient
   where that costs fewer multiply-adds), ``[i_t = i_s] <g_t, g_s>`` for Embedding,
   the small per-example gradients for LayerNorm and biases.
3. Clip factors exactly as Opacus's DPOptimizer: ``min(1, C / (norm + 1e-6))``.
4. The clipped sum per parameter from the same ``a`` and ``g`` (one matmul per Linear),
   Gaussian noise of std ``noise_multiplier * C`` from the site's cryptographically
   secure source (common/secure_random.py: one draw for all parameters, split in
   ``model.parameters()`` order), division by the expected batch, plain SGD.

The local empirical audit's canaries (``SparseRows``: given Dirac gradients on Linear
weights) are recorded as examples of their layer before step 2, so they are sized,
clipped and summed by the same rules.

Privacy rests on two things checked here: each example's contribution to the sum has
norm at most C because norm and sum come from the same per-example quantities; and
dim 0 of every trainable layer's input is the batch (checked against the loss), with
no mixing across examples elsewhere in the model (as for Opacus; not checkable here).
Numerical trouble is data-independent (it must not let a coordinator probe the data
through a failing round): the squared norms are computed in float32 and, where one
overflows, again in float64 (from float32 records nothing overflows there), so a norm
is found wherever the true norm fits; an example whose norm is still not finite (an infinite or
NaN activation) gets clip factor 0, exactly as if it had not been sampled, and its
rows are zeroed before the sum. The norm and the clipped sum of a sequence layer are
two float computations of one gradient; where the tokens' terms cancel (crafted
weights can arrange it) they may disagree and let an example exceed C, so an example
whose norm falls below 1e-3 of its triangle bound is recomputed in float64, and dropped
(clip factor 0) below 1e-11 (``_CANCELLED``). Embedding norms and sums are both built
from one gradient row per (example, id). Anything else fails closed: unsupported
trainable layers and tied weights are refused when the engine is built, and a layer called twice
or never raises before any parameter changes. The model's flags and hooks are restored
after every step, also on error, so nothing outlives a call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SparseRows:
    """Extra examples of a step whose per-example gradients are given, not computed: row
    i has ``value[i]`` at flat position ``coord[i]`` of trainable parameter
    ``param[i]`` (in the model's order; a Linear weight for this engine) and zeros
    elsewhere. Only the local empirical audit makes them (its Dirac gradient canaries,
    simulations/empirical_audit.py): they are recorded as examples of their own at their
    layer, and the layer rules compute their norms and clipped sums with the model's
    examples, so a broken norm, clip or noise shows in the audit. Nothing a
    coordinator sends can create them."""

    param: torch.Tensor
    coord: torch.Tensor
    value: torch.Tensor

    def __len__(self) -> int:
        return int(self.value.shape[0])

    def take(self, which: torch.Tensor) -> SparseRows:
        which = which.to(self.value.device)
        return SparseRows(self.param[which], self.coord[which], self.value[which])

    def to(self, device: torch.device) -> SparseRows:
        return SparseRows(self.param.to(device), self.coord.to(device), self.value.to(device))

    def dense(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The rows as per-example gradients, one (rows, *shape) tensor per parameter
        (Opacus's ``grad_sample`` layout)."""
        out = []
        for i, p in enumerate(params):
            dense = torch.zeros(len(self), p.numel(), dtype=p.dtype, device=p.device)
            hit = (self.param == i).nonzero().squeeze(1)
            dense[hit.to(p.device), self.coord[hit].to(p.device)] = self.value[hit].to(dense)
            out.append(dense.view(len(self), *p.shape))
        return out


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
        learning_rate: float | Sequence[float],
        rng: SecureRandom,
    ) -> None:
        """``learning_rate``: one rate, or one per trainable parameter in the model's
        order (the noisy sum is released either way; the steps are post-processing)."""
        self.model = model
        self.layers = trainable_layers(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._ids = [id(p) for p in self.params]
        self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
        self.expected_batch = expected_batch
        rates = (
            [float(learning_rate)] * len(self.params)
            if isinstance(learning_rate, int | float)
            else [float(r) for r in learning_rate]
        )
        if len(rates) != len(self.params):
            raise ValueError(f"{len(rates)} learning rates for {len(self.params)} parameters")
        self.learning_rates = rates
        self.rng = rng

    def clipped_sum(
        self,
        per_example_loss: Callable[[], torch.Tensor] | None,
        rows: SparseRows | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The clipped per-example gradients summed, one per trainable parameter in
        order, and the per-example gradient norms (the model's examples, then ``rows``).
        ``per_example_loss()`` runs the model's forward and returns the (batch,) losses;
        None when the step holds only ``rows``. Each row (an audit canary on a Linear
        weight) is recorded as one more example (``_record_rows``), so the same layer
        rules compute its norm and its clipped share of the sum."""
        if [id(p) for p in self.model.parameters() if p.requires_grad] != self._ids:
            raise RuntimeError(
                "the model's trainable parameters changed since the engine was built"
            )
        batch = 0
        with self._recording() as saved:
            if per_example_loss is not None:
                loss = per_example_loss()
                if loss.dim() != 1:
                    raise ValueError(
                        f"expected per-example losses (batch,), got {tuple(loss.shape)}"
                    )
                loss.sum().backward()  # type: ignore[no-untyped-call]
                batch = loss.shape[0]
        with torch.no_grad():  # flags restored: requires_grad says again what trains
            if rows is not None and len(rows):
                batch = self._record_rows(saved, rows, batch)
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

    def _record_rows(
        self, saved: dict[nn.Module, list[torch.Tensor]], rows: SparseRows, batch: int
    ) -> int:
        """Appends each row as one example of its own to every layer's records: at the
        Linear layer whose weight it sits on, input ``value / _ROW_EPS`` at column j and
        output gradient ``_ROW_EPS`` at row i of its first token, so the weight gradient
        the layer rule computes is ``value`` at [i, j] (a trained bias gets _ROW_EPS at
        i); zeros elsewhere. Returns the batch with them."""
        k = len(rows)
        weights = {id(m.weight): m for _, m in self.layers if isinstance(m, nn.Linear)}
        owners = [self._ids[i] for i in rows.param.tolist()]
        if any(pid not in weights for pid in owners):
            raise ValueError("given gradient rows must sit on trainable Linear weights")
        for _, m in self.layers:
            record = saved.get(m) or _empty_record(m)
            if len(record) != 2:
                continue  # _rule names the missing record
            a, g = record
            extra_a = a.new_zeros((k, *a.shape[1:]))
            extra_g = g.new_zeros((k, *g.shape[1:]))
            if isinstance(m, nn.Linear):
                hit = torch.tensor([pid == id(m.weight) for pid in owners], device=a.device)
                sel = hit.nonzero().squeeze(1)
                coord = rows.coord.to(a.device)[sel]
                out_i, in_j = coord // m.in_features, coord % m.in_features
                values = rows.value.to(a.device, a.dtype)[sel]
                extra_a.view(k, -1, m.in_features)[sel, 0, in_j] = values / _ROW_EPS
                extra_g.view(k, -1, m.out_features)[sel, 0, out_i] = _ROW_EPS
            saved[m] = [torch.cat([a, extra_a]), torch.cat([g, extra_g])]
        return batch + k

    def _factors(self, norms: torch.Tensor) -> torch.Tensor:
        """Clip factors min(1, C / (norm + 1e-6)), 0 where a norm is not finite (the
        example counts as not sampled)."""
        factor = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
        return torch.where(torch.isfinite(norms), factor, 0.0).to(norms.dtype)

    def _sums(self, rules: list[Rule], norms: torch.Tensor) -> Grads:
        """The clipped sums, by the clip factors of ``_factors``."""
        factor = self._factors(norms)
        grads: Grads = {}
        for _, summed in rules:
            grads.update(summed(factor))
        return grads

    def _safe_norms(
        self, saved: dict[nn.Module, list[torch.Tensor]], batch: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[Rule]]:
        """The rare path: norms and sums by the same rules on float64 records (from
        float32 values nothing overflows there); an example whose norm is still not
        finite gets NaN (clip factor 0) and its rows zeroed, so it adds nothing."""

        def rules(keep: torch.Tensor | None) -> list[Rule]:
            def record(x: torch.Tensor) -> torch.Tensor:  # a copy: records may alias inputs
                if not x.is_floating_point():
                    return x  # Embedding ids
                if keep is None:
                    return x.double()
                return torch.where(keep.reshape(-1, *([1] * (x.dim() - 1))), x.double(), 0.0)

            return [self._rule(n, m, [record(x) for x in saved[m]], batch) for n, m in self.layers]

        built = rules(None)
        norms = torch.stack([n2 for n2, _ in built]).sum(0).clamp(min=0).sqrt()
        bad = ~torch.isfinite(norms)
        if bool(bad.any()):
            built = rules(~bad)
        exact = torch.where(bad, torch.nan, norms)
        return exact, [(n2, _cast(summed, dtype)) for n2, summed in built]

    @torch.no_grad()
    def step(
        self, per_example_loss: Callable[[], torch.Tensor] | None, rows: SparseRows | None = None
    ) -> torch.Tensor:
        """One DP-SGD step (Opacus's DPOptimizer update, mean loss); returns the
        per-example gradient norms."""
        with torch.enable_grad():
            sums, norms = self.clipped_sum(per_example_loss, rows)
        noises = draw_noise(self.rng, self.params, self.noise_multiplier * self.clip_norm)
        for p, summed, noise, lr in zip(
            self.params, sums, noises, self.learning_rates, strict=True
        ):
            p.add_((summed + noise) / self.expected_batch, alpha=-lr)
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


# A given row's output gradient (its input carries value / _ROW_EPS): small, so that the
# bias it also touches gets 1e-6 (and 1e-12 in the row's squared norm); the weight
# gradient is their product, value. The ghost norm squares the input: float32 holds it
# for values up to about 1e13 (the audit's are 10 clip norms); beyond, the engine's
# float64 recompute takes over as for any example.
_ROW_EPS = 1e-6


def _empty_record(m: nn.Module) -> list[torch.Tensor]:
    """A layer's records of a step with no model examples (only given rows)."""
    if isinstance(m, nn.Linear):
        w = m.weight
        return [w.new_zeros((0, m.in_features)), w.new_zeros((0, m.out_features))]
    if isinstance(m, nn.LayerNorm):
        like = next(m.parameters())
        shape = tuple(m.normalized_shape)
        return [like.new_zeros((0, *shape)), like.new_zeros((0, *shape))]
    assert isinstance(m, nn.Embedding)
    w = m.weight
    return [torch.zeros((0, 1), dtype=torch.long, device=w.device), w.new_zeros((0, 1, w.shape[1]))]


def _all_finite(grads: Grads) -> bool:
    """One check for all sums (a non-finite entry, or an overflow, makes the total so)."""
    return bool(torch.isfinite(torch.stack([v.sum() for v in grads.values()]).sum()))


def _bcast(c: torch.Tensor) -> torch.Tensor:
    return c[:, None, None]


def _cast(
    summed: Callable[[torch.Tensor], Grads], dtype: torch.dtype
) -> Callable[[torch.Tensor], Grads]:
    """A float64 rule's sums, given float clip factors, back in the parameters' dtype."""

    def run(c: torch.Tensor) -> Grads:
        return {p: v.to(dtype) for p, v in summed(c.double()).items()}

    return run


# Below this fraction of its triangle bound (sum over tokens of |a_t| |g_t|, squared), a
# sequence Linear layer's squared per-example norm is mostly rounding error: the tokens'
# terms cancel, and the norm and the clipped sum (two different float computations of
# one gradient) may disagree, letting the example exceed C. Trained models sit above
# 0.04 (tiny preset, Rotten Tomatoes); such examples are recomputed in float64, and
# below the float64 threshold (1e-11) dropped (clip factor 0: within C, as any clipping).
_CANCELLED = {torch.float32: 1e-3, torch.float64: 1e-11}


def _triangle(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per example, sum over tokens of |a_t| |g_t|: the triangle bound of the norm of
    sum_t g_t a_t^T."""
    return torch.sum(torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(g, dim=-1), 1)


def _unless_cancelled(n2: torch.Tensor, triangle: torch.Tensor) -> torch.Tensor:
    """``n2``, with NaN where it is below its dtype's share of the squared triangle
    bound."""
    cancelled = n2 < _CANCELLED.get(n2.dtype, 1e-3) * triangle.square()
    return torch.where(cancelled, torch.nan, n2)


def _linear(m: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> Rule:
    b = a.shape[0]
    a = a.reshape(b, -1, m.in_features)  # (batch, tokens, in); tokens = 1 for 2-D inputs
    g = g.reshape(b, -1, m.out_features)
    n2 = torch.zeros(b, device=g.device, dtype=g.dtype)
    if m.weight.requires_grad:
        t = a.shape[1]
        # The cheaper of two exact formulas, in multiply-adds per example: the ghost norm
        # from two (t, t) Gram matrices, t^2 (in + out), or the per-example gradient,
        # t in out (LoRA's rank-8 layers at 48 tokens: the gradient, 6x cheaper).
        if t * (m.in_features + m.out_features) <= m.in_features * m.out_features:
            ga, gg = a @ a.transpose(1, 2), g @ g.transpose(1, 2)
            weight = (ga * gg).sum((1, 2))
            if t > 1:  # the Gram diagonals hold |a_t|^2 and |g_t|^2
                da, dg = ga.diagonal(dim1=1, dim2=2), gg.diagonal(dim1=1, dim2=2)
                weight = _unless_cancelled(weight, (da * dg).sqrt().sum(1))
        else:  # the per-example gradient costs fewer multiply-adds
            weight = (g.transpose(1, 2) @ a).square().sum((1, 2))
            if t > 1:
                weight = _unless_cancelled(weight, _triangle(a, g))
        n2 = n2 + weight
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
    """One gradient row per (example, id), summed over the example's tokens with that id:
    the norm and the clipped sum are both built from these rows (a ghost formula over
    token pairs could round to 0 where repeated ids' gradients cancel, while the sum did
    not)."""
    b = ids.shape[0]
    ids = ids.reshape(b, -1)
    g = g.reshape(b, -1, m.embedding_dim)
    if m.padding_idx is not None:  # torch gives the padding row no gradient
        g = g * (ids != m.padding_idx).unsqueeze(-1).to(g.dtype)
    key = torch.arange(b, device=ids.device)[:, None] * m.num_embeddings + ids
    unique, inverse = torch.unique(key.reshape(-1), return_inverse=True)
    rows = torch.zeros(len(unique), m.embedding_dim, dtype=g.dtype, device=g.device)
    rows.index_add_(0, inverse, g.reshape(-1, m.embedding_dim))
    example, row = unique // m.num_embeddings, unique % m.num_embeddings
    n2 = torch.zeros(b, dtype=g.dtype, device=g.device)
    n2.index_add_(0, example, rows.square().sum(1))

    def summed(c: torch.Tensor) -> Grads:
        weight = torch.zeros_like(m.weight)
        scaled = (rows * c[example, None]).to(weight.dtype)
        return {m.weight: weight.index_add_(0, row, scaled)}

    return n2, summed
