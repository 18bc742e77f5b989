"""The pretrained MiniLM encoder as a frozen feature extractor (issue 15, minilm-probe):
its sentence embeddings mean what they should, a site's cached features are the ones
the exported model computes from token ids, and only the head trains and travels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.features import FEATURE_DIM, batchable, cached
from common.model import ModelSpec, ProbeClassifier, build_model
from common.text import encode

TEXTS = [
    "the film was a wonderful, moving delight",
    "a truly delightful and touching movie",
    "the quarterly earnings of the bank fell sharply",
]


def test_sentence_embeddings_put_a_paraphrase_closer_than_an_unrelated_text(
    tmp_path: Path,
) -> None:
    f = cached(TEXTS, 32, tmp_path)
    assert f.shape == (3, FEATURE_DIM)
    assert torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(f[0] @ f[1]) > float(f[0] @ f[2]) + 0.2


def test_features_are_cached_on_disk_and_read_back(tmp_path: Path) -> None:
    first = cached(TEXTS, 32, tmp_path)
    [stored] = list(tmp_path.glob("*.npy"))
    again = cached(TEXTS, 32, tmp_path)
    assert torch.equal(first, again) and np.array_equal(np.load(stored), first.numpy())
    assert len(list(tmp_path.glob("*.npy"))) == 1
    cached(TEXTS, 16, tmp_path)  # another length is another entry
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_the_probe_scores_token_ids_as_the_head_scores_cached_features(tmp_path: Path) -> None:
    spec = ModelSpec.preset("minilm-probe", num_classes=3, max_length=32)
    model = build_model(spec, seed=0)
    assert isinstance(model, ProbeClassifier)
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.normal_()
    state = model.trainable_state()
    assert set(state) == {"head.weight", "head.bias"}  # only the head travels
    data = batchable(TEXTS, [0, 1, 2], max_length=32, preset="minilm-probe", cache=tmp_path)
    enc = encode(TEXTS, 32)
    with torch.no_grad():
        from_features = model(data.ids, data.mask)
        from_ids = model(torch.from_numpy(enc.ids), torch.from_numpy(enc.mask))
    assert torch.allclose(from_features, from_ids, atol=1e-4)
    assert not any(p.requires_grad for p in model.encoder().parameters())


def test_a_damaged_cache_entry_is_computed_again(tmp_path: Path) -> None:
    first = cached(TEXTS, 32, tmp_path)
    [stored] = list(tmp_path.glob("*.npy"))
    stored.write_bytes(b"not a numpy file")
    assert torch.equal(cached(TEXTS, 32, tmp_path), first)
    assert np.array_equal(np.load(stored), first.numpy())
