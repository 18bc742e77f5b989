"""Secure aggregation through the real ServerApp and ClientApp on the in-process grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from client.app import app as client_app
from common.arrays import flatten
from common.config import RunConfig
from common.model import build_model, model_spec
from common.quantize import error_bound
from common.secagg.encoding import encoding_spec
from common.secure_random import SecureRandom
from common.task import run_task
from server.app import app as server_app
from tests.support.inprocess_grid import NODE_ID_OFFSET, InProcessGrid
from tests.support.runs import SMALL_RUN

SMALL = {
    **SMALL_RUN,
    "num-server-rounds": 1,
    "server-optimizer": "fedavg",
    "server-ema": 0.0,
}


def _grid(out: Path, num_nodes: int, **config: object) -> InProcessGrid:
    """Sites hold 1/20 of the training set each (about 500 examples): fast rounds."""
    return InProcessGrid(
        client_app,
        num_nodes=num_nodes,
        node_configs=[{"partition-id": i, "num-partitions": 20} for i in range(num_nodes)],
        run_config={**SMALL, **config, "out-dir": str(out)},
    )


def _run(out: Path, num_nodes: int, **config: object) -> tuple[dict, InProcessGrid]:
    grid = _grid(out, num_nodes, **config)
    return _go(grid, out), grid


def _go(grid: InProcessGrid, out: Path) -> dict:
    server_app(grid, grid.server_context())
    return json.loads((out / "summary.json").read_text())


def _initial(cfg: RunConfig) -> dict[str, torch.Tensor]:
    spec = model_spec(run_task(cfg))
    return build_model(spec, seed=cfg.seed).trainable_state()


def _round_update(out: Path, cfg: RunConfig, rnd: int = 1) -> np.ndarray:
    """The global model after ``rnd`` minus the initial one (fedavg, lr 1, no EMA)."""
    saved = load_file(out / "checkpoints" / f"round-{rnd:03d}.safetensors")
    initial = _initial(cfg)
    return flatten({k: saved[k] for k in initial}) - flatten(initial)


def test_secure_mean_equals_the_plain_mean_within_the_quantization_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the same key for the sites' sampling and noise in both runs (the
    # in-process grid runs the sites here, so fixing the secure source fixes them).
    monkeypatch.setattr(SecureRandom, "fresh", classmethod(lambda cls: cls(bytes(32))))
    config = {"update-clip-norm": 5.0, "secagg-bits": 16}
    cfg = RunConfig.from_user_config({**SMALL, **config})

    # Execute
    plain, _ = _run(tmp_path / "plain", 3, **config, **{"secure-aggregation": False})
    secure, _ = _run(tmp_path / "secure", 3, **config)

    # Assert: the same sites trained; the means differ by quantization alone.
    assert plain["rounds"][0]["trained"] == secure["rounds"][0]["trained"] == 3
    plain_update = _round_update(tmp_path / "plain", cfg)
    secure_update = _round_update(tmp_path / "secure", cfg)
    spec = encoding_spec(cfg, num_sites=3, seed=0, dim=plain_update.size)
    gap = float(np.linalg.norm(secure_update - plain_update))
    assert np.linalg.norm(plain_update) > 100 * gap  # a real update, not two zeros
    assert gap <= error_bound(spec, num_summands=3) + 1e-4  # + float32 rounding of the model


def test_secure_round_reports_uploads_and_only_public_sizes(tmp_path: Path) -> None:
    # Execute
    summary, _ = _run(tmp_path, 3)

    # Assert: the masked vector of 3 sites at 8 bits needs a 10-bit ring (sums within
    # +-381), so each site sent a little over 10 bits per coordinate: under 0.4x fp32.
    row = summary["rounds"][0]
    assert row["status"] == "ok" and row["trained"] == 3
    dim = sum(v.numel() for v in _initial(RunConfig.from_user_config(SMALL)).values())
    for sent in row["upload_bytes"].values():
        assert dim * 10 / 8 < sent < 0.4 * 4 * dim
    # A simulated site's size is public (the partition's); a deployed site declares it.
    sizes = [site["num_examples"] for site in summary["sites"]]
    assert all(n > 0 for n in sizes)
    assert all(site["epsilon"] == pytest.approx(4.0, rel=0.01) for site in summary["sites"])


def test_sites_vanishing_after_their_masked_input_are_recovered(tmp_path: Path) -> None:
    # Prepare: 5 sites, threshold 4 (more than 2/3 of 5 holders: the active-security
    # bound); one vanishes when asked to unmask (n - t = 1).
    # (a vanished site never answers: the coordinator waits out the round timeout)
    grid = _grid(tmp_path, 5, **{"round-timeout": 3.0})
    grid.vanish_at(NODE_ID_OFFSET + 3, "1/unmask")

    # Execute
    summary = _go(grid, tmp_path)

    # Assert: its masked input is in the sum, recovered through the shares, and it is
    # counted as trained, not noted as rejected.
    row = summary["rounds"][0]
    assert row["status"] == "ok"
    assert row["trained"] == 5
    assert row["notes"] == []
    assert np.linalg.norm(_round_update(tmp_path, RunConfig.from_user_config(SMALL))) > 0


def test_too_few_survivors_abort_the_round_and_the_run_goes_on(tmp_path: Path) -> None:
    # Prepare: 5 sites, threshold 4; two vanish when asked to train (their masked input
    # rides the train reply), after they dealt their shares.
    grid = _grid(tmp_path, 5, **{"num-server-rounds": 2, "round-timeout": 3.0})
    for i in (0, 2):
        grid.vanish_at(NODE_ID_OFFSET + i, "1")

    # Execute
    summary = _go(grid, tmp_path)

    # Assert: round 1 failed with the reason and left the model as it was; round 2 ran
    # among the three sites left (a 3-site round needs all three, and all answer).
    first, second = summary["rounds"]
    assert first["status"] == "failed"
    assert first["reason"].startswith("secure aggregation aborted")
    assert first["trained"] == 0
    cfg = RunConfig.from_user_config(SMALL)
    assert np.linalg.norm(_round_update(tmp_path, cfg, 1)) == 0
    assert second["status"] == "ok" and second["trained"] == 3
    assert summary["final"]["rounds_completed"] == 1
    notes = {n["site"]: n["reason"] for n in first["notes"]}
    # (the pre-flight taught the coordinator the sites' names)
    assert all("no reply" in notes[f"site-{i}"] for i in (0, 2))
    assert all(math.isfinite(r["accuracy"]) for r in summary["rounds"])


def test_simulated_crashes_fail_rounds_cleanly_and_the_run_finishes(tmp_path: Path) -> None:
    # Prepare: every simulated site crashes in (almost) every round, at a random stage.
    grid = _grid(tmp_path, 3, **{"num-server-rounds": 2, "dropout-rate": 0.999})

    # Execute
    summary = _go(grid, tmp_path)

    # Assert: no round produced a model; each says why; the run still wrote its outputs.
    assert [r["status"] for r in summary["rounds"]] == ["failed", "failed"]
    for row in summary["rounds"]:
        assert row["trained"] == 0
        assert "unchanged" in row["reason"] or "aborted" in row["reason"]
        assert {n["site"] for n in row["notes"]} <= {
            "site-0",
            "site-1",
            "site-2",
            *(f"node-{NODE_ID_OFFSET + i}" for i in range(3)),
        }
    assert summary["final"]["rounds_completed"] == 0
    assert (tmp_path / "model" / "model.safetensors").is_file()
