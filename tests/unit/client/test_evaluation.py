"""A site's evaluation round against a coordinator that picks the plan (issue 14): the
site's own evaluation budget caps what a run may ask, only the rounds the plan names
evaluate, each release is charged once, a deployed site never drops its noise, and a
site whose held-out rows may have been trained on does not evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from client.evaluation import NOISE_IGNORED, evaluate_round
from client.round import SiteState, run_round
from client.settings import SiteSettings
from common.config import RunConfig
from common.messages import RoundPlan
from common.model import build_model, model_spec
from common.privacy.identity import init_state
from common.privacy.ledger import EVAL_SCOPE, LEDGER_FILE, read_ledger
from common.secure_random import SecureRandom
from common.task import run_task
from tests.support.deploy_folders import make_site_data


def _cfg(tmp_path: Path, **kw: Any) -> RunConfig:
    base = {"num_server_rounds": 1, "max_length": 16, "batch_size": 32, "epsilon": 4.0,
            "evaluation": "federated", "sites_dir": str(tmp_path / "sites")}  # fmt: skip
    return RunConfig(**{**base, **kw})


def _deployed(tmp_path: Path, cfg: RunConfig, **node: Any) -> SiteSettings:
    state = tmp_path / "site" / "state"
    if not state.exists():
        init_state(state, site_id="site-a")
    data = make_site_data(tmp_path / "site.csv", rows=200)
    config = {"data-path": str(data), "data-size": 200, "epsilon": 8.0, "site-id": "site-a",
              "state-dir": str(state), **node}  # fmt: skip
    return SiteSettings.from_node_config(config, cfg)


def _evaluate(settings: SiteSettings, cfg: RunConfig, rnd: int = 1, run_id: str = "r"):  # type: ignore[no-untyped-def]
    arrays = build_model(model_spec(run_task(cfg)), seed=0).trainable_state()
    plan = RoundPlan(rnd, cfg, evaluate=True)
    return evaluate_round(plan, arrays, settings, run_id=run_id, rng=SecureRandom.fresh())


def _evals(settings: SiteSettings) -> list[Any]:
    assert settings.state_dir is not None
    path = settings.state_dir / LEDGER_FILE
    entries = read_ledger(path, missing_ok=True)
    return [e for e in entries if e.budget_scope == EVAL_SCOPE]


def test_a_deployed_site_keeps_its_noise_when_the_plan_turns_it_off(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, eval_noise=False)
    settings = _deployed(tmp_path, cfg)

    report, counts = _evaluate(settings, cfg)

    assert report.status == "ok" and report.dp and report.reason == NOISE_IGNORED
    assert report.noise_multiplier > 1 and counts is not None
    [entry] = _evals(settings)
    assert entry.sample_rate == 1.0 and entry.steps == 1 and entry.budget == 1.0


def test_a_run_may_not_ask_more_than_the_sites_evaluation_budget(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, eval_epsilon=3.0)
    settings = _deployed(tmp_path, cfg, **{"eval-epsilon": 2.0})

    report, counts = _evaluate(settings, cfg)

    assert report.status == "refused" and counts is None
    assert "above this site's evaluation budget 2" in report.reason
    assert _evals(settings) == []


def test_only_the_rounds_the_plan_names_evaluate_and_each_only_once(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, num_server_rounds=4, eval_every=2)  # evaluations after 2 and 4
    settings = _deployed(tmp_path, cfg)

    extra, _ = _evaluate(settings, cfg, rnd=3)
    first, _ = _evaluate(settings, cfg, rnd=2)
    replay, _ = _evaluate(settings, cfg, rnd=2)
    last, _ = _evaluate(settings, cfg, rnd=4)
    beyond, _ = _evaluate(settings, cfg, rnd=4)

    assert extra.status == "refused" and "not an evaluation round" in extra.reason
    assert (first.status, last.status) == ("ok", "ok")
    assert replay.status == "refused" and "already released" in replay.reason
    assert beyond.status == "refused" and "already released" in beyond.reason
    assert [e.round for e in _evals(settings)] == [1, 2]


@pytest.mark.filterwarnings("ignore")
def test_a_site_that_trained_on_all_its_rows_does_not_evaluate_them(tmp_path: Path) -> None:
    # A simulated site first trains in a centrally evaluated run (nothing held out),
    # then a run asks it for a private evaluation: the rows it would hold out were
    # trained on, so parallel composition would not hold; it refuses.
    central = _cfg(tmp_path, evaluation="central", dataset="rotten-tomatoes")
    node = {"partition-id": 3, "num-partitions": 20}
    settings = SiteSettings.from_node_config(node, central)
    arrays = build_model(model_spec(run_task(central)), seed=0).trainable_state()
    trained, _ = run_round(RoundPlan(1, central), arrays, settings, SiteState(), run_id="a",
                           rng=SecureRandom(bytes(32)))  # fmt: skip
    assert trained.status == "ok"
    federated = _cfg(tmp_path)
    report, counts = _evaluate(
        SiteSettings.from_node_config(node, federated), federated, run_id="b"
    )
    assert report.status == "refused" and counts is None
    assert "may have been trained on" in report.reason
    assert torch.is_tensor(arrays["head.weight"])
