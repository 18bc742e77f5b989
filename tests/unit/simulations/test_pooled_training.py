"""The honest learning-rate choice: candidates in worker processes score as in this one,
a diverging rate is dropped, all diverging is an error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.data import load_builtin
from common.text import encode
from common.training import Batchable
from simulations.pooled_training import choose_learning_rate

TINY = {"num-server-rounds": 2, "max-length": 16, "batch-size": 64}


def _batch(n: int) -> Batchable:
    data = load_builtin("rotten-tomatoes", "train").subset(np.arange(n))
    return Batchable.from_encoded(encode(data.texts, 16), data.labels)


def test_candidates_in_worker_processes_score_as_in_this_one() -> None:
    # The default on a multi-core CPU: one process per candidate, one thread each.
    cfg = RunConfig().with_overrides({**TINY, "num-server-rounds": 1})
    batch = _batch(200)
    here = choose_learning_rate(cfg, batch, 2, [1e-3, 3e-3], device=torch.device("cpu"))
    there = choose_learning_rate(cfg, batch, 2, [1e-3, 3e-3], device=torch.device("cpu"), workers=2)
    assert there[0] == here[0]
    for a, b in zip(here[1], there[1], strict=True):
        assert a["learning_rate"] == b["learning_rate"]
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_a_diverging_rate_is_dropped_and_all_diverging_is_an_error() -> None:
    cfg = RunConfig().with_overrides(TINY)
    batch = _batch(200)
    lr, results = choose_learning_rate(cfg, batch, 2, [1e30, 0.5], device=torch.device("cpu"))
    assert lr == 0.5
    assert results[0]["diverged"] is True and results[0]["val_accuracy"] is None
    with pytest.raises(RuntimeError, match="diverged at every learning rate"):
        choose_learning_rate(cfg, batch, 2, [1e30], optimizer="sgd", device=torch.device("cpu"))
