"""How fedsilo starts Flower's own commands on either side (``flower-superlink``,
``flower-supernode``, ``flwr``): the same installation's executables, Flower's files
in a folder of the caller's, no telemetry and no installs at run time. No flwr import:
Flower is driven through its commands.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from common.pki import DeployError

FLWR_HOME_DIR = "flwr"  # Flower's files (installed apps, CLI config) inside a folder
# How often the SuperLink's and each SuperNode's `flower-superexec` asks for a task to
# start (Flower's default is 1 s). Every message a site receives is such a task, and
# secure aggregation sends four per round: at 1 s each waited about half a second.
SUPEREXEC_POLL_SECONDS = "0.1"


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's processes: our venv's commands first, Flower's files
    (installed apps, CLI config) in ``flwr_home``, no telemetry or run-time installs,
    a SuperExec that starts a message's process within 0.1 s."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "PATH": with_flower_path(env.get("PATH", "")),
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SUPEREXEC_POLL_SECONDS,
        }
    )
    return env


def with_flower_path(path: str) -> str:
    """PATH with this interpreter's bin folder first: the SuperLink and SuperNode start
    ``flower-superexec`` by name, which must be the same installation."""
    bindir = str(Path(sys.executable).parent)
    parts = [p for p in path.split(os.pathsep) if p and p != bindir]
    return os.pathsep.join([bindir, *parts])


def executable(name: str) -> str:
    """A Flower command: the one beside this interpreter (the venv) first, then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` not found (is flwr installed in this environment?)")
    return found
