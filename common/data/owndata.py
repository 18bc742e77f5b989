"""A researcher's own data for a simulation: one CSV/JSONL file, split into sites by a
site column (each value is one site, as a hospital or a branch would be) or iid /
dirichlet, or a folder of files, one per site (the site named after its file).

Labels come from the task. Without a task file the label set is read from the data
once (``discover_task``), and the simulation writes it to the run's task file with a
notice: a real federation declares its labels, it does not read them from private
data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.data.dataset import DataValidationError, TextDataset
from common.data.partition import partition
from common.data.sitefile import SUPPORTED_SUFFIXES, load_site_file
from common.task import Task

__all__ = ["OwnSites", "discover_task", "load_own_data", "own_sites"]


def _files(path: Path) -> list[Path]:
    """A folder's data files (sorted), or the one file."""
    if not path.exists():
        raise DataValidationError(f"{path}: no such data file or folder")
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise DataValidationError(
            f"{path}: the folder holds no data file ({', '.join(SUPPORTED_SUFFIXES)})"
        )
    return files


def load_own_data(
    path: str | Path,
    task: Task | None,
    *,
    site_column: str = "",
    text_column: str = "text",
    label_column: str = "label",
) -> TextDataset:
    """Every row of a file or folder, validated against ``task`` (None: labels read from
    the data, sorted). ``groups`` name each row's site: the ``site_column`` value, or
    the file's name in a folder (None for one file without a site column)."""
    root = Path(path)
    files = _files(root)
    if root.is_dir() and site_column:
        raise DataValidationError(
            f"{root}: a folder already has one file per site; site-column is for one file"
        )
    columns = (task.text_column, task.label_column) if task else (text_column, label_column)
    labels = task.labels if task else None
    parts = [
        load_site_file(
            f,
            label_names=labels,
            text_column=columns[0],
            label_column=columns[1],
            group_column=site_column or None,
        )
        for f in files
    ]
    names = labels or tuple(sorted({n for p in parts for n in p.label_names}))
    texts: list[str] = []
    ids: list[np.ndarray] = []
    groups: list[str] = []
    for f, part in zip(files, parts, strict=True):
        remap = np.asarray([names.index(n) for n in part.label_names], dtype=np.int64)
        texts.extend(part.texts)
        ids.append(remap[part.labels])
        groups.extend(part.groups or (f.stem,) * len(part))
    grouped = root.is_dir() or bool(site_column)
    return TextDataset(
        name=root.stem,
        texts=tuple(texts),
        labels=np.concatenate(ids),
        label_names=names,
        groups=tuple(groups) if grouped else None,
    )


def discover_task(
    path: str | Path,
    *,
    name: str,
    text_column: str,
    label_column: str,
    max_length: int,
    model_preset: str,
) -> tuple[Task, dict[str, int]]:
    """The task of data that came without one: its label set read from the data (sorted)
    with the counts per label, for the simulation to print and write down."""
    data = load_own_data(path, None, text_column=text_column, label_column=label_column)
    task = Task(
        name=name,
        labels=data.label_names,
        text_column=text_column,
        label_column=label_column,
        max_length=max_length,
        model_preset=model_preset,
    )
    return task, data.label_counts()


@dataclass(frozen=True)
class OwnSites:
    """A simulation's sites on own data: their names and row indices into ``data``."""

    data: TextDataset
    names: tuple[str, ...]
    parts: tuple[np.ndarray, ...]


@lru_cache(maxsize=8)
def own_sites(
    path: str,
    task: Task,
    site_column: str,
    scheme: str,
    num_sites: int,
    seed: int,
    alpha: float,
    min_size: int,
) -> OwnSites:
    """Split own data into ``num_sites`` sites: ``natural`` = the data's own sites (the
    site column's values or the folder's files, sorted by name); iid / dirichlet = the
    pooled rows split at random (cached per process: simulated sites share actors)."""
    data = load_own_data(path, task, site_column=site_column)
    if scheme == "natural":
        if data.groups is None:
            raise DataValidationError(
                f"{path}: partition 'natural' needs the data's own sites: a site column "
                "(--site-column) or a folder of files, one per site; or use iid / dirichlet"
            )
        names = tuple(sorted(set(data.groups)))
        if len(names) != num_sites:
            raise DataValidationError(
                f"{path}: the data has {len(names)} sites {list(names)[:8]}, the simulation "
                f"asks for {num_sites}"
            )
        groups = np.asarray(data.groups, dtype=object)
        parts = tuple(np.flatnonzero(groups == n).astype(np.int64) for n in names)
        return OwnSites(data, names, parts)
    split = partition(data, scheme, num_sites, seed=seed, alpha=alpha, min_size=min_size)  # type: ignore[arg-type]
    return OwnSites(data, tuple(f"part-{i}" for i in range(num_sites)), tuple(split))
