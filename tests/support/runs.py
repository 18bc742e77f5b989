"""What several tests share: a small, fast run config and the ``fedsilo`` command as a
user runs it (a real process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FEDSILO = [sys.executable, "-m", "cli.main"]

# Two rounds of the tiny model on short texts: seconds per round on 2 cores.
SMALL_RUN = {
    "num-server-rounds": 2,
    "max-length": 16,
    "batch-size": 64,
    "min-partition-size": 20,
    "learning-rate": 0.5,
    "clip-norm": 1.0,
    "epsilon": 4.0,
}


def fedsilo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``fedsilo ARGS`` in a child process from the repository root."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*FEDSILO, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
