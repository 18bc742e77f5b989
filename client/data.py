"""A site's data: its own file (deployment) or its share of a simulation's data set (a
bundled one, or the researcher's own file or folder), validated, split into training
rows and the held-out evaluation share (common/data/holdout.py), tokenized and
fingerprinted once per process (simulated sites share Ray actors). Nothing here leaves
the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from client.settings import SiteConfigError, SiteSettings
from common.config import RunConfig
from common.data import TextDataset, load_builtin, load_site_file, partition
from common.data.holdout import held_out
from common.data.owndata import own_sites
from common.features import PUBLIC_CACHE, batchable
from common.privacy.ledger import row_digest
from common.task import Task
from common.training import Batchable


@dataclass(frozen=True)
class SiteData:
    """The site's training rows and its held-out share (empty at fraction 0), tokenized,
    with the digests of their rows."""

    train: Batchable
    held_out: Batchable
    digest: bytes
    held_out_digest: bytes


@dataclass(frozen=True)
class Holdout:
    """Which rows a site keeps out of training: a keyed hash under ``key`` below
    ``fraction`` (0: none)."""

    key: bytes
    fraction: float


def data_key(
    settings: SiteSettings, config: RunConfig, task: Task, holdout: Holdout
) -> tuple[Any, ...]:
    if settings.data_path is not None:
        path = Path(settings.data_path)
        stat = path.stat() if path.is_file() else None
        source: tuple[Any, ...] = (
            "file",
            str(path.resolve()),
            stat.st_mtime_ns if stat else None,
            stat.st_size if stat else None,
            settings.text_column,
            settings.label_column,
        )
    else:
        source = (
            "partition",
            config.dataset,
            config.site_column,
            config.partition,
            config.dirichlet_alpha,
            config.min_partition_size,
            config.seed,
            settings.partition_id,
            settings.num_partitions,
        )
    # Features (minilm-probe) stay on the site's disk; a simulated bundled data set's are
    # public and shared by every run on the machine.
    if settings.data_path is None and config.bundled:
        cache: str | None = str(PUBLIC_CACHE)
    else:
        cache = None if settings.state_dir is None else str(settings.state_dir / "features")
    return (*source, cache, task, holdout.key, holdout.fraction)


def _rows(key: tuple[Any, ...]) -> TextDataset:
    """The site's rows, before the held-out split."""
    task: Task = key[-3]
    if key[0] == "file":
        _, path, _, _, text_col, label_col = key[:6]
        return load_site_file(
            path, label_names=task.labels, text_column=text_col, label_column=label_col
        )
    _, dataset, site_column, scheme, alpha, min_size, seed, pid, num = key[:9]
    if not 0 <= pid < num:
        raise SiteConfigError(f"partition-id {pid} is outside 0..{num - 1}")
    if dataset in ("rotten-tomatoes", "20newsgroups"):
        full = load_builtin(dataset, "train", seed=seed)
        parts = partition(full, scheme, num, seed=seed, alpha=alpha, min_size=min_size)
        return full.subset(parts[pid])
    sites = own_sites(dataset, task, site_column, scheme, num, seed, alpha, min_size)
    return sites.data.subset(sites.parts[pid])


# Simulated sites share a Ray actor (about 25 per actor at 50 sites): keep the sites an
# actor serves, not the last 4 (reloading cost a 50-site plain round 0.5 s). The whole
# training split tokenized is about 5 MB.
@lru_cache(maxsize=256)
def _load(key: tuple[Any, ...]) -> SiteData:
    """The site's tokenized rows, split, and their digests (cached per process)."""
    data = _rows(key)
    task: Task = key[-3]
    mask = held_out(data.texts, key[-2], key[-1])
    train, kept = data.subset(~mask), data.subset(mask)
    if len(train) == 0:
        raise SiteConfigError("the site has no training rows left after its held-out share")

    cache = key[-4]

    def tokenized(part: TextDataset) -> Batchable:
        return batchable(
            part.texts,
            part.labels,
            max_length=task.max_length,
            preset=task.model_preset,
            cache=None if cache is None else Path(cache),
        )

    return SiteData(
        train=tokenized(train),
        held_out=tokenized(kept),
        digest=row_digest(train.texts, train.labels.tolist()),
        held_out_digest=row_digest(kept.texts, kept.labels.tolist()),
    )


def load_site_data(
    settings: SiteSettings, config: RunConfig, task: Task, holdout: Holdout
) -> SiteData:
    return _load(data_key(settings, config, task, holdout))
