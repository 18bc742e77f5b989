"""Tokenization uses the public MiniLM WordPiece vocabulary, never site data."""

from __future__ import annotations

import pytest

from common.text import PAD_ID, VOCAB_SIZE, encode, pretrained_file


def test_known_ids_from_the_public_uncased_vocab() -> None:
    enc = encode(["Hello world"], max_length=8)
    vocab = pretrained_file("vocab.txt").read_text().splitlines()
    assert len(vocab) == VOCAB_SIZE
    ids = enc.ids[0].tolist()
    assert [vocab[i] for i in ids[:4]] == ["[CLS]", "hello", "world", "[SEP]"]
    assert ids[4:] == [PAD_ID] * 4
    assert enc.mask[0].tolist() == [True] * 4 + [False] * 4


def test_truncation_and_fixed_shape() -> None:
    enc = encode(["word " * 100, "short"], max_length=10)
    assert enc.ids.shape == enc.mask.shape == (2, 10)
    assert enc.mask[0].all() and enc.mask[1].sum() == 3
    assert len(enc) == 2


def test_unknown_words_split_into_known_pieces() -> None:
    enc = encode(["fedsiloization"], max_length=16)
    assert 0 < enc.ids.max() < VOCAB_SIZE and enc.mask.sum() > 3


def test_too_short_max_length_is_refused() -> None:
    with pytest.raises(ValueError, match="max_length"):
        encode(["x"], max_length=1)
