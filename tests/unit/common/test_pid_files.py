"""A folder's Flower process under fedsilo's supervision (common/flower_cli.py): the PID
file that refuses a second start and is taken over when stale, output passed through,
signals passed on, and a stop that signals only the folder's own process. Real
processes throughout (``sleep``, small Python children)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.flower_cli import (
    ChildExit,
    FlowerProcess,
    PidFile,
    parse_pid,
    process_args,
    run_child,
    stop_process,
)
from common.pki import DeployError
from tests.support.runs import ROOT

SLEEP = FlowerProcess("sleep", "300")  # "this folder's process": `sleep 300`


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that matches SLEEP."""
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


# ---- the PID file -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "pid"), [("1234\n", 1234), ("", None), ("0", None),
                                           ("1", None), ("-1", None), ("12ab", None)])  # fmt: skip
def test_a_pid_file_never_yields_a_pid_kill_would_take_for_a_group(
    text: str, pid: int | None
) -> None:
    assert parse_pid(text) == pid


def test_a_second_start_is_refused_naming_the_pid_while_the_first_holds_the_file(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    path = tmp_path / "supernode.pid"
    first = PidFile.claim(path, SLEEP, stop_hint="stop it first")
    first.write(sleeper.pid)

    with pytest.raises(
        DeployError,
        match=rf"sleep already runs for this folder \(PID {sleeper.pid}, .*stop it first",
    ):
        PidFile.claim(path, SLEEP, stop_hint="stop it first")

    first.release()
    assert not path.exists()
    PidFile.claim(path, SLEEP, stop_hint="").release()  # free again


def test_a_live_process_of_the_folder_keeps_it_even_when_its_starter_is_gone(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    # No lock held (the fedsilo that started it was killed), the process still runs.
    path = tmp_path / "supernode.pid"
    path.write_text(f"{sleeper.pid}\n")
    with pytest.raises(
        DeployError, match=rf"PID {sleeper.pid}, .*the fedsilo that started it is gone"
    ):
        PidFile.claim(path, SLEEP, stop_hint="")
    assert path.read_text() == f"{sleeper.pid}\n"


def test_a_stale_pid_file_is_taken_over(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)
    other = subprocess.Popen(["sleep", "301"])  # alive, but not this folder's process
    try:
        for pid in (gone.pid, other.pid):
            path = tmp_path / f"{pid}.pid"
            path.write_text(f"{pid}\n")

            claimed = PidFile.claim(path, SLEEP, stop_hint="")

            assert path.read_text() == ""  # ours now, until the child's PID is written
            claimed.write(4242)
            assert path.read_text() == "4242\n"
            claimed.release()
    finally:
        other.kill()
        other.wait(timeout=10)


# ---- stop -----------------------------------------------------------------------------


def test_stop_refuses_a_process_that_is_not_the_folders_and_leaves_it_running(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    path = tmp_path / "supernode.pid"
    path.write_text(f"{sleeper.pid}\n")
    node = FlowerProcess("flower-supernode", str(tmp_path / "node.key"))

    with pytest.raises(
        DeployError,
        match=rf"PID {sleeper.pid} in .* is not this folder's flower-supernode \(it runs `sleep 300`\); not stopping it",
    ):
        stop_process(path, node, timeout=5)

    assert sleeper.poll() is None
    assert path.exists()


def test_stop_of_a_gone_process_removes_the_stale_file_and_of_none_says_so(
    tmp_path: Path,
) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)
    path = tmp_path / "supernode.pid"
    path.write_text(f"{gone.pid}\n")

    stopped = stop_process(path, SLEEP)

    assert stopped.stale and stopped.pid == gone.pid
    assert not path.exists()
    with pytest.raises(DeployError, match="no PID file, so no sleep started by fedsilo runs"):
        stop_process(path, SLEEP)


def test_stop_ends_a_supervised_child_and_its_starter_removes_the_pid_file(
    tmp_path: Path,
) -> None:
    # Prepare: a real child under the same machinery `site start` uses.
    path = tmp_path / "supernode.pid"
    claimed = PidFile.claim(path, SLEEP, stop_hint="")
    ended: list[ChildExit] = []
    starter = threading.Thread(
        target=lambda: ended.append(
            run_child(["sleep", "300"], os.environ, pid_file=claimed,
                      stdout=io.BytesIO(), stderr=io.BytesIO())
        )
    )  # fmt: skip
    starter.start()
    _wait_for(lambda: path.exists() and path.read_text().strip().isdigit())
    pid = int(path.read_text())
    assert process_args(pid) == ["sleep", "300"]

    # Execute
    stopped = stop_process(path, SLEEP, timeout=10)

    # Assert: gone, its exit passed on as 128 + SIGTERM, the file removed.
    starter.join(timeout=20)
    assert not stopped.stale and stopped.pid == pid
    assert process_args(pid) is None
    assert [e.returncode for e in ended] == [-signal.SIGTERM]
    assert ended[0].status == 128 + signal.SIGTERM
    assert not path.exists()


# ---- run_child: output through, signals passed on -----------------------------------

CHILD = """
import os, signal, sys, time
def bye(signum, frame):
    os.write(1, f"child got signal {signum}\\n".encode())  # no print: it may interrupt one
    sys.exit(3)
signal.signal(signal.SIGTERM, bye)
signal.signal(signal.SIGINT, bye)
print("to stderr", file=sys.stderr, flush=True)
print("to stdout", flush=True)  # the last word before it waits: the test waits for it
time.sleep(300)
"""

STARTER = """
import sys
from pathlib import Path
from common.flower_cli import FlowerProcess, PidFile, run_child
path = Path(sys.argv[1])
claimed = PidFile.claim(path, FlowerProcess("python", "child"), stop_hint="")
done = run_child([sys.executable, "-c", sys.argv[2], "child"], {}, pid_file=claimed)
print("starter saw", done.returncode, sorted(done.tail.splitlines()), flush=True)
sys.exit(done.status)
"""


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_the_starter_passes_output_through_and_the_signal_on_and_exits_as_the_child(
    tmp_path: Path, sent: signal.Signals
) -> None:
    path = tmp_path / "child.pid"
    starter = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(STARTER), str(path), textwrap.dedent(CHILD)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,  # its own group, as a terminal's foreground job
    )
    try:
        assert starter.stdout is not None
        first = starter.stdout.readline()  # the child has set its handlers and written
        child = int(path.read_text())
        assert child != starter.pid and process_args(child) is not None

        # What Ctrl-C in a terminal does: the signal to the whole foreground group.
        os.killpg(starter.pid, sent)
        rest, err = starter.communicate(timeout=30)
        out = first + rest
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait(timeout=10)

    assert starter.returncode == 3, err.decode()  # the child's own status
    assert out.decode().splitlines() == [
        "to stdout",
        f"child got signal {int(sent)}",  # once: passed on, not also from the terminal
        # the tail it keeps for the cause: both streams
        f"starter saw 3 ['child got signal {int(sent)}', 'to stderr', 'to stdout']",
    ]
    assert err.decode().splitlines() == ["to stderr"]
    assert not path.exists()
    assert process_args(child) is None


@pytest.mark.parametrize(
    ("child", "ours"),
    [(0, 0), (3, 3), (-signal.SIGTERM, -signal.SIGTERM), (-signal.SIGSEGV, 128 + signal.SIGSEGV)],
)
def test_the_starter_ends_as_its_child_ended(child: int, ours: int) -> None:
    # A signal that asks to stop is repeated (a supervisor sees what it saw when fedsilo
    # exec'd Flower); a crash's signal becomes 128 + it, without a core dump of ours.
    done = subprocess.run(
        [sys.executable, "-c", f"from common.flower_cli import exit_as; exit_as({child})"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert done.returncode == ours
