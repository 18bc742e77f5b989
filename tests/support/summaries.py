"""Run summaries for tests that need one without running anything: valid
``RunSummary`` values (common/outputs.py) with the numbers a test chooses."""

from __future__ import annotations

from typing import Any

from common.config import RunConfig
from common.outputs import (
    CENTRAL_MODE,
    CentralRecord,
    RoundRecord,
    RunSummary,
    Selection,
    SiteSummary,
    final_record,
)


def site(
    name: str, epsilon: float | None, *, delta: float | None = 1e-5, budget: float = 4.0
) -> SiteSummary:
    return SiteSummary(
        site=name,
        epsilon=epsilon,
        delta=delta if epsilon is not None else None,
        budget=budget if epsilon is not None else None,
        dp=epsilon is not None,
        rounds_trained=1,
    )


def federated(
    accuracy: float,
    *,
    dp: bool = True,
    sites: tuple[SiteSummary, ...] = (),
    rounds: int = 1,
    **config: Any,
) -> RunSummary:
    """A federated run whose every round scored ``accuracy``."""
    cfg = RunConfig().with_overrides({"num-server-rounds": rounds, "dp": dp, **config})
    records = tuple(
        RoundRecord(
            round=r, sites_asked=len(sites), trained=len(sites), accuracy=accuracy, loss=0.6
        )
        for r in range(1, rounds + 1)
    )
    return RunSummary(
        dp=dp,
        mode="federated-dp" if dp else "federated-no-dp",
        config=cfg.to_user_config(),
        rounds=records,
        sites=sites,
        final=final_record(records, sites),
    )


def central(accuracy: float, *, learning_rate: float = 1e-3, **config: Any) -> RunSummary:
    """A central run that scored ``accuracy`` after one round."""
    cfg = RunConfig().with_overrides({"num-server-rounds": 1, **config})
    records = (RoundRecord(round=1, accuracy=accuracy, loss=0.5, train_loss=0.4),)
    return RunSummary(
        dp=False,
        mode=CENTRAL_MODE,
        config=cfg.to_user_config(),
        rounds=records,
        sites=(),
        final=final_record(records, ()),
        central=CentralRecord(
            optimizer="adam",
            learning_rate=learning_rate,
            batch_size=cfg.batch_size,
            epochs=1,
            epochs_per_round=1,
            train_examples=10,
            test_examples=10,
            max_train=None,
            selection=Selection(candidates=(), holdout_fraction=None, criterion="given"),
            wall_seconds=1.0,
            note="test",
        ),
    )
