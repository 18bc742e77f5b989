"""A Transformer text classifier that Opacus accepts as it is.

Why this shape (docs/model.md has the measurements):
- ``nn.TransformerEncoderLayer`` is refused by Opacus, and Opacus's own replacement
  computes something else with ``batch_first=True``. Our layer uses one fused qkv
  ``nn.Linear`` and ``F.scaled_dot_product_attention``; it equals a pre-LN
  ``nn.TransformerEncoderLayer`` (tests copy weights across and compare).
- DP-SGD learns only with few trainable parameters and a pretrained start. The word
  embeddings are MiniLM's public pretrained ones, frozen (a per-example gradient of a
  30k x 384 table would cost ~0.5 GB a batch); a small trainable projection brings
  them to ``d_model``, initialised with the principal axes of the public table.
- Residual blocks are pre-LayerNorm with their output projections zero-initialised,
  so a fresh encoder is the identity: the model starts as a linear classifier on
  mean-pooled embeddings, which learns from the first round, and the attention
  layers grow in from there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from common.config import Preset
from common.features import LORA_STEP, load_encoder, lora_encoder, sentence_embedding
from common.task import Task
from common.text import VOCAB_SIZE, pretrained_file

EMBED_DIM = 384
PRETRAINED_EMBEDDING_KEY = "embeddings.word_embeddings.weight"


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of the classifier; everything a site needs to rebuild it."""

    num_classes: int
    max_length: int = 48
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 128
    dropout: float = 0.0
    # "trainable": a Linear 384 -> d_model, PCA-initialised, trained with DP.
    # "frozen": the PCA projection of the public table itself, fixed (no privacy cost,
    # no per-example gradient of it, and the projected table is precomputed).
    projection: Literal["trainable", "frozen"] = "trainable"
    # "transformer": the small encoder above; "minilm-probe": the whole pretrained
    # MiniLM encoder, frozen, as a feature extractor, and a linear head on its features.
    kind: Literal["transformer", "minilm-probe", "minilm-lora"] = "transformer"

    @classmethod
    def preset(cls, name: Preset, *, num_classes: int, max_length: int) -> ModelSpec:
        if name in ("minilm-probe", "minilm-lora"):
            return cls(
                num_classes=num_classes,
                max_length=max_length,
                d_model=EMBED_DIM,
                num_layers=0,
                num_heads=1,
                d_ff=0,
                projection="frozen",
                kind=name,
            )
        sizes: dict[str, dict[str, Any]] = {
            # Measured under DP here (docs/model.md): a frozen PCA-128 projection keeps
            # more of the public embeddings than a trainable 64-wide one and adds no
            # noisy parameters; one block is what two CPU cores afford per round.
            "tiny": {
                "d_model": 128,
                "num_layers": 1,
                "num_heads": 4,
                "d_ff": 256,
                "projection": "frozen",
            },
            "small": {
                "d_model": 128,
                "num_layers": 2,
                "num_heads": 4,
                "d_ff": 256,
                "projection": "trainable",
            },
        }
        if name not in sizes:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(sizes)}")
        return cls(num_classes=num_classes, max_length=max_length, **sizes[name])


def model_spec(task: Task) -> ModelSpec:
    """The architecture a task names (its preset and length, with the run's overrides
    already applied: ``common.task.run_task``), one output per label."""
    preset = cast(Preset, task.model_preset)
    return ModelSpec.preset(preset, num_classes=len(task.labels), max_length=task.max_length)


class EncoderLayer(nn.Module):
    """Pre-LN encoder block: x + attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)

    def zero_init_residual(self) -> None:
        """Make the block the identity map, so a fresh encoder changes nothing."""
        for layer in (self.out, self.ff2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` is (batch, length) bool, True where a token is real."""
        b, length, d = x.shape
        h = self.qkv(self.norm1(x)).view(b, length, 3, self.num_heads, d // self.num_heads)
        q, k, v = h.permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], dropout_p=p)
        x = x + F.dropout(self.out(a.transpose(1, 2).reshape(b, length, d)), p, self.training)
        ff = self.ff2(F.dropout(F.gelu(self.ff1(self.norm2(x))), p, self.training))
        return x + F.dropout(ff, p, self.training)


