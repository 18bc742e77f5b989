"""How fedsilo starts Flower's own commands on either side (``flower-superlink``,
``flower-supernode``, ``flwr``): the same installation's executables, Flower's files
in a folder of the caller's, no telemetry and no installs at run time; and how a
folder's long-running Flower process is supervised (its PID file, its output passed
through, signals passed on) and stopped. No flwr import: Flower is driven through its
commands.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, NoReturn

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


# ---- a Flower process of a folder: its PID file, started, supervised, stopped ---------
#
# `fedsilo coordinator start` and `fedsilo site start` run `flower-superlink` /
# `flower-supernode` as a child, not in their own place: so that when it exits they can
# say why in words (Flower's own exit status is 1 for every failure), and so that
# `... stop` finds it by the PID file the starter keeps in the folder.


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(output: str) -> str:
    """Flower's log without its colour codes."""
    return _ANSI.sub("", output)


def killed_by(returncode: int) -> str | None:
    """The signal that ended a Flower child (a negative return code), by name; None
    when it exited, or when it was the SIGTERM/SIGINT its starter passed on (a stop on
    request, not a failure)."""
    if returncode >= 0 or -returncode in (signal.SIGTERM, signal.SIGINT):
        return None
    sig = -returncode
    return signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)


@dataclass(frozen=True)
class FlowerProcess:
    """What the process a PID file names must be before fedsilo signals it: the Flower
    command, and an argument only this folder's process carries (its node key, its
    database), so neither a reused PID nor another folder's process is ever stopped."""

    command: str
    marker: str

    def matches(self, args: Sequence[str]) -> bool:
        # A console script runs as `python /venv/bin/flower-supernode ...`.
        return any(Path(a).name == self.command for a in args[:2]) and self.marker in args


def process_args(pid: int) -> list[str] | None:
    """A live process's command line; None when there is no such process (a zombie,
    which has exited and waits for its parent, counts as gone). Linux (/proc)."""
    if pid <= 1:
        return None
    proc = Path("/proc") / str(pid)
    try:
        stat = (proc / "stat").read_text()
        raw = (proc / "cmdline").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return raw.rstrip(b"\0").decode(errors="replace").split("\0") if raw else []


def parse_pid(text: str) -> int | None:
    """The PID a PID file holds; None for an empty or damaged file (never 0, 1 or a
    negative number: ``kill`` would take those as a process group or every process)."""
    text = text.strip()
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if pid > 1 else None


def read_pid(path: Path) -> int | None:
    try:
        return parse_pid(path.read_text())
    except (OSError, UnicodeDecodeError):
        return None


class PidFile:
    """``DIR/<name>.pid`` while a folder's Flower process runs: its PID, under a lock
    (``flock``) held by the fedsilo process that started it, removed when it exits.

    A second start for the same folder is refused while the lock is held, or while
    the PID in the file is still this folder's Flower process (its starter was killed);
    a file whose process is gone is stale and taken over."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def claim(cls, path: Path, expect: FlowerProcess, *, stop_hint: str) -> PidFile:
        for _ in range(20):  # the file may be removed between open and lock: again
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                pid = read_pid(path)
                held = f"PID {pid}" if pid is not None else "starting"
                raise DeployError(
                    f"{expect.command} already runs for this folder ({held}, {path}); {stop_hint}"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            pid = parse_pid(os.pread(fd, 64, 0).decode(errors="replace"))
            args = process_args(pid) if pid is not None else None
            if pid is not None and args is not None and expect.matches(args):
                os.close(fd)
                raise DeployError(
                    f"{expect.command} already runs for this folder (PID {pid}, {path}; "
                    f"the fedsilo that started it is gone); {stop_hint}"
                )
            os.ftruncate(fd, 0)  # stale (or new): ours now
            return cls(path, fd)
        raise DeployError(f"{path}: keeps changing while being claimed; try again")

    def write(self, pid: int) -> None:
        if self._fd is None:
            raise DeployError(f"{self.path}: already released")
        data = f"{pid}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the file (if it is still ours) and drop the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        os.close(self._fd)
        self._fd = None


# A child killed by one of these is ended the same way (``exit_as``): what a supervisor
# saw when fedsilo exec'd Flower (uvicorn, in the SuperLink, re-raises SIGTERM after its
# clean shutdown). Others (a crash's SIGSEGV) give 128 + the signal, without a core.
REPEATED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL)


def exit_as(returncode: int) -> NoReturn:
    """End this process as its child ended: the same exit status, or the same signal."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if returncode < 0 and -returncode in REPEATED_SIGNALS:
        signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
        time.sleep(5)  # the signal ends us before this does
    raise SystemExit(128 - returncode if returncode < 0 else returncode)


@dataclass(frozen=True)
class ChildExit:
    """How a supervised Flower process ended, and the last lines it wrote (stdout and
    stderr, in the order they were read) for telling why."""

    returncode: int  # negative: killed by that signal
    tail: str

    @property
    def status(self) -> int:
        """The exit status to pass on: the child's, or 128 + the signal that killed it."""
        return 128 - self.returncode if self.returncode < 0 else self.returncode


