"""The local SuperLink `flwr run .` starts for the Simulation Engine (`make flwr-run`):
Flower starts it detached and keeps no PID. ``record`` writes its PID into
``$FLWR_HOME/local-superlink/superlink.pid`` (the one process whose log file is this
project's), ``stop`` ends the process that file names and nothing else, so a deployed
coordinator's SuperLink on the same machine is never touched.

    python -m cli.local_superlink record|stop
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from common.flower_cli import FlowerProcess, process_args, stop_process
from common.pki import DeployError


def _paths() -> tuple[Path, FlowerProcess]:
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).resolve()
    folder = home / "local-superlink"
    # Flower starts it with `--log-file <FLWR_HOME>/local-superlink/superlink.log`.
    return folder / "superlink.pid", FlowerProcess(
        "flower-superlink", str(folder / "superlink.log")
    )


def record() -> str:
    path, expect = _paths()
    found = [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and expect.matches(process_args(int(p)) or [])
    ]
    if not found:
        return "no local SuperLink of this project runs"
    path.write_text(f"{min(found)}\n")
    return f"the local SuperLink runs as PID {min(found)} ({path}); `make flwr-stop` ends it"


def stop() -> str:
    path, expect = _paths()
    done = stop_process(path, expect, no_file_hint=" (`make flwr-run` records it)")
    if done.stale:
        return f"the local SuperLink (PID {done.pid}) had already stopped"
    return f"stopped the local SuperLink (PID {done.pid})"


def main(argv: list[str]) -> int:
    if argv[1:] == ["record"]:
        print(record())
        return 0
    if argv[1:] == ["stop"]:
        try:
            print(stop())
        except DeployError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
