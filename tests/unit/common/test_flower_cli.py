"""The environment fedsilo starts Flower's commands in: this installation's commands
first, Flower's files in the given folder, nothing installed or reported at run time,
and a SuperExec poll interval Flower itself accepts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from flwr.supercore.superexec import run_superexec

from common.flower_cli import SUPEREXEC_POLL_SECONDS, executable, flower_env
from common.pki import DeployError


def test_flower_env_points_at_this_installation_and_folder(tmp_path: Path) -> None:
    env = flower_env(tmp_path / "flwr", {"PATH": f"/usr/bin{os.pathsep}/bin", "KEEP": "1"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["FLWR_HOME"] == str(tmp_path / "flwr") and env["KEEP"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_the_superexec_poll_interval_is_one_flower_accepts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL",
        flower_env(tmp_path)["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"],
    )
    assert run_superexec._get_task_poll_interval() == float(SUPEREXEC_POLL_SECONDS) < 1.0


def test_a_missing_flower_command_is_named() -> None:
    assert executable("flower-supernode").endswith("flower-supernode")
    with pytest.raises(DeployError, match="`no-such-flower-command` not found"):
        executable("no-such-flower-command")
