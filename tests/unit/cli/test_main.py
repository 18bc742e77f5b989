"""The ``fedsilo`` command's errors: one line, exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from server import deploy as coordinator
from tests.support.deploy_folders import site_folder

# ---- the command line -------------------------------------------------------------


def test_cli_errors_are_one_line_with_exit_code_2(
    tmp_path: Path,
    coord: coordinator.Coordinator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli import main as cli

    argv = [
        "fedsilo", "site", "init", str(tmp_path / "s"), "--site-id", "a",
        "--data", str(tmp_path / "missing.csv"), "--ca", str(coord.directory / "ca.crt"),
        "--superlink", "h:1",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --data {tmp_path / 'missing.csv'}: no such file"]


def test_cli_site_check_failure_exits_2_after_the_findings(
    tmp_path: Path,
    coord: coordinator.Coordinator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli import main as cli

    site = site_folder(tmp_path, coord)
    site.node_key.chmod(0o640)
    monkeypatch.setattr(sys, "argv", ["fedsilo", "site", "check", str(site.directory)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "ok    data" in out.out and "FAIL  " in out.out
    assert out.err.startswith("error: site check failed: ") and out.err.count("\n") == 1


@pytest.mark.parametrize(
    ("extra", "named"), [(["--rounds", "3"], "--rounds"), (["--mode", "central"], "--mode")]
)
def test_simulate_resume_takes_the_dead_runs_plan_and_nothing_else(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    named: str,
) -> None:
    from cli import main as cli

    argv = ["fedsilo", "simulate", "--resume", str(tmp_path), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: --resume takes the dead run's plan; only --out goes with it, not {named}"
    )


def test_simulate_resume_reads_the_dead_simulation_and_says_what_is_missing(
    tmp_path: Path,
) -> None:
    import json

    from common.config import ConfigError, RunConfig
    from simulations.runner import resume_options

    dead = tmp_path / "dead"
    dead.mkdir()
    with pytest.raises(ConfigError, match=r"not the folder of a simulation \(run\.json missing\)"):
        resume_options(str(dead))
    config = RunConfig(num_server_rounds=3, out_dir=str(dead), sites_dir=str(dead / "sites"))
    (dead / "run.json").write_text(json.dumps({"run_id": "5", "config": config.to_user_config()}))
    with pytest.raises(ConfigError, match=r"simulation\.json missing"):
        resume_options(str(dead))
    (dead / "simulation.json").write_text(json.dumps({"num-sites": 4}))
    options = resume_options(str(dead), str(tmp_path / "new"))
    assert options["num-sites"] == 4 and options["resume"] == str(dead.resolve())
    assert options["out-dir"] == str(tmp_path / "new") and options["num-server-rounds"] == 3
    assert options["sites-dir"] == str(dead / "sites")  # the same sites, the same ledgers
