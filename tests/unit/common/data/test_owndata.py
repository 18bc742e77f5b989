"""Data of one's own (issue 14): one file split by a site column, a folder of files
(CSV and JSONL), labels from a task or read from the data, rare classes kept, an
undeclared label refused by name; and the held-out share chosen by a keyed hash."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from common.data import DataValidationError
from common.data.holdout import held_out
from common.data.owndata import discover_task, load_own_data, own_sites
from common.task import Task

TASK = Task(
    name="wards",
    labels=("cardio", "neuro", "onco", "rare"),
    text_column="note",
    label_column="dept",
)


def _rows(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        dept = "rare" if i % 50 == 0 else ("cardio", "neuro", "onco")[int(rng.integers(3))]
        out.append(
            (
                f"patient note {i} about {dept} care {rng.integers(1000)}",
                dept,
                ("St Mary's", "general-hospital", "clinic 3")[i % 3],
            )
        )
    return out


def _csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["note", "dept", "hospital"])
        writer.writerows(rows)
    return path


def test_one_csv_with_a_site_column_makes_one_site_per_value(tmp_path: Path) -> None:
    rows = _rows(300)
    path = _csv(tmp_path / "notes.csv", rows)
    sites = own_sites(str(path), TASK, "hospital", "natural", 3, 0, 0.5, 1)
    assert sites.names == ("St Mary's", "clinic 3", "general-hospital")
    for name, part in zip(sites.names, sites.parts, strict=True):
        assert sorted(sites.data.texts[i] for i in part) == sorted(
            r[0] for r in rows if r[2] == name
        )
    # the rare class is kept where it falls, with the task's label ids
    assert sum(sites.data.subset(p).label_counts()["rare"] for p in sites.parts) == 6
    with pytest.raises(DataValidationError, match="has 3 sites"):
        own_sites(str(path), TASK, "hospital", "natural", 4, 0, 0.5, 1)


def test_a_folder_of_csv_and_jsonl_files_is_one_site_per_file(tmp_path: Path) -> None:
    rows = _rows(120)
    _csv(tmp_path / "a.csv", rows[:60])
    with (tmp_path / "b.jsonl").open("w", encoding="utf-8") as handle:
        for text, dept, _ in rows[60:]:
            handle.write(json.dumps({"note": text, "dept": dept}) + "\n")
    (tmp_path / "README.txt").write_text("not data")
    data = load_own_data(tmp_path, TASK)
    assert data.label_names == TASK.labels
    sites = own_sites(str(tmp_path), TASK, "", "natural", 2, 0, 0.5, 1)
    assert sites.names == ("a", "b") and [len(p) for p in sites.parts] == [60, 60]
    iid = own_sites(str(tmp_path), TASK, "", "iid", 4, 0, 0.5, 1)
    assert sorted(np.concatenate(iid.parts).tolist()) == list(range(120))


def test_without_a_task_the_labels_are_read_from_the_data_once_and_sorted(tmp_path: Path) -> None:
    path = _csv(tmp_path / "notes.csv", _rows(200))
    task, counts = discover_task(
        path,
        name="notes",
        text_column="note",
        label_column="dept",
        max_length=32,
        model_preset="tiny",
    )
    assert task.labels == ("cardio", "neuro", "onco", "rare")
    assert counts["rare"] == 4 and sum(counts.values()) == 200


def test_a_file_with_an_undeclared_label_is_refused_by_name(tmp_path: Path) -> None:
    rows = _rows(30)
    rows[7] = ("a note", "dermatology", "clinic 3")
    path = _csv(tmp_path / "notes.csv", rows)
    with pytest.raises(
        DataValidationError, match=r"line 9: label 'dermatology'.*not one of the declared labels"
    ):
        load_own_data(path, TASK, site_column="hospital")


def test_natural_needs_the_datas_own_sites(tmp_path: Path) -> None:
    path = _csv(tmp_path / "notes.csv", _rows(30))
    with pytest.raises(DataValidationError, match="site column"):
        own_sites(str(path), TASK, "", "natural", 2, 0, 0.5, 1)


def test_the_held_out_share_is_keyed_stable_and_about_its_fraction() -> None:
    texts = [f"row {i}" for i in range(4000)]
    key = b"k" * 32
    mask = held_out(texts, key, 0.2)
    assert 0.17 < mask.mean() < 0.23
    # stable across file edits: a row's side depends on its text alone
    edited = [*texts[::-1][:3000], "new row"]
    again = dict(zip(edited, held_out(edited, key, 0.2), strict=True))
    assert all(again[t] == m for t, m in zip(texts, mask, strict=True) if t in again)
    # another site's key chooses other rows; fraction 0 holds nothing out
    other = held_out(texts, b"o" * 32, 0.2)
    assert (other != mask).mean() > 0.2
    assert not held_out(texts, key, 0.0).any()


def test_one_binary_jsonl_file_splits_iid_or_by_dirichlet_with_the_tasks_labels(
    tmp_path: Path,
) -> None:
    path = tmp_path / "reviews.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(400):
            label = "spam" if i % 9 == 0 else "ham"  # binary, imbalanced
            handle.write(json.dumps({"body": f"message {i}", "kind": label}) + "\n")
    task = Task(name="spam", labels=("ham", "spam"), text_column="body", label_column="kind")
    for scheme in ("iid", "dirichlet"):
        sites = own_sites(str(path), task, "", scheme, 4, 0, 0.5, 10)
        assert sites.data.label_names == ("ham", "spam") and sites.data.groups is None
        assert sorted(np.concatenate(sites.parts).tolist()) == list(range(400))
        total = sum(sites.data.subset(p).label_counts()["spam"] for p in sites.parts)
        assert total == 45
