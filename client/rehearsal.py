"""A rehearsal (run config ``rehearsal = true``): every site trains and evaluates on a
small public stand-in instead of its own file, and spends nothing, so a new
federation can try the whole path (TLS, node authentication, secure aggregation, the
coordinator's outputs) before it touches real data.

The stand-in is public by construction: rows of the bundled data set whose labels the
task has, or, for a task of the federation's own, synthetic rows made of the task's
declared label names and filler words. The site never opens its data file, its
held-out pin or its ledger for writing; its reports say REHEARSAL and claim no
epsilon (no private row was used). The mechanism is the one a real run would use
(the same clipping and the noise of a fresh run at the plan's target), so the timings
and the model's behaviour are those of a real run's first rounds on public data.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from common.data import TextDataset, load_builtin
from common.features import PUBLIC_CACHE, batchable
from common.task import Task, bundled_task, bundled_tasks
from common.training import Batchable

STANDIN_ROWS = 256  # training rows per site
STANDIN_HELD_OUT = 64  # evaluation rows per site
_FILLER = (
    "the", "a", "report", "note", "today", "item", "case", "record", "entry", "about",
    "with", "from", "after", "before", "new", "old", "first", "second", "short", "long",
)  # fmt: skip


def _bundled_for(task: Task) -> str | None:
    """The bundled data set whose labels are the task's, if any."""
    for name in bundled_tasks():
        if bundled_task(name).labels == task.labels:
            return name
    return None


def _seed(site_id: str, what: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{what}\n{site_id}".encode()).digest()[:8], "big")


def standin_rows(task: Task, site_id: str, n: int, *, held_out: bool = False) -> TextDataset:
    """``n`` public rows for ``site_id``: a bundled data set's (its test split for the
    held-out share, its training split otherwise), or synthetic rows of the task's
    labels. Different sites draw different rows; the same site the same ones."""
    rng = np.random.default_rng(_seed(site_id, "held-out" if held_out else "train"))
    bundled = _bundled_for(task)
    if bundled is not None:
        full = load_builtin(bundled, "test" if held_out else "train", seed=0)
        pick = rng.choice(len(full), size=min(n, len(full)), replace=False)
        return full.subset(np.sort(pick))
    labels = rng.integers(0, len(task.labels), size=n)
    texts = tuple(
        " ".join([str(task.labels[k]).replace("_", " "), *rng.choice(_FILLER, size=6).tolist()])
        for k in labels
    )
    return TextDataset(
        name=f"{task.name}-rehearsal",
        texts=texts,
        labels=labels,
        label_names=task.labels,
        groups=None,
    )


@lru_cache(maxsize=64)
def standin(task: Task, site_id: str, *, held_out: bool = False) -> Batchable:
    """The stand-in rows, tokenized (features cached machine-wide: they are public)."""
    rows = standin_rows(
        task, site_id, STANDIN_HELD_OUT if held_out else STANDIN_ROWS, held_out=held_out
    )
    return batchable(
        rows.texts,
        rows.labels,
        max_length=task.max_length,
        preset=task.model_preset,
        cache=PUBLIC_CACHE,
    )
