"""What a run keeps for a new run to take over (server/resume.py): written and read
back exactly, every damaged or foreign piece refused by name, and the new run's plan
the dead run's with only the operational keys of its own."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from common.config import RunConfig
from common.outputs import RunOutputError
from server.optimizers import ServerOptimizer
from server.resume import (
    RUN_FILE,
    STATE_FILE,
    Resumable,
    load,
    record_run,
    resumed_config,
    save_state,
)

WEIGHTS = {"head.weight": torch.randn(2, 4), "head.bias": torch.zeros(2)}


def _state(rnd: int = 1, run_id: str = "11") -> Resumable:
    optimizer = ServerOptimizer("fedadam")
    weights = optimizer.step(WEIGHTS, {k: torch.ones_like(v) for k, v in WEIGHTS.items()})
    sampler = random.Random(3)
    sampler.sample(range(10), 4)
    return Resumable(
        round=rnd,
        run_id=run_id,
        weights=weights,
        shipped={k: v * 0.5 for k, v in weights.items()},
        optimizer=optimizer.state(),
        sampler=sampler.getstate(),
        banned={1002: 1},
        names={1000: "site-0", 1002: "site-2"},
    )


def _dead_run(tmp_path: Path, rounds: int = 3, done: int = 1) -> tuple[Path, Resumable]:
    from common.outputs import RoundRecord, RunSummary, final_record, write_summary

    out = tmp_path / "dead"
    cfg = RunConfig(num_server_rounds=rounds, out_dir=str(out), epsilon=2.0)
    record_run(out, cfg, "11")
    rows = tuple(
        RoundRecord(round=r, sites_asked=3, trained=3, accuracy=0.5, loss=0.7)
        for r in range(1, done + 1)
    )
    write_summary(
        out,
        RunSummary(
            dp=True, mode="federated-dp", config=cfg.to_user_config(), rounds=rows, sites=(),
            final=final_record(rows, ()), complete=False,
        ),
    )  # fmt: skip
    state = _state(done)
    save_state(out, state)
    return out, state


def test_the_state_reads_back_exactly(tmp_path: Path) -> None:
    out, state = _dead_run(tmp_path)
    dead, got, rows = load(out)
    assert dead.num_server_rounds == 3 and [r.round for r in rows] == [1]
    assert got.round == 1 and got.run_id == "11"
    assert all(torch.equal(got.weights[k], state.weights[k]) for k in WEIGHTS)
    assert got.shipped is not None and state.shipped is not None
    assert all(torch.equal(got.shipped[k], state.shipped[k]) for k in WEIGHTS)
    assert got.banned == {1002: 1} and got.names == state.names
    # The sampler and the optimizer go on exactly as the dead run's would have.
    a, b = random.Random(), random.Random()
    a.setstate(state.sampler)
    b.setstate(got.sampler)
    assert a.sample(range(100), 5) == b.sample(range(100), 5)
    mine, theirs = ServerOptimizer("fedadam"), ServerOptimizer("fedadam")
    mine.load_state(state.optimizer, WEIGHTS)
    theirs.load_state(got.optimizer, WEIGHTS)
    step = {k: torch.full_like(v, 0.3) for k, v in WEIGHTS.items()}
    assert all(
        torch.equal(mine.step(WEIGHTS, step)[k], theirs.step(WEIGHTS, step)[k]) for k in WEIGHTS
    )


def test_the_new_run_takes_the_dead_runs_plan_and_only_its_own_operational_keys(
    tmp_path: Path,
) -> None:
    out, _ = _dead_run(tmp_path)
    dead, got, _ = load(out)
    mine = RunConfig(resume=str(out), out_dir=str(tmp_path / "new"), epsilon=8.0, min_sites=3)
    cfg = resumed_config(mine, dead, got)
    assert cfg.epsilon == 2.0 and cfg.num_server_rounds == 3  # the dead run's plan
    assert cfg.out_dir == str(tmp_path / "new") and cfg.min_sites == 3
    assert cfg.resumes_run == "11" and cfg.resume_round == 1
    # Resumed again: the sites hear of every run of the chain.
    again = resumed_config(cfg, cfg, Resumable(**{**vars(got), "round": 2, "run_id": "12"}))
    assert again.resumed_runs == ("11", "12") and again.resume_round == 2


def test_a_finished_run_has_nothing_to_resume(tmp_path: Path) -> None:
    out, _ = _dead_run(tmp_path, rounds=3, done=3)
    dead, got, _ = load(out)
    with pytest.raises(RunOutputError, match="finished all its 3 rounds; nothing to resume"):
        resumed_config(RunConfig(resume=str(out)), dead, got)


def test_missing_damaged_and_foreign_pieces_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(RunOutputError, match="no such run folder"):
        load(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunOutputError, match=f"no {RUN_FILE}"):
        load(empty)
    out, _ = _dead_run(tmp_path)
    state = out / STATE_FILE
    blob = state.read_bytes()
    state.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(RunOutputError, match=r"resume\.safetensors: damaged"):
        load(out)
    state.unlink()
    with pytest.raises(RunOutputError, match="died before its first round ended"):
        load(out)
    save_state(out, _state(run_id="99"))
    with pytest.raises(RunOutputError, match="belongs to run 99, not to run 11"):
        load(out)
    save_state(out, _state(rnd=2))  # the summary holds round 1 only
    with pytest.raises(RunOutputError, match=r"does not hold rounds 1..2"):
        load(out)
    (out / RUN_FILE).write_text(json.dumps({"run_id": "11", "config": {"evil": 1}}))
    with pytest.raises(RunOutputError, match="unknown config key 'evil'"):
        load(out)


def test_optimizer_state_that_does_not_fit_the_weights_is_refused() -> None:
    with pytest.raises(ValueError, match=r"optimizer state m/head\.bias does not fit"):
        ServerOptimizer("fedavgm").load_state({"m": {"head.bias": torch.zeros(3)}}, WEIGHTS)
