"""``fedsilo simulate --data`` on a file of our own (issue 14), as a user types it: one
CSV whose ``hospital`` column makes the sites, no task file (the labels are read from
the data once, printed, written to the run's task file with a notice), multi-class
with a rare class, secure aggregation on and the private federated evaluation as the
only evaluation (no public test set). The same run fine-tunes the pretrained encoder
with DP-LoRA (minilm-lora, issue 15) and is exported and queried as a user would."""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path

import numpy as np

from tests.support.runs import fedsilo

WORDS = {
    "billing": "invoice payment refund charge",
    "access": "password login locked account",
    "outage": "down offline error timeout",
    "legal": "subpoena court counsel",
}


def test_simulate_on_a_csv_with_a_site_column_and_no_task_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "tickets.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ticket", "kind", "hospital"])
        for i in range(600):
            kind = "legal" if i % 60 == 0 else str(rng.choice(["billing", "access", "outage"]))
            site = ("north", "south", "east")[i % 3]
            writer.writerow([" ".join(rng.choice(WORDS[kind].split(), 5)) + f" {i}", kind, site])
    out = tmp_path / "run"

    done = fedsilo(
        "simulate", "--data", str(path), "--site-column", "hospital", "--rounds", "1",
        "--out", str(out), "--set", "text-column=ticket", "--set", "label-column=kind",
        "--set", "max-length=16", "--set", "batch-size=64", "--set", "min-partition-size=20",
        "--set", "model-preset=minilm-lora", timeout=600,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    text = " ".join(done.stdout.split())
    assert "labels read from the data: access (" in text and "legal (10)" in text
    assert "a real federation declares its labels in a task file" in text
    assert "site-0 = east: 200 rows" in text and "site-2 = south: 200 rows" in text
    task = tomllib.loads((out / "task.toml").read_text())
    assert task["labels"] == ["access", "billing", "legal", "outage"]
    assert "READ FROM THE DATA" in (out / "task.toml").read_text()
    summary = json.loads((out / "summary.json").read_text())
    private = summary["rounds"][0]["private_eval"]
    assert summary["rounds"][0]["accuracy"] is None and summary["final"]["source"] == "federated"
    assert sorted(private["sites"]) == ["site-0", "site-1", "site-2"] and private["noise"]
    assert [c["label"] for c in private["classes"]] == task["labels"]
    assert summary["rounds"][0]["trained"] == 3  # secure aggregation among the 3 sites
    assert "private evaluation after round 1: accuracy" in text and "macro-F1" in text

    # DP-LoRA: only the query/value adapters (73,728) and the head travelled, at 8 bits:
    # about 0.001x the encoder's fp32 size (the bound: 0.02x)
    assert "model minilm-lora (75,268 trainable parameters)" in text
    assert summary["rounds"][0]["upload_kib"] < 0.002 * 22_700_000 * 4 / 1024

    # export merges the adapters into the encoder and quantizes the whole model; predict
    exported = fedsilo("export", str(out), timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:] + exported.stdout[-3000:]
    card = json.loads((out / "export" / "model_card.json").read_text())
    assert card["model"]["preset"] == "minilm-lora" and card["size_bytes"]["ratio"] < 0.8
    asked = fedsilo("predict", str(out / "export"), "password locked login", "--json", timeout=300)
    assert asked.returncode == 0, asked.stderr[-3000:]
    [row] = json.loads(asked.stdout)
    assert row["label"] in task["labels"] and set(row["probabilities"]) == set(task["labels"])
