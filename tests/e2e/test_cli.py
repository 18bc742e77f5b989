"""The ``fedsilo`` command as a user runs it: real processes, real Ray engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.runs import ROOT, fedsilo


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
    # Every simulated site left a signed ledger in the run folder that verifies.
    ledgers = sorted((out / "sites").glob("*/ledger.jsonl"))
    assert len(ledgers) == 3
    audit = fedsilo("audit", "verify", *map(str, ledgers))
    assert audit.returncode == 0, audit.stdout + audit.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
def test_flwr_run_runs_the_same_apps(tmp_path: Path) -> None:
    # `flwr run .` with the app from pyproject.toml: a local SuperLink (a detached
    # process, stopped by PID below) runs the Simulation Engine with 3 sites.
    home, out = tmp_path / "flwr", tmp_path / "run"
    home.mkdir()
    (home / "config.toml").write_text((ROOT / "docs" / "flwr-config.toml").read_text())
    http_port, control_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    overrides = (
        f"num-server-rounds=1 max-length=16 batch-size=64 min-partition-size=20 out-dir='{out}'"
    )
    try:
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "flwr"),
                "run",
                str(ROOT),
                "--run-config",
                overrides,
                "--federation-config",
                "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.0",
                "--stream",
            ],
            capture_output=True,
            text=True,
            timeout=420,
            env=env,
            cwd=tmp_path,
        )
    finally:
        pids = subprocess.run(
            ["pgrep", "-f", f"flower-superlink.*{control_port}"], capture_output=True, text=True
        ).stdout.split()
        for pid in pids:
            os.kill(int(pid), 15)
    assert pids, "the local SuperLink was not found to stop"
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"][0]["trained"] == 3
    assert 0 < summary["final"]["epsilon_max"] <= 8.0
    assert "final accuracy" in result.stdout
    assert "deprecated" not in result.stdout + result.stderr
