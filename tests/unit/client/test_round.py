"""A site's round: calibration once per run, the budget filter over its signed ledger
(across rounds, restarts and runs), and the labelled no-DP mode."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from client.round import SiteState, run_round, train_round
from client.settings import SiteConfigError, SiteSettings
from common.config import RunConfig
from common.messages import RoundPlan, SecAggSetup, SiteReport, TrainReply, TrainRequest
from common.model import build_model, model_spec
from common.privacy.audit import verify_ledger
from common.privacy.errors import LedgerError, PrivacyError
from common.privacy.identity import load_public_key
from common.privacy.ledger import LEDGER_FILE
from common.secagg.params import SecAggParams
from tests.support.reference import reference_epsilon

NODE = {"partition-id": 3, "num-partitions": 20}


@pytest.fixture
def cfg(tmp_path: Path) -> RunConfig:
    # Small and fast: 20 natural partitions of Rotten Tomatoes (~500 snippets each).
    return RunConfig(
        num_server_rounds=2,
        max_length=16,
        batch_size=64,
        epsilon=4.0,
        clip_norm=1.0,
        learning_rate=0.5,
        sites_dir=str(tmp_path / "sites"),
    )


def _round(
    rnd: int, state: SiteState, cfg: RunConfig, node: dict[str, Any] = NODE, run_id: str = "run-a"
) -> tuple[SiteReport, dict[str, torch.Tensor] | None]:
    settings = SiteSettings.from_node_config(node, cfg)
    return run_round(
        RoundPlan(rnd, cfg),
        build_model(model_spec(cfg, 2), seed=0).trainable_state(),
        settings,
        state,
        run_id=run_id,
        generator=torch.Generator().manual_seed(rnd),
    )


def _ledger(cfg: RunConfig) -> Path:
    return Path(cfg.sites_dir) / "site-3" / LEDGER_FILE


def test_budget_is_spent_exactly_at_the_last_planned_round_then_refused(cfg: RunConfig) -> None:
    state = SiteState()

    r1, u1 = _round(1, state, cfg)
    r2, u2 = _round(2, state, cfg)
    before = _ledger(cfg).read_bytes()
    r3, u3 = _round(3, state, cfg)

    assert r1.status == r2.status == "ok" and u1 is not None and u2 is not None
    assert 0 < r1.epsilon < r2.epsilon <= cfg.epsilon
    assert r2.epsilon == pytest.approx(cfg.epsilon, rel=0.01)
    # Independent accountant from the reported mechanism parameters.
    assert r2.epsilon == pytest.approx(
        reference_epsilon(r2.noise_multiplier, r2.sample_rate, r2.total_steps), rel=0.02
    )
    assert r3.status == "refused" and u3 is None
    assert r3.reason.startswith("budget 4 would reach")
    assert r3.epsilon == pytest.approx(r2.epsilon)
    assert _ledger(cfg).read_bytes() == before  # a refusal spends and writes nothing


def test_every_trained_round_is_in_the_signed_ledger_before_the_reply(cfg: RunConfig) -> None:
    state = SiteState()
    _round(1, state, cfg)
    r2, _ = _round(2, state, cfg)
    key = load_public_key(Path(cfg.sites_dir) / "site-3" / "identity.pub")
    entries, findings = verify_ledger(_ledger(cfg), key)
    assert findings == []
    assert [e.round for e in entries] == [1, 2]
    assert (
        entries[-1].entry_hash() == r2.ledger_head and entries[-1].signature == r2.ledger_signature
    )
    assert entries[-1].epsilon_dataset == pytest.approx(r2.epsilon)


def test_a_restarted_site_rebuilds_its_spend_from_the_ledger(cfg: RunConfig) -> None:
    r1, _ = _round(1, SiteState(), cfg)
    # Restart: Flower's context.state is gone; only the ledger on disk remains.
    r2, _ = _round(2, SiteState(), cfg)
    assert r2.epsilon > r1.epsilon
    assert r2.total_steps == 2 * r1.steps
    assert r2.epsilon == pytest.approx(cfg.epsilon, rel=0.01)


def test_a_second_run_on_the_same_data_starts_from_the_first_runs_spend(cfg: RunConfig) -> None:
    # Prepare: run A trains only one of its two planned rounds.
    a1, _ = _round(1, SiteState(), cfg, run_id="run-a")

    # Execute: run B, same data set and ledger, plans two rounds.
    b1, _ = _round(1, SiteState(), cfg, run_id="run-b")
    b2, _ = _round(2, (state := SiteState()), cfg, run_id="run-b")
    b3, _ = _round(3, state, cfg, run_id="run-b")

    # Assert: B composes after A and stops at the budget.
    assert b1.epsilon > a1.epsilon
    assert b2.epsilon == pytest.approx(cfg.epsilon, rel=0.01) and b2.epsilon <= cfg.epsilon
    assert b3.status == "refused"
    assert b1.noise_multiplier > a1.noise_multiplier  # less budget left: more noise


def test_an_exhausted_budget_refuses_a_new_run(cfg: RunConfig) -> None:
    state = SiteState()
    _round(1, state, cfg)
    _round(2, state, cfg)
    report, update = _round(1, SiteState(), cfg, run_id="run-b")
    assert report.status == "refused" and update is None
    assert report.reason.startswith("no noise fits this plan")


def test_a_torn_ledger_fails_closed_and_is_left_alone(cfg: RunConfig) -> None:
    _round(1, SiteState(), cfg)
    with _ledger(cfg).open("a") as f:
        f.write('{"schema": 1, "site_id": "site-3", "round"')  # a crash mid-write
    before = _ledger(cfg).read_bytes()
    with pytest.raises(LedgerError, match="torn"):
        _round(2, SiteState(), cfg)
    assert _ledger(cfg).read_bytes() == before


def test_the_sites_own_budget_wins_over_the_federations(cfg: RunConfig) -> None:
    report, _ = _round(1, SiteState(), cfg, node={**NODE, "epsilon": 1.0})
    assert report.budget == 1.0 and report.epsilon <= 1.0


def test_delta_not_below_one_over_n_fails_closed(cfg: RunConfig) -> None:
    with pytest.raises(PrivacyError, match="1/n"):
        _round(1, SiteState(), cfg, node={**NODE, "delta": 0.01})


def test_dp_without_a_ledger_folder_fails_closed(cfg: RunConfig) -> None:
    with pytest.raises(SiteConfigError, match="state-dir"):
        _round(1, SiteState(), cfg.with_overrides({"sites-dir": ""}))


def test_no_dp_mode_is_labelled(cfg: RunConfig) -> None:
    report, update = _round(1, SiteState(), cfg.with_overrides({"dp": False}))
    assert report.status == "ok" and update is not None
    assert report.dp is False and math.isnan(report.epsilon)
    assert not _ledger(cfg).exists()


@pytest.mark.parametrize(
    "node",
    [{}, {"partition-id": 1}, {"data-path": "x.csv", "epsilon": -1.0}, {**NODE, "site-id": "a b"}],
)
def test_bad_site_settings_are_named(node: dict[str, object], cfg: RunConfig) -> None:
    with pytest.raises(SiteConfigError):
        SiteSettings.from_node_config(node, cfg)


def test_a_deployed_site_keeps_dp_and_its_own_budget_whatever_the_plan(
    cfg: RunConfig, tmp_path: Path
) -> None:
    # A deployed site (data-path) with its own budget and ledger folder.
    data = tmp_path / "site.csv"
    data.write_text(
        "text,label\n"
        + "".join(f"review {i},{'fresh' if i % 2 else 'rotten'}\n" for i in range(400))
    )
    node = {
        "data-path": str(data),
        "site-id": "bank-a",
        "epsilon": 2.0,
        "state-dir": str(tmp_path / "bank"),
    }

    # The coordinator asks for no DP: refused.
    with pytest.raises(SiteConfigError, match="requires DP"):
        _round(1, SiteState(), cfg.with_overrides({"dp": False}), node=node)
    # The coordinator's epsilon (4.0) and delta do not apply to this site.
    report, _ = _round(1, SiteState(), cfg.with_overrides({"delta": 1e-3}), node=node)
    assert report.budget == 2.0 and report.delta == 1e-5 and report.epsilon <= 2.0
    # Without its own budget a deployed site does not start.
    with pytest.raises(SiteConfigError, match="own 'epsilon'"):
        SiteSettings.from_node_config({"data-path": str(data)}, cfg)


def test_the_example_count_leaves_only_inside_the_secure_sum(cfg: RunConfig) -> None:
    # Prepare: a site that trains (round 1) and one whose budget refuses (a new run once
    # the budget is spent), each answered with and without secure aggregation.
    settings = SiteSettings.from_node_config(NODE, cfg)
    arrays = build_model(model_spec(cfg, 2), seed=0).trainable_state()
    params = SecAggParams.create(range(1, 3), ring_bits=12, vector_length=4, session="s")

    def answer(rnd: int, run_id: str, secure: bool) -> TrainReply:
        setup = SecAggSetup(params, 1, 7) if secure else None
        request = TrainRequest(RoundPlan(rnd, cfg), arrays, setup)
        state = states.setdefault((run_id, secure), SiteState())
        return train_round(request, settings, state, run_id=f"{run_id}-{secure}")[0]

    states: dict[tuple[str, bool], SiteState] = {}
    plain_ok = answer(1, "a", secure=False)
    answer(2, "a", secure=False)  # the whole budget is spent now
    refused_plain = answer(1, "b", secure=False)
    refused_secure = answer(1, "c", secure=True)

    # Assert
    assert plain_ok.report.status == "ok" and plain_ok.report.num_examples > 0
    assert refused_plain.report.status == refused_secure.report.status == "refused"
    assert refused_plain.report.num_examples == plain_ok.report.num_examples
    assert refused_secure.report.num_examples == 0
