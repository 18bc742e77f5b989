"""``fedsilo sweep`` as a user runs it: a real process, the Ray engine, central training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.runs import fedsilo


@pytest.mark.parametrize("value", ["0", "-1", "abc", ""])
def test_bad_epsilon_list_is_one_line_naming_the_value(tmp_path: Path, value: str) -> None:
    result = fedsilo("sweep", "--epsilon", value, "--out", str(tmp_path / "s"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --epsilon"), result.stderr
    assert (repr(value) in lines[0]) if value else ("empty" in lines[0])
    assert not (tmp_path / "s").exists()


def test_bad_mode_is_one_line(tmp_path: Path) -> None:
    result = fedsilo("simulate", "--mode", "pooled", "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --mode must be 'federated' or 'central', got 'pooled'"


@pytest.mark.e2e
def test_sweep_on_the_ray_engine(tmp_path: Path) -> None:
    # epsilon 1 and no DP, one seed, 2 sites, 1 round; plus central once.
    out = tmp_path / "sweep"
    result = fedsilo(
        "sweep",
        "--epsilon",
        "1,inf",
        "--seeds",
        "1",
        "--sites",
        "2",
        "--rounds",
        "1",
        "--out",
        str(out),
        "--set",
        "max-length=16",
        "--set",
        "batch-size=64",
        "--set",
        "min-partition-size=20",
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    record = json.loads((out / "sweep.json").read_text())
    assert record["complete"] is True
    assert [r["label"] for r in record["rows"]] == ["1", "inf (no DP)"]
    assert all(len(r["accuracies"]) == 1 and r["std"] is None for r in record["rows"])
    assert len(record["central"]) == 1 and record["central"][0]["accuracy"] is not None
    assert (out / "privacy_utility.png").is_file()
    for run in (*record["runs"], *record["central"]):
        assert run["error"] is None
        summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
        assert summary["final"]["accuracy"] == run["accuracy"]
    modes = [
        json.loads((Path(r["run_dir"]) / "summary.json").read_text())["mode"]
        for r in record["runs"]
    ]
    assert modes == ["federated-dp", "federated-no-dp"]
    # The table, and one line per run; the runs' own tables went to their logs.
    assert "privacy against utility" in result.stdout
    assert "inf (no DP)" in result.stdout and "central, no DP" in result.stdout
    assert result.stdout.count("seed 0") == 3
    assert "final accuracy" not in result.stdout
    assert "final accuracy" in (out / "eps-1" / "seed-0" / "log.txt").read_text()
