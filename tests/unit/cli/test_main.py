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
