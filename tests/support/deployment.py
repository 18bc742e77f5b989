"""A real deployment on loopback, set up with fedsilo's own tooling: a SuperLink and
SuperNodes as processes with TLS and node authentication. The e2e deployment test and
the deployment benchmark (P7) share it.

Every process is started by the caller, stopped by its PID (with the Flower helper
processes it spawned), every wait is bounded, every port is a free one.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROWS_PER_SITE = 300


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def finished(out_dir: Path) -> bool:
    """Whether the run writing ``out_dir`` finished: its summary says it is complete
    (the coordinator rewrites it after every round)."""
    try:
        return bool(json.loads((out_dir / "summary.json").read_text())["complete"])
    except (OSError, ValueError, KeyError):
        return False


# ---- processes --------------------------------------------------------------------


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _flower_helpers(root: int) -> set[int]:
    """Processes Flower started for ``root``: its descendants, and the detached
    ``flower-superexec`` that names it with ``--parent-pid`` (and their descendants)."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    parent = {p: _ppid(p) for p in pids}
    found = {root}
    for p in pids:
        args = _cmdline(p)
        if "--parent-pid" in args:
            i = args.index("--parent-pid")
            if i + 1 < len(args) and args[i + 1] == str(root):
                found.add(p)
    changed = True
    while changed:
        changed = False
        for p, pp in parent.items():
            if pp in found and p not in found:
                found.add(p)
                changed = True
    return found - {root}


def _alive(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat")
    try:
        return state.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Proc:
    """A process the caller started, its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_exit(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, *, timeout: float = 20.0) -> None:
        """SIGTERM by PID, bounded wait, SIGKILL if needed; then the same for the
        helpers Flower started for it."""
        stop_all([self], timeout=timeout)


def stop_all(procs: list[Proc], *, timeout: float = 20.0) -> None:
    """Stop several processes at once (SIGTERM to all, then bounded waits)."""
    helpers: set[int] = set()
    for proc in procs:
        if proc.popen.poll() is None:
            helpers |= _flower_helpers(proc.pid)
            proc.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.2)  # they watch their parent and leave on their own
    for p in helpers:
        if _alive(p):
            os.kill(p, signal.SIGKILL)


def env(**extra: str) -> dict[str, str]:
    out = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    }
    out.update(extra)
    return out


def start(name: str, args: list[str], logs: Path) -> Proc:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=logs, start_new_session=True
        )
    return Proc(name, popen, log)


def wait(what: str, condition: Callable[[], bool], timeout: float, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def fedsilo(*args: str) -> str:
    """The ``fedsilo`` command in-process (its imports are paid once per process)."""
    from typer.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    if result.exit_code != 0:
        raise AssertionError(f"fedsilo {' '.join(args)} failed:\n{result.output}")
    return result.output


def fedsilo_result(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The ``fedsilo`` command as a process of its own, whatever its exit status."""
    return subprocess.run(
        [str(BIN / "fedsilo"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=ROOT,
    )


def ca_fingerprint(path: Path) -> str:
    """The CA's fingerprint as both sides print it (``SHA-256 AB:CD:...``)."""
    from common.pki import ca_fingerprint_text, load_ca_certificate

    return ca_fingerprint_text(load_ca_certificate(path))


# ---- the federation ---------------------------------------------------------------


@dataclass
class Federation:
    root: Path
    coord: Path
    port: int
    superlink: Proc
    flwr_home: Path
    procs: list[Proc]

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env(FLWR_HOME=str(self.flwr_home)),
            cwd=ROOT,
        )

    def online_nodes(self) -> set[str]:
        done = self.flwr("supernode", "ls", "fedsilo", "--format", "json")
        try:
            nodes = json.loads(done.stdout)["nodes"]
        except (ValueError, KeyError):
            return set()
        return {str(n["node-id"]) for n in nodes if n["status"] == "online"}

    def site(
        self,
        name: str,
        data: Path,
        ca: Path | None = None,
        *,
        min_sites: int | None = None,
        extra: tuple[str, ...] = (),
    ) -> Path:
        directory = self.root / name
        fedsilo(
            "site",
            "init",
            str(directory),
            "--site-id",
            name,
            "--data",
            str(data),
            "--ca",
            str(ca or self.coord / "ca.crt"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            *(["--secagg-min-sites", str(min_sites)] if min_sites is not None else []),
            *extra,
        )
        return directory

    def roster(self, sites: list[Path], name: str = "roster.json") -> str:
        """One roster of ``sites`` (site folders named by their site-id) from their
        ``state/identity.pub``, made and installed at each with the real commands
        (`fedsilo roster make`, `fedsilo site roster`), as the sites' operators do out of
        band; its fingerprint, checked to be what every site installed."""
        path = self.root / name
        made = fedsilo(
            "roster",
            "make",
            str(path),
            *(f"--site={d.name}={d / 'state' / 'identity.pub'}" for d in sites),
        )
        fingerprint = made.split("roster fingerprint ")[1].split()[0]
        for directory in sites:
            out = fedsilo("site", "roster", str(path), str(directory))
            if f"fingerprint     {fingerprint}" not in out:
                raise AssertionError(out)
        return fingerprint

    def register(self, directory: Path, name: str) -> str:
        """Register a site's node key; its node id."""
        out = fedsilo(
            "coordinator",
            "register",
            str(directory / "node.pub"),
            "--name",
            name,
            "--dir",
            str(self.coord),
        )
        if " as node " not in out:
            raise AssertionError(out)
        return out.split(" as node ")[1].split()[0]

    def start_site(self, directory: Path, tag: str = "") -> Proc:
        proc = start(
            f"{directory.name}{tag}",
            [str(BIN / "fedsilo"), "site", "start", str(directory)],
            self.root,
        )
        self.procs.append(proc)
        return proc


def write_sites_data(root: Path, names: list[str], rows: int = ROWS_PER_SITE) -> dict[str, Path]:
    """Disjoint slices of Rotten Tomatoes' training split, one CSV per site."""
    from common.data import load_builtin

    full = load_builtin("rotten-tomatoes", "train", seed=0)
    paths = {}
    for i, name in enumerate(names):
        path = root / f"{name}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for j in range(i * rows, (i + 1) * rows):
                writer.writerow([full.texts[j], full.label_names[int(full.labels[j])]])
        paths[name] = path
    return paths


@contextmanager
def federation(root: Path) -> Iterator[Federation]:
    """A coordinator folder and its running SuperLink under ``root``."""
    port = free_port()
    coord = root / "coordinator"
    out = fedsilo("coordinator", "init", str(coord), "--host", "localhost", "--port", str(port))
    if "fedsilo coordinator start" not in out or "--enable-supernode-auth" not in out:
        raise AssertionError(out)
    superlink = start("superlink", [str(BIN / "fedsilo"), "coordinator", "start", str(coord)], root)
    fed = Federation(root, coord, port, superlink, coord / "flwr", [])
    try:
        wait(
            "the SuperLink to listen",
            lambda: "Uvicorn running" in superlink.text() or superlink.popen.poll() is not None,
            60,
        )
        if superlink.popen.poll() is not None:
            raise AssertionError(superlink.text()[-3000:])
        yield fed
    finally:
        stop_all(fed.procs)
        superlink.stop()
