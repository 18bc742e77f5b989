"""A site's data: its own file (deployment) or its share of a bundled data set
(simulation), validated, tokenized and fingerprinted once per process (simulated sites
share Ray actors). Nothing here leaves the site.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from client.settings import SiteConfigError, SiteSettings, read_site_file
from common.config import RunConfig
from common.data import load_builtin, partition
from common.privacy.ledger import row_digest
from common.text import encode
from common.training import Batchable


def data_key(settings: SiteSettings, config: RunConfig) -> tuple[Any, ...]:
    if settings.data_path is not None:
        path = Path(settings.data_path)
        stat = path.stat() if path.is_file() else None
        return (
            "file",
            str(path.resolve()),
            stat.st_mtime_ns if stat else None,
            stat.st_size if stat else None,
            config.dataset,
            settings.text_column,
            settings.label_column,
            config.max_length,
        )
    return (
        "partition",
        config.dataset,
        config.partition,
        config.dirichlet_alpha,
        config.min_partition_size,
        config.seed,
        settings.partition_id,
        settings.num_partitions,
        config.max_length,
    )


# Simulated sites share a Ray actor (about 25 per actor at 50 sites): keep the sites an
# actor serves, not the last 4 (reloading cost a 50-site plain round 0.5 s). The whole
# training split tokenized is about 5 MB.
@lru_cache(maxsize=256)
def _load(key: tuple[Any, ...]) -> tuple[Batchable, bytes]:
    """The site's tokenized examples and the digest of its rows (cached per process:
    simulated sites share actors)."""
    if key[0] == "file":
        _, path, _, _, dataset, text_col, label_col, max_length = key
        data = read_site_file(path, dataset, text_col, label_col)
    else:
        _, dataset, scheme, alpha, min_size, seed, pid, num, max_length = key
        full = load_builtin(dataset, "train", seed=seed)
        parts = partition(full, scheme, num, seed=seed, alpha=alpha, min_size=min_size)
        if not 0 <= pid < num:
            raise SiteConfigError(f"partition-id {pid} is outside 0..{num - 1}")
        data = full.subset(parts[pid])
    digest = row_digest(data.texts, data.labels.tolist())
    return Batchable.from_encoded(encode(data.texts, max_length), data.labels), digest


def load_site_data(settings: SiteSettings, config: RunConfig) -> tuple[Batchable, bytes]:
    return _load(data_key(settings, config))
