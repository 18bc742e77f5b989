"""The real ServerApp and ClientApp on the Ray-free in-process grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from client.app import app as client_app
from common.outputs import read_summary
from common.privacy.ledger import LEDGER_FILE, read_ledger
from server.app import app as server_app
from tests.support.inprocess_grid import InProcessGrid
from tests.support.reference import reference_epsilon
from tests.support.runs import SMALL_RUN
from tests.support.sites import deployed_node, install_roster


def _run(tmp_path: Path, grid: InProcessGrid) -> dict:
    server_app(grid, grid.server_context())
    return json.loads((tmp_path / "summary.json").read_text())


def test_three_sites_two_rounds_end_to_end(tmp_path: Path) -> None:
    # Prepare
    grid = InProcessGrid(
        client_app, num_nodes=3, run_config={**SMALL_RUN, "out-dir": str(tmp_path)}
    )

    # Execute
    summary = _run(tmp_path, grid)

    # Assert: outputs exist and say what happened
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["status"] == "ok" and r["trained"] == 3 for r in summary["rounds"])
    assert {s["site"] for s in summary["sites"]} == {"site-0", "site-1", "site-2"}
    for site in summary["sites"]:
        assert site["epsilon"] == pytest.approx(4.0, rel=0.01)
        assert site["epsilon"] == pytest.approx(
            reference_epsilon(site["noise_multiplier"], site["sample_rate"], site["steps"]),
            rel=0.02,
        )
    assert summary["rounds"][1]["epsilon_max"] == pytest.approx(4.0, rel=0.01)
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0
    for name in (
        "accuracy.png",
        "epsilon.png",
        "model/model.safetensors",
        "checkpoints/round-001.safetensors",
        "checkpoints/round-002.safetensors",
    ):
        assert (tmp_path / name).is_file(), name
    # What the coordinator wrote reads back as the typed summary it was.
    assert json.loads(read_summary(tmp_path).to_json()) == summary


def test_a_site_with_bad_data_fails_sanitized_and_the_round_goes_on(tmp_path: Path) -> None:
    # Prepare: site 0 points at a data file whose bad row holds a secret.
    bad = tmp_path / "site.csv"
    bad.write_text("text,label\nSECRET-PATIENT-NOTE,fresh\n,rotten\n")
    # Four sites: a secure round among n = 4 (threshold 3) completes without one of them.
    nodes = [
        deployed_node(bad, tmp_path / "state", site_id="hospital-a", epsilon=4.0, data_size=100),
        *({"partition-id": i, "num-partitions": 4} for i in (1, 2, 3)),
    ]
    out = tmp_path / "run"
    states = {"hospital-a": tmp_path / "state"}
    states.update({f"site-{i}": out / "sites" / f"site-{i}" for i in (1, 2, 3)})
    install_roster(states, into=[tmp_path / "state", out / "sites"])
    grid = InProcessGrid(
        client_app,
        num_nodes=4,
        node_configs=nodes,
        run_config={**SMALL_RUN, "num-server-rounds": 1, "out-dir": str(out)},
    )

    # Execute
    server_app(grid, grid.server_context())
    text = (out / "summary.json").read_text()
    summary = json.loads(text)

    # Assert: the round used the three good sites; the failure names no data
    row = summary["rounds"][0]
    assert row["trained"] == 3
    assert row["notes"] == [
        {
            "site": "hospital-a",
            "status": "failed",
            "reason": "site data failed validation (details in the site's log)",
        }
    ]
    assert "SECRET" not in text and "site.csv" not in text
    # The round was charged before the file was parsed: it stays charged.
    assert len(read_ledger(tmp_path / "state" / LEDGER_FILE)) == 1


def test_no_site_trains_leaves_the_model_unchanged(tmp_path: Path) -> None:
    # Every site's own budget is too small for even one round of this plan; no pre-flight
    # keeps them out (tests/integration/test_day_to_day.py has the run that stops there).
    nodes = [{"partition-id": i, "num-partitions": 3, "epsilon": 1e-6} for i in range(3)]
    grid = InProcessGrid(
        client_app,
        num_nodes=3,
        node_configs=nodes,
        run_config={
            **SMALL_RUN, "num-server-rounds": 1, "out-dir": str(tmp_path), "preflight": False
        },
    )  # fmt: skip
    summary = _run(tmp_path, grid)
    row = summary["rounds"][0]
    assert row["status"] == "failed" and "unchanged" in row["reason"]
    assert row["reason"].startswith("no site trained this round (3 refused: see the notes)")
    assert [n["status"] for n in row["notes"]] == ["refused"] * 3
    assert row["trained"] == 0
    assert not math.isnan(row["accuracy"])
