"""Private federated evaluation (issue 14) through the real ServerApp and ClientApp on
the in-process grid, on a task of our own (a folder of CSV and JSONL files, 4 labels,
one rare; no public test file): with noise off (the labelled simulation option) the
secure sum of the sites' confusion matrices equals the plain count on the same
held-out rows exactly; with noise on the counts differ from it by whole numbers of the
declared scale, and every release is a signed ledger entry of the evaluation scope that
the auditor re-derives with Google's PLD accountant."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from client.app import app as client_app
from common.data.holdout import held_out
from common.data.owndata import own_sites
from common.export import export_run, load_run, predict
from common.privacy.audit import verify
from common.privacy.identity import open_state
from common.privacy.ledger import EVAL_SCOPE, LEDGER_FILE, read_ledger
from common.task import Task
from common.text import encode
from server.app import app as server_app
from tests.support.inprocess_grid import InProcessGrid
from tests.support.runs import SMALL_RUN

TASK = Task(
    name="clinic-notes",
    labels=("cardio", "neuro", "onco", "rare"),
    text_column="note",
    label_column="dept",
    max_length=16,
)
WORDS = {
    "cardio": "heart beat chest pressure",
    "neuro": "brain nerve headache scan",
    "onco": "tumour cell growth chemo",
    "rare": "genetic syndrome unusual",
}


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(3)
    root.mkdir()
    rows = {name: [] for name in ("clinic-a", "clinic-b", "clinic-c")}
    for site in rows:
        for i in range(240):
            dept = "rare" if i % 40 == 0 else str(rng.choice(["cardio", "neuro", "onco"]))
            words = [*WORDS[dept].split(), "note", "patient", site]
            rows[site].append((" ".join(rng.choice(words, 6)) + f" {i}", dept))
    for site in ("clinic-a", "clinic-b"):
        with (root / f"{site}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["note", "dept"])
            writer.writerows(rows[site])
    with (root / "clinic-c.jsonl").open("w", encoding="utf-8") as handle:
        for note, dept in rows["clinic-c"]:
            handle.write(json.dumps({"note": note, "dept": dept}) + "\n")
    (root / "task.toml").write_text(TASK.to_toml(), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("own") / "clinics")


def _run(out: Path, data: Path, **config: object) -> dict:
    grid = InProcessGrid(
        client_app,
        num_nodes=3,
        node_configs=[{"partition-id": i, "num-partitions": 3} for i in range(3)],
        run_config={
            **SMALL_RUN,
            "num-server-rounds": 2,
            "dataset": str(data),
            "task": str(data / "task.toml"),
            "out-dir": str(out),
            "eval-fraction": 0.3,
            **config,
        },
    )
    server_app(grid, grid.server_context())
    return json.loads((out / "summary.json").read_text())


def _true_counts(out: Path, data: Path) -> np.ndarray:
    """The plain confusion matrix of the run's final model on every site's held-out
    rows, computed here from the files and each site's own key."""
    run = load_run(out)
    from common.model import build_model

    model = build_model(run.model.spec)
    model.load_trainable_state(run.model.arrays)
    model.eval()
    sites = own_sites(str(data), TASK, "", "natural", 3, 0, 0.5, 20)
    total = np.zeros((4, 4), dtype=np.int64)
    for i, part in enumerate(sites.parts):
        rows = sites.data.subset(part)
        key = open_state(out / "sites" / f"site-{i}").fingerprint_key
        kept = rows.subset(held_out(rows.texts, key, 0.3))
        enc = encode(kept.texts, TASK.max_length)
        with torch.no_grad():
            pred = model(torch.from_numpy(enc.ids), torch.from_numpy(enc.mask)).argmax(1).numpy()
        np.add.at(total, (kept.labels, pred), 1)
    return total


def test_without_noise_the_secure_sum_of_counts_is_the_plain_count(
    tmp_path: Path, data: Path
) -> None:
    summary = _run(tmp_path / "exact", data, **{"eval-noise": False})

    private = summary["rounds"][-1]["private_eval"]
    assert summary["rounds"][-1]["accuracy"] is None  # no public test set
    assert private["noise"] is False and private["noise_std"] == 0
    assert sorted(private["sites"]) == ["site-0", "site-1", "site-2"]
    truth = _true_counts(tmp_path / "exact", data)
    assert np.array_equal(np.array(private["counts"]), truth)
    assert private["accuracy"] == pytest.approx(np.trace(truth) / truth.sum())
    assert summary["final"]["source"] == "federated"
    assert summary["task"]["labels"] == list(TASK.labels)
    # no release without noise is charged to anybody's evaluation budget
    for i in range(3):
        entries = read_ledger(tmp_path / "exact" / "sites" / f"site-{i}" / LEDGER_FILE)
        assert [e.budget_scope for e in entries] == ["site", "site"]


def test_with_noise_the_counts_are_noisy_charged_and_audited(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "noisy"
    summary = _run(out, data, **{"eval-epsilon": 2.0})

    private = summary["rounds"][-1]["private_eval"]
    truth = _true_counts(out, data)
    noisy = np.array(private["counts"])
    sigmas = []
    for i in range(3):
        path = out / "sites" / f"site-{i}" / LEDGER_FILE
        entries = read_ledger(path)
        evals = [e for e in entries if e.budget_scope == EVAL_SCOPE]
        assert len(evals) == 1 and len(entries) == 3
        e = evals[0]
        assert (e.sample_rate, e.steps, e.clip_norm, e.epsilon_target) == (1.0, 1, 1.0, 2.0)
        assert e.epsilon_run <= 2.0 + 1e-6
        sigmas.append(e.noise_multiplier)
        audit = verify(path)  # signatures, chain, and epsilons against Google's PLD
        assert audit.ok, [f.message for f in audit.findings]
        assert private["epsilon_per_site"][f"site-{i}"] == pytest.approx(e.epsilon_run)
    assert private["noise"] is True
    assert private["noise_std"] == pytest.approx(math.sqrt(sum(s * s for s in sigmas)))
    residual = noisy - truth
    assert not np.array_equal(noisy, truth)
    # 16 cells of a sum with std noise_std (+ rounding): none beyond 6 std
    assert np.abs(residual).max() <= 6 * private["noise_std"] + 2
    # a simulated site's evaluation budget covers this run's releases only
    # (past a pre-flight, which would stop the run: its training budget is spent too)
    again = _run(
        tmp_path / "again",
        data,
        **{"eval-epsilon": 2.0, "sites-dir": str(out / "sites"), "preflight": False},
    )
    notes = again["rounds"][-1].get("private_eval")
    assert notes is None or not notes["sites"]


def test_export_and_predict_carry_the_task_and_the_private_evaluation(
    tmp_path: Path, data: Path
) -> None:
    out = tmp_path / "run"
    _run(out, data, **{"num-server-rounds": 1})

    card = export_run(out, latency_repeats=2)

    assert card.task is not None and card.task["labels"] == list(TASK.labels)
    assert card.test_split is None and card.accuracy["fp32"] is None  # no public test set
    assert card.private_eval is not None and card.private_eval["noise"] is True
    text = (out / "export" / "MODEL_CARD.md").read_text()
    assert "# Model card: fedsilo clinic-notes classifier" in text
    assert "## Private federated evaluation" in text and "macro-F1" in text
    meta = json.loads((out / "export" / "model.json").read_text())
    assert meta["task"]["name"] == "clinic-notes"
    [(label, probs)] = predict(out / "export", ["heart chest pressure beat"])
    assert label in TASK.labels and list(probs) == list(TASK.labels)
