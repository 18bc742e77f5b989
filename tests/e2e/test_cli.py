"""The ``fedsilo`` command as a user runs it: real processes, real Ray engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FEDSILO = [sys.executable, "-m", "simulations.cli"]
ROOT = Path(__file__).resolve().parents[2]


def fedsilo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*FEDSILO, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("text,label\ngood,fresh\n,rotten\n", "line 3: empty text"),
        ("text,label\ngood,fresh\nbad,meh\n", "line 3"),
        ("text,lbl\ngood,fresh\n", "label"),
        ("", "empty"),
    ],
)
def test_bad_site_data_is_one_line_naming_file_and_line(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "mysite.csv"
    path.write_text(content)
    result = fedsilo("check-data", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "mysite.csv" in lines[0] and expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_good_site_data_prints_counts_only(tmp_path: Path) -> None:
    path = tmp_path / "site.jsonl"
    path.write_text(
        '{"text": "SECRET great", "label": "fresh"}\n{"text": "dull", "label": "rotten"}\n'
    )
    result = fedsilo("check-data", str(path))
    assert result.returncode == 0, result.stderr
    assert "2 rows" in result.stdout and "SECRET" not in result.stdout


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    result = fedsilo("simulate", "--set", "learning-rat=0.1", "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown config key 'learning-rat'"


@pytest.mark.e2e
def test_simulate_on_the_ray_engine(tmp_path: Path) -> None:
    # 3 sites, 2 rounds, DP on, through Flower's Simulation Engine (Ray).
    out = tmp_path / "run"
    result = fedsilo(
        "simulate",
        "--sites",
        "3",
        "--rounds",
        "2",
        "--out",
        str(out),
        "--set",
        "max-length=16",
        "--set",
        "batch-size=64",
        "--set",
        "min-partition-size=20",
        timeout=420,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["trained"] == 3 for r in summary["rounds"])
    assert summary["final"]["epsilon_max"] == pytest.approx(8.0, rel=0.01)
    assert (out / "accuracy.png").is_file() and (out / "epsilon.png").is_file()
    assert "round" in result.stdout and "final accuracy" in result.stdout
