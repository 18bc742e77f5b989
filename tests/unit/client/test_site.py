"""A site's round: calibration once per run, the budget filter, persistence, no-DP mode."""

from __future__ import annotations

import math

import pytest
import torch

from client.site import SiteConfigError, SiteSettings, SiteState, run_round
from common.config import RunConfig
from common.model import build_model
from common.privacy.accounting import PrivacyError
from common.wire import RoundPlan
from tests.unit.privacy.test_accounting import reference_epsilon

# Small and fast: 20 natural partitions of Rotten Tomatoes (~500 snippets each).
CFG = RunConfig(
    num_server_rounds=2,
    max_length=16,
    batch_size=64,
    epsilon=4.0,
    clip_norm=1.0,
    learning_rate=0.5,
)
NODE = {"partition-id": 3, "num-partitions": 20}


def _global(cfg: RunConfig) -> dict[str, torch.Tensor]:
    return build_model(cfg.model_spec(2), seed=0).trainable_state()


def _round(rnd: int, state: SiteState, cfg: RunConfig = CFG, node: dict[str, object] = NODE):
    settings = SiteSettings.from_node_config(node, cfg)
    return run_round(
        RoundPlan(rnd, cfg),
        _global(cfg),
        settings,
        state,
        generator=torch.Generator().manual_seed(rnd),
    )


def test_budget_is_spent_exactly_at_the_last_planned_round_then_refused() -> None:
    state = SiteState.from_json(None)

    r1, u1 = _round(1, state)
    # The site restarts between rounds: only the persisted JSON survives.
    state = SiteState.from_json(state.to_json())
    r2, u2 = _round(2, state)
    saved = state.to_json()
    r3, u3 = _round(3, state)

    assert r1.status == r2.status == "ok" and u1 is not None and u2 is not None
    assert 0 < r1.epsilon < r2.epsilon <= CFG.epsilon
    assert r2.epsilon == pytest.approx(CFG.epsilon, rel=0.01)
    # Independent accountant from the reported mechanism parameters.
    assert r2.epsilon == pytest.approx(
        reference_epsilon(r2.noise_multiplier, r2.sample_rate, r2.total_steps), rel=0.02
    )
    assert r3.status == "refused" and u3 is None
    assert r3.reason.startswith("budget 4 would reach")
    assert r3.epsilon == pytest.approx(r2.epsilon)
    assert state.to_json() == saved  # a refusal spends nothing


def test_noise_is_calibrated_once_per_run() -> None:
    state = SiteState.from_json(None)
    r1, _ = _round(1, state)
    r2, _ = _round(2, state)
    assert r1.noise_multiplier == r2.noise_multiplier > 0
    assert r1.steps == r2.steps == r1.total_steps
    assert r2.total_steps == 2 * r1.steps


def test_the_sites_own_budget_wins_over_the_federations() -> None:
    state = SiteState.from_json(None)
    report, _ = _round(1, state, node={**NODE, "epsilon": 1.0})
    assert report.budget == 1.0 and report.epsilon <= 1.0


def test_delta_not_below_one_over_n_fails_closed() -> None:
    with pytest.raises(PrivacyError, match="1/n"):
        _round(1, SiteState.from_json(None), node={**NODE, "delta": 0.01})


def test_no_dp_mode_is_labelled() -> None:
    cfg = RunConfig(**{**CFG.model_dump(), "dp": False})
    report, update = _round(1, SiteState.from_json(None), cfg=cfg)
    assert report.status == "ok" and update is not None
    assert report.dp is False and math.isnan(report.epsilon)


@pytest.mark.parametrize(
    "node",
    [{}, {"partition-id": 1}, {"data-path": "x.csv", "epsilon": -1.0}, {**NODE, "site-id": "a b"}],
)
def test_bad_site_settings_are_named(node: dict[str, object]) -> None:
    with pytest.raises(SiteConfigError):
        SiteSettings.from_node_config(node, CFG)