# Signals passed on to the child: those that ask to stop. SIGHUP (the terminal went
# away) becomes SIGTERM: the child runs in its own process group, which no shell knows.
FORWARDED_SIGNALS: dict[int, int] = {
    signal.SIGTERM: signal.SIGTERM,
    signal.SIGINT: signal.SIGINT,
    signal.SIGHUP: signal.SIGTERM,
}
TAIL_LINES = 200
DRAIN_SECONDS = 5.0  # after the child exits, how long its helpers may hold its output


def run_child(
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    pid_file: PidFile,
    cwd: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> ChildExit:
    """Run ``cmd`` as a child, its PID in ``pid_file`` while it runs; its stdout and
    stderr copied line by line to ours (a supervisor still sees Flower's log);
    SIGTERM/SIGINT (and SIGHUP, as SIGTERM) passed on to it. Returns when it exits,
    the PID file released (also when this process is being stopped by a signal)."""
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr.buffer
    tail: deque[bytes] = deque(maxlen=TAIL_LINES)
    lock = threading.Lock()
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        sent = FORWARDED_SIGNALS.get(signum, signum)
        if child is None:
            pending.append(sent)
        elif child.poll() is None:
            child.send_signal(sent)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in FORWARDED_SIGNALS:
            previous[signum] = signal.signal(signum, forward)
    try:
        for stream in (out, err):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        # Its own process group: a terminal's Ctrl-C reaches this process only, which
        # passes it on once (twice would make Flower skip its goodbye to the SuperLink).
        child = subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            process_group=0,
        )
        pid_file.write(child.pid)
        for sent in pending:
            child.send_signal(sent)
        pumps = [
            threading.Thread(target=_pump, args=(pipe, target, tail, lock, on_line), daemon=True)
            for pipe, target in ((child.stdout, out), (child.stderr, err))
            if pipe is not None
        ]
        for pump in pumps:
            pump.start()
        returncode = child.wait()
        pid_file.release()  # gone: a new start may claim the folder while we drain
        deadline = time.monotonic() + DRAIN_SECONDS
        for pump in pumps:
            pump.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        if child is not None and child.poll() is None:  # this process is failing
            child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=DRAIN_SECONDS)
        pid_file.release()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    with lock:
        text = b"".join(tail).decode(errors="replace")
    return ChildExit(returncode, text)


def _pump(
    pipe: IO[bytes],
    target: BinaryIO,
    tail: deque[bytes],
    lock: threading.Lock,
    on_line: Callable[[str], None] | None,
) -> None:
    for line in iter(pipe.readline, b""):
        with contextlib.suppress(OSError, ValueError):  # our own output closed: keep draining
            target.write(line)
            target.flush()
        with lock:
            tail.append(line)
        if on_line is not None:
            on_line(line.decode(errors="replace"))
    pipe.close()


@dataclass(frozen=True)
class Stopped:
    pid: int
    stale: bool  # the PID file named a process that was already gone (file removed)


def stop_process(
    path: Path, expect: FlowerProcess, *, timeout: float = 30.0, no_file_hint: str = ""
) -> Stopped:
    """SIGTERM to the process ``path`` names, if it is ``expect`` (else a refusal that
    names what it is), then wait until it is gone (and its PID file with it)."""
    if not path.exists():
        raise DeployError(
            f"{path}: no PID file, so no {expect.command} started by fedsilo runs for "
            f"this folder{no_file_hint}"
        )
    pid = read_pid(path)
    if pid is None:
        raise DeployError(f"{path}: holds no PID; remove it if no {expect.command} runs")
    args = process_args(pid)
    if args is None:
        _remove_if_names(path, pid)
        return Stopped(pid, stale=True)
    if not expect.matches(args):
        shown = shlex.join(args)
        shown = shown if len(shown) <= 160 else shown[:157] + "..."
        raise DeployError(
            f"PID {pid} in {path} is not this folder's {expect.command} (it runs `{shown}`); "
            f"not stopping it. If the {expect.command} is gone, remove {path}"
        )
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        args = process_args(pid)
        if args is None or not expect.matches(args):
            break
        time.sleep(0.1)
    else:
        raise DeployError(
            f"{expect.command} (PID {pid}) still runs {timeout:g} s after SIGTERM; "
            f"wait, or end it with `kill -KILL {pid}`"
        )
    # Its starter removes the file once it has seen it exit; give it a moment.
    deadline = time.monotonic() + DRAIN_SECONDS
    while path.exists() and read_pid(path) == pid and time.monotonic() < deadline:
        time.sleep(0.05)
    _remove_if_names(path, pid)
    return Stopped(pid, stale=False)


def _remove_if_names(path: Path, pid: int) -> None:
    if read_pid(path) == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
