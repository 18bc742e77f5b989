"""The deployment tooling against a real SuperLink on loopback (`fedsilo coordinator
start`, about 4 s to start): the PID files of `coordinator start`/`site start`, their
stop commands, `site check --connect`'s registration probe, a refused SuperNode's
cause, and `coordinator status`. Every process is started here, stopped by its PID,
every wait bounded; the SuperExec helpers Flower starts leave with their parents."""

from __future__ import annotations

import io
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.deploy import (
    CheckReport,
    Site,
    SupernodeExit,
    check_connection,
    claim_supernode,
    free_port,
    init_site,
    run_supernode,
    stop_supernode,
    supernode_command,
    supernode_env,
)
from common.flower_cli import executable, process_args, read_pid
from common.pki import DeployError
from server.deploy import (
    Coordinator,
    claim_superlink,
    coordinator_status,
    init_coordinator,
    register_site,
    stop_coordinator,
)
from tests.support.deploy_folders import BIN, make_site_data


def _wait(what: str, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Link:
    coord: Coordinator
    starter: subprocess.Popen[bytes]  # `fedsilo coordinator start`
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _start_superlink(root: Path) -> Link:
    coord = init_coordinator(root / "coord", ["localhost"], port=free_port())
    log = root / "superlink.log"
    with log.open("wb") as out:
        starter = subprocess.Popen(
            [str(BIN / "fedsilo"), "coordinator", "start", str(coord.directory), "--bind", "127.0.0.1"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    link = Link(coord, starter, log)
    _wait(
        "the SuperLink to listen",
        lambda: "Uvicorn running" in link.text() or starter.poll() is not None,
    )
    assert starter.poll() is None, link.text()[-3000:]
    return link


def _stop_superlink(link: Link) -> None:
    if (link.coord.directory / "superlink.pid").exists():
        stop_coordinator(link.coord.directory, timeout=30)
    if link.starter.poll() is None:
        link.starter.terminate()
    link.starter.wait(timeout=30)


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Link]:
    started = _start_superlink(tmp_path_factory.mktemp("live"))
    try:
        yield started
    finally:
        _stop_superlink(started)


def _site(link: Link, name: str) -> Site:
    root = link.coord.directory.parent
    return init_site(
        root / name,
        site_id=name,
        data=make_site_data(root / f"{name}.csv"),
        ca=link.coord.directory / "ca.crt",
        superlink=f"localhost:{link.coord.port}",
    )


def _status_of(link: Link, name: str) -> str:
    return next(ln for ln in coordinator_status(link.coord.directory) if f"  {name}  " in ln)


# ---- coordinator start / stop ------------------------------------------------------------


def test_coordinator_start_keeps_its_superlinks_pid_and_stop_ends_it(tmp_path: Path) -> None:
    started = _start_superlink(tmp_path)
    try:
        pid_file = started.coord.directory / "superlink.pid"
        pid = read_pid(pid_file)
        assert pid is not None and pid != started.starter.pid
        args = process_args(pid) or []
        assert Path(args[1]).name == "flower-superlink" and "--enable-supernode-auth" in args
        with pytest.raises(
            DeployError, match=rf"flower-superlink already runs for this folder \(PID {pid}"
        ):
            claim_superlink(started.coord)

        said = stop_coordinator(started.coord.directory, timeout=30)

        assert said == f"stopped flower-superlink (PID {pid})"
        # The starter ends as the SuperLink did: uvicorn re-raises SIGTERM after its
        # clean shutdown, as it did when fedsilo exec'd it.
        assert started.starter.wait(timeout=30) == -signal.SIGTERM
        assert "error:" not in started.text()
        assert process_args(pid) is None and not pid_file.exists()
    finally:
        _stop_superlink(started)


# ---- site check --connect at a real SuperLink ------------------------------------------


def test_the_probe_tells_a_registered_key_from_an_unregistered_one_and_activates_neither(
    link: Link,
) -> None:
    known, unknown = _site(link, "probe-a"), _site(link, "probe-b")
    register_site(link.coord.directory, known.directory / "node.pub", "probe-a")
    reports = {s: CheckReport() for s in ("probe-a", "probe-b")}

    check_connection(reports["probe-a"], known, timeout=10)
    check_connection(reports["probe-b"], unknown, timeout=10)

    assert reports["probe-a"].problems == []
    assert reports["probe-a"].lines[1].startswith("ok    node key registered at the coordinator")
    assert reports["probe-b"].problems == [
        "this node's key is not registered at the coordinator (hand "
        f"{unknown.directory / 'node.pub'} to the coordinator: `fedsilo coordinator register "
        "node.pub --name probe-b --ledger-key identity.pub`)"
    ]
    # Registered and never brought online (Flower's "registered" status).
    assert "offline (never connected)" in _status_of(link, "probe-a")
    assert "[ApiError:2003]" in link.text()  # the SuperLink logged the refusal


# ---- site start / stop ------------------------------------------------------------------


def _run(site: Site, ended: list[SupernodeExit], out: io.BytesIO, err: io.BytesIO) -> None:
    cmd = supernode_command(site, port=free_port())
    cmd[0] = executable(cmd[0])
    ended.append(
        run_supernode(site, cmd, supernode_env(site), claim_supernode(site), stdout=out, stderr=err)
    )


def test_a_supernode_with_an_unregistered_key_stops_with_that_cause(link: Link) -> None:
    site = _site(link, "start-b")
    ended: list[SupernodeExit] = []

    _run(site, ended, io.BytesIO(), err := io.BytesIO())

    assert ended[0].returncode == 1  # Flower's status for every failure
    assert ended[0].cause == (
        "this node's key is not registered at the coordinator (hand "
        f"{site.directory / 'node.pub'} to the coordinator: `fedsilo coordinator register "
        "node.pub --name start-b --ledger-key identity.pub`)"
    )
    # Flower's own log, passed on
    assert b"[code: 2004] Failed to activate SuperNode." in err.getvalue()
    assert not (site.directory / "supernode.pid").exists()


def test_site_stop_ends_the_running_supernode_which_leaves_the_superlink(link: Link) -> None:
    site = _site(link, "start-a")
    register_site(link.coord.directory, site.directory / "node.pub", "start-a")
    ended: list[SupernodeExit] = []
    err = io.BytesIO()
    starter = threading.Thread(target=_run, args=(site, ended, io.BytesIO(), err))
    starter.start()
    try:
        _wait("the SuperNode to come online", lambda: b"SuperNode ID:" in err.getvalue())
        pid = read_pid(site.directory / "supernode.pid")
        assert pid is not None and "online" in _status_of(link, "start-a").split()
        with pytest.raises(
            DeployError, match=rf"flower-supernode already runs for this folder \(PID {pid}"
        ):
            claim_supernode(site)

        said = stop_supernode(site.directory, timeout=30)

        starter.join(timeout=30)
        assert said.startswith(f"stopped flower-supernode (PID {pid})")
        assert ended == [SupernodeExit(0, None)]
        assert not (site.directory / "supernode.pid").exists()
        assert "offline" in _status_of(link, "start-a").split()
    finally:
        if starter.is_alive():
            stop_supernode(site.directory, timeout=30)
            starter.join(timeout=30)
