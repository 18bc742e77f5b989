"""``fedsilo export`` and ``fedsilo predict`` as a user runs them, on the output of a
short real federation (the real ServerApp and ClientApp on the in-process grid)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from client.app import app as client_app
from common.data import load_builtin
from server.app import app as server_app
from tests.support.inprocess_grid import InProcessGrid
from tests.support.runs import SMALL_RUN, fedsilo
from tests.support.sites import deployed_node, install_roster


@pytest.mark.e2e
def test_export_and_predict_on_a_real_run(tmp_path: Path) -> None:
    # Prepare: 3 sites with 200 public training texts each (kept small for speed), 2
    # rounds, DP and secure aggregation on (the defaults).
    train = load_builtin("rotten-tomatoes", "train", seed=0)
    nodes = []
    for i in range(3):
        path = tmp_path / f"site-{i}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for j in range(200 * i, 200 * (i + 1)):
                writer.writerow([train.texts[j], train.label_names[train.labels[j]]])
        nodes.append(
            deployed_node(
                path, tmp_path / f"state-{i}", site_id=f"site-{i}", epsilon=8.0, data_size=200
            )
        )
    states = {f"site-{i}": tmp_path / f"state-{i}" for i in range(3)}
    install_roster(states, into=states.values())  # the federation's roster, at each site
    run = tmp_path / "run"
    grid = InProcessGrid(
        client_app, num_nodes=3, node_configs=nodes, run_config={**SMALL_RUN, "out-dir": str(run)}
    )
    server_app(grid, grid.server_context())

    # Execute: export with the default output folder
    result = fedsilo("export", str(run), timeout=120)

    # Assert
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy" in result.stdout and "int8" in result.stdout
    assert "Warning" not in result.stderr, result.stderr  # torch's deprecations are silenced
    out = run / "export"
    card = json.loads((out / "model_card.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert card["dp"] is True and card["secure_aggregation"] is True
    assert card["num_sites"] == 3 and card["rounds_completed"] == 2
    assert card["epsilon_max"] == pytest.approx(4.0, rel=0.01)
    # The rebuilt fp32 model is the model the coordinator evaluated.
    assert card["accuracy"]["fp32"] == pytest.approx(summary["final"]["accuracy"], abs=1e-9)
    assert abs(card["accuracy"]["int8"] - card["accuracy"]["fp32"]) <= 0.01
    assert card["size_bytes"]["ratio"] <= 0.4
    assert "Limitations" in (out / "MODEL_CARD.md").read_text()

    # predict: int8 (the default) on texts and a file; fp32 with JSON output
    texts = tmp_path / "texts.txt"
    texts.write_text("a dull, lifeless mess\n\nan utterly charming delight\n")
    result = fedsilo(
        "predict", str(out), "a gripping, beautifully acted film", "--file", str(texts), timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.split("\t")[0] in ("rotten", "fresh") for line in lines)
    result = fedsilo("predict", str(out), "a gripping film", "--fp32", "--json", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads(result.stdout)
    assert row["label"] in ("rotten", "fresh") and set(row["probabilities"]) == {"rotten", "fresh"}
    assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    # Bad input: one line naming the file, exit code 2
    (out / "model-int8.pt").write_bytes(b"junk")
    result = fedsilo("predict", str(out), "text", timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and "model-int8.pt" in result.stderr