class TextClassifier(nn.Module):
    """Frozen public embeddings -> projection -> encoder -> masked mean -> LN -> head."""

    def __init__(self, spec: ModelSpec, embedding: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spec = spec
        if spec.projection not in ("trainable", "frozen"):
            raise ValueError(f"unknown projection {spec.projection!r}")
        width = EMBED_DIM if spec.projection == "trainable" else spec.d_model
        if embedding is None:
            embedding = torch.zeros(VOCAB_SIZE, width)
        if tuple(embedding.shape) != (VOCAB_SIZE, width):
            raise ValueError(
                f"embedding table of shape {tuple(embedding.shape)}, expected {(VOCAB_SIZE, width)}"
            )
        # Shares the (read-only, public) table's storage instead of copying it.
        self.embed = nn.Embedding.from_pretrained(  # type: ignore[no-untyped-call]
            embedding, freeze=True, padding_idx=0
        )
        self.proj: nn.Module = (
            nn.Linear(EMBED_DIM, spec.d_model) if spec.projection == "trainable" else nn.Identity()
        )
        self.pos = nn.Embedding(spec.max_length, spec.d_model)
        nn.init.zeros_(self.pos.weight)
        self.layers = nn.ModuleList(
            EncoderLayer(spec.d_model, spec.num_heads, spec.d_ff, spec.dropout)
            for _ in range(spec.num_layers)
        )
        for layer in self.layers:
            layer.zero_init_residual()  # type: ignore[operator]
        self.norm = nn.LayerNorm(spec.d_model)
        # Pooled features of unit norm (not sqrt(d_model)): per-example gradients then
        # sit near the DP clip bound instead of far above it, so clipping keeps their
        # relative sizes (all-clipped gradients push the bias towards the majority class).
        nn.init.constant_(self.norm.weight, spec.d_model**-0.5)
        self.head = nn.Linear(spec.d_model, spec.num_classes)
        # A zero head predicts the uniform distribution; its first DP steps move it
        # towards the class centroids instead of a random direction.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length = ids.shape
        # Contiguous position ids: an expand()ed view breaks Opacus ghost clipping.
        positions = torch.arange(length, device=ids.device).repeat(b, 1)
        x = self.proj(self.embed(ids)) + self.pos(positions)
        for layer in self.layers:
            x = layer(x, mask)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(self.norm(pooled))  # type: ignore[no-any-return]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The parameters that train and travel; the frozen public table stays home."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load exactly the trainable parameters; any missing/extra/misshaped is an error."""
        load_exactly({n: p for n, p in self.named_parameters() if p.requires_grad}, state)


@lru_cache(maxsize=1)
def pretrained_embedding() -> torch.Tensor:
    """MiniLM's public word-embedding table (30,522 x 384), read once per process."""
    with safe_open(str(pretrained_file("model.safetensors")), "pt") as f:
        table: torch.Tensor = f.get_tensor(PRETRAINED_EMBEDDING_KEY)
    if tuple(table.shape) != (VOCAB_SIZE, EMBED_DIM):
        raise RuntimeError(f"unexpected pretrained embedding shape {tuple(table.shape)}")
    return table.float()


def principal_projection(table: torch.Tensor, d_model: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias projecting onto the top principal axes of a public table.

    The axes are the top eigenvectors of the 384 x 384 covariance (float64): the same
    as an SVD of the whole table, about 3x faster, which every site process pays once.
    Each axis's sign is fixed (its largest entry positive) so that every site and the
    coordinator build the same table whatever their LAPACK."""
    mean = table.mean(0)
    centred = (table - mean).double()
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    axes = vectors[:, -d_model:].flip(1).T  # (d_model, 384), largest variance first
    peak = axes.abs().argmax(dim=1, keepdim=True)
    axes = axes * torch.sign(axes.gather(1, peak))
    weight = axes.float().contiguous()
    # Unit variance per output coordinate keeps the LayerNorm'd scale comparable.
    scale = ((table - mean) @ weight.T).std(0).clamp(min=1e-6)
    weight = weight / scale[:, None]
    return weight, -(weight @ mean)


@lru_cache(maxsize=2)
def projected_embedding(d_model: int) -> torch.Tensor:
    """The public table projected onto its top ``d_model`` principal axes (cached)."""
    table = pretrained_embedding()
    weight, bias = principal_projection(table, d_model)
    return (table @ weight.T + bias).contiguous()


def load_exactly(own: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the parameters ``own``: exactly those names and shapes, else a
    ``ValueError`` naming the difference (the weights a coordinator sends are checked)."""
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"model state mismatch: missing {missing[:8]}, unexpected {extra[:8]}")
    with torch.no_grad():
        for name, value in state.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(
                    f"model state {name}: shape {tuple(value.shape)}, "
                    f"expected {tuple(own[name].shape)}"
                )
            own[name].copy_(value)


class ProbeClassifier(nn.Module):
    """The pretrained MiniLM encoder, frozen, as a feature extractor, then a trainable
    linear head (``minilm-probe``). Sites train the head on features computed once
    (common/features.py: unit-length mean-pooled embeddings); the encoder runs only on
    token ids (the coordinator's test set, export, predict). Only the head travels."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.head = nn.Linear(EMBED_DIM, spec.num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._encoder: nn.Module | None = None  # loaded when token ids arrive

    def encoder(self) -> nn.Module:
        if self._encoder is None:  # its own copy: export quantizes and loads it
            self._encoder = load_encoder()
        return self._encoder

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x``: features (n, 384, float), or token ids (n, length) with their mask."""
        if not x.is_floating_point():
            hidden = self.encoder()(input_ids=x, attention_mask=mask.long()).last_hidden_state
            x = sentence_embedding(hidden, mask)
        return self.head(x)  # type: ignore[no-any-return]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.head.named_parameters(prefix="head")}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_exactly(dict(self.head.named_parameters(prefix="head")), state)


class LoraClassifier(nn.Module):
    """DP fine-tuning of the pretrained encoder (``minilm-lora``): rank-8 LoRA adapters
    on the attention's query and value projections of the frozen MiniLM encoder, and a
    linear head on its unit-length mean-pooled embedding. Only the adapters and
    the head train (per-example clipped by the book-keeping engine: they are Linear
    layers) and travel; the pretrained base is never noised, never sent."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = lora_encoder()
        self.head = nn.Linear(EMBED_DIM, spec.num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return self.head(sentence_embedding(hidden, mask))  # type: ignore[no-any-return]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_exactly({n: p for n, p in self.named_parameters() if p.requires_grad}, state)

    @staticmethod
    def learning_rate_factor(name: str) -> float:
        """The head steps at the run's learning rate, the adapters at LORA_STEP of it."""
        return 1.0 if name.startswith("head.") else LORA_STEP

    def merged(self) -> ProbeClassifier:
        """The same function as a probe: the adapters merged into the encoder's weights
        (W + B A scaling; post-processing, no privacy cost) and the head, so export and
        predict treat a fine-tuned model as they treat a probe. The adapters are copied,
        this model is left as it was."""
        import copy

        probe = ProbeClassifier(replace(self.spec, kind="minilm-probe"))
        probe._encoder = copy.deepcopy(self.encoder).merge_and_unload()
        probe.head.load_state_dict(self.head.state_dict())
        return probe.eval()


Classifier = TextClassifier | ProbeClassifier | LoraClassifier


def build_model(spec: ModelSpec, *, seed: int | None = None) -> Classifier:
    """A classifier with the public embeddings; seeded initialisation when a seed is given.

    Sites call this and then load the global trainable state, so only the coordinator's
    initialisation (seeded, PCA projection) matters.
    """
    if spec.kind == "minilm-probe":
        return ProbeClassifier(spec)
    if spec.kind == "minilm-lora":
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return LoraClassifier(spec)
    if spec.d_model > EMBED_DIM:
        raise ValueError(f"d_model {spec.d_model} exceeds the embedding width {EMBED_DIM}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if spec.projection == "frozen":
            return TextClassifier(spec, embedding=projected_embedding(spec.d_model))
        table = pretrained_embedding()
        model = TextClassifier(spec, embedding=table)
        if seed is not None and isinstance(model.proj, nn.Linear):
            weight, bias = principal_projection(table, spec.d_model)
            with torch.no_grad():
                model.proj.weight.copy_(weight)
                model.proj.bias.copy_(bias)
    return model
