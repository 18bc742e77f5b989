"""The coordinator's tooling: site registration bookkeeping and the Flower CLI
connection."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from common.pki import (
    DeployError,
)
from server import deploy as coordinator
from server.deploy import register_site
from tests.support.deploy_folders import fake_superlink, site_folder

# ---- registration -----------------------------------------------------------------


def test_register_is_idempotent_and_refuses_conflicts(
    tmp_path: Path, coord: coordinator.Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Flower's side: the SuperLink refuses a key it already holds, as `flwr` reports it.
    fake_superlink(monkeypatch)
    a = site_folder(tmp_path, coord, "site-a").directory / "node.pub"
    b = site_folder(tmp_path, coord, "site-b").directory / "node.pub"

    first = register_site(coord.directory, a, "site-a")
    again = register_site(coord.directory, a, "site-a")

    assert first.created and first.node_id == 1000
    assert not again.created and again.node_id == 1000
    with pytest.raises(DeployError, match="'site-a' is already registered with another key"):
        register_site(coord.directory, b, "site-a")
    with pytest.raises(DeployError, match="already registered as site 'site-a'"):
        register_site(coord.directory, a, "site-z")
    with pytest.raises(DeployError, match="--name 'bad name'"):
        register_site(coord.directory, b, "bad name")
    registry = json.loads((coord.directory / "sites.json").read_text())
    assert registry == {"site-a": {"key": first.key_fingerprint, "node_id": 1000}}
    # A key the SuperLink holds but sites.json does not name is not "nothing changed".
    (coord.directory / "sites.json").write_text("{}")
    with pytest.raises(DeployError, match="the SuperLink already holds this key"):
        register_site(coord.directory, a, "site-a")


def test_register_reports_flowers_own_failure_in_one_line(
    tmp_path: Path, coord: coordinator.Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        coordinator,
        "_flwr_register",
        lambda *_: (None, "Using SuperLink: fedsilo Connection to the SuperLink is unavailable."),
    )
    pub = site_folder(tmp_path, coord).directory / "node.pub"
    with pytest.raises(DeployError, match=r"^registering 'site-a' failed: .*unavailable\.$"):
        register_site(coord.directory, pub, "site-a")
    with pytest.raises(DeployError, match="not a coordinator folder"):
        register_site(tmp_path, pub, "site-a")


def test_flwr_cli_connection_points_at_loopback_with_the_ca(
    coord: coordinator.Coordinator,
) -> None:
    import tomllib

    config = tomllib.loads((coord.directory / "flwr" / "config.toml").read_text())
    assert config["superlink"]["default"] == "fedsilo"
    assert config["superlink"]["fedsilo"] == {
        "address": "127.0.0.1:8123",
        "root-certificates": str(coord.directory / "ca.crt"),
    }


# ---- status ---------------------------------------------------------------------------


def _flower_node_list(nodes: list[tuple[int, str]]) -> str:
    """``flwr supernode list --format json`` as Flower 1.42 prints it: its own
    formatting (flwr/cli/supernode/ls.py) pretty-printed by rich, as
    ``print_json_to_stdout`` does."""
    import io

    from flwr.cli.supernode.ls import _format_nodes, _to_json
    from flwr.proto.node_pb2 import NodeInfo
    from rich.console import Console

    now = "2026-12-01T10:00:00+00:00"
    info = [
        NodeInfo(node_id=node_id, owner_name="none", status=status,
                 registered_at="2026-12-01T09:00:00+00:00",
                 last_activated_at="2026-12-01T09:30:00+00:00" if status != "registered" else "")
        for node_id, status in nodes
    ]  # fmt: skip
    out = io.StringIO()
    Console(file=out, width=60).print_json(_to_json(_format_nodes(info, now), verbose=False))
    return out.getvalue()


def test_the_node_list_is_read_from_flowers_own_json() -> None:
    from server.deploy import parse_node_list

    big = 18426453981955164413  # node ids are 64-bit, printed as strings
    text = _flower_node_list([(big, "online"), (7, "registered"), (8, "offline")])
    assert '"node-id": "18426453981955164413"' in text

    assert parse_node_list(text) == {big: "online", 7: "registered", 8: "offline"}


def test_flwrs_failure_is_one_line_without_its_chatter() -> None:
    import io
    import json

    from rich.console import Console

    from server.deploy import parse_node_list

    # flwr's --format json error (flwr/supercore/logger.py print_json_error), for the
    # message its Control API client gives when nothing answers.
    out = io.StringIO()
    message = (
        "Using SuperLink: fedsilo (127.0.0.1:8123)\nListing all nodes...\n\n"
        "Connection to the SuperLink is unavailable. Please check your network "
        "connection and 'address' in the SuperLink connection configuration."
    )
    Console(file=out).print_json(json.dumps({"success": False, "error-message": message}))
    with pytest.raises(ValueError, match=r"^nothing answers there$"):
        parse_node_list(out.getvalue())
    with pytest.raises(ValueError, match="no JSON"):
        parse_node_list("Traceback (most recent call last): ...")


def _row(site: str, spent: float | None, budget: float | None, head: str | None) -> Any:
    from common.outputs import SiteSummary

    return SiteSummary(site=site, lifetime_epsilon=spent, budget=budget, ledger_head=head)


def test_the_newest_run_that_names_a_site_gives_its_budget() -> None:
    from server.deploy import budget_words, latest_site_rows
    from tests.support.summaries import federated

    newer = federated(0.7, sites=(_row("a", 2.5, 8.0, "ab" * 32),))
    older = federated(0.6, sites=(_row("a", 1.0, 8.0, "cd" * 32), _row("b", None, None, None)))

    rows = latest_site_rows([("20261202-100000", newer), ("20261201-100000", older)])

    assert budget_words(rows.get("a")) == (
        "spent 2.500 of 8 (left 5.500) as of run 20261202-100000, ledger head abababababab"
    )
    assert budget_words(rows.get("b")).startswith("no budget reported in run 20261201-100000")
    assert budget_words(rows.get("c")) == "no run yet"
    going = newer.model_copy(update={"complete": False})  # rewritten after every round
    rows = latest_site_rows([("20261203-100000", going)])
    assert "as of run 20261203-100000 (in progress), ledger head" in budget_words(rows["a"])


def test_status_lists_every_registered_site_with_its_node_state_and_budget(
    coord: coordinator.Coordinator,
) -> None:
    from server.deploy import latest_site_rows, status_lines
    from tests.support.summaries import federated

    registry = {"site-a": {"node_id": 11}, "site-b": {"node_id": 12}, "site-c": {"node_id": 13}}
    rows = latest_site_rows([("r1", federated(0.7, sites=(_row("site-a", 1.0, 4.0, "0f" * 32),)))])
    up = {11: "online", 12: "registered", 99: "offline"}

    lines = status_lines(coord, registry, up, "", rows, running_pid=4321)

    assert (
        lines[0] == "SuperLink 127.0.0.1:8123 (PID 4321): running; 1 of 3 registered sites online"
    )
    assert re.match(
        r"  site-a  node 11  online +spent 1\.000 of 4 \(left 3\.000\) as of run r1, ledger head 0f0f0f0f0f0f$",
        lines[1],
    )
    assert re.match(r"  site-b  node 12  offline \(never connected\) +no run yet$", lines[2])
    assert "site-c  node 13  not at the SuperLink" in lines[3]
    assert lines[4] == "  node 99 is at the SuperLink (offline) but not in sites.json"

    down = status_lines(coord, registry, None, "nothing answers there", rows)

    assert down[0].startswith(
        "SuperLink 127.0.0.1:8123: not answering (nothing answers there); start it with `fedsilo coordinator start"
    )
    assert [ln.split()[0] for ln in down[1:]] == ["site-a", "site-b", "site-c"]
    assert all("status unknown" in ln for ln in down[1:])
    assert "spent 1.000 of 4" in down[1]


def test_status_without_a_superlink_reads_the_folder_and_says_so(tmp_path: Path) -> None:
    # The real `flwr supernode list`, against a port where nothing listens.
    import os

    from client.deploy import free_port
    from common.outputs import write_summary
    from server.deploy import coordinator_status, init_coordinator
    from tests.support.summaries import federated

    coord = init_coordinator(tmp_path / "coord", ["localhost"], port=free_port())
    (coord.directory / "sites.json").write_text(
        json.dumps({"site-a": {"key": "k", "node_id": 5}, "site-b": {"key": "l", "node_id": 6}})
    )
    runs = coord.directory / "runs"
    old = write_summary(
        runs / "20261201-000000", federated(0.6, sites=(_row("site-a", 1.0, 8.0, "aa" * 32),))
    )
    new = write_summary(
        runs / "20261202-000000", federated(0.6, sites=(_row("site-a", 3.0, 8.0, "bb" * 32),))
    )
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    (runs / "broken").mkdir()
    (runs / "broken" / "summary.json").write_text("{")

    lines = coordinator_status(coord.directory)

    assert lines[0].startswith(
        f"SuperLink {coord.control_address}: not answering (nothing answers there)"
    )
    assert "site-a  node 5  status unknown" in lines[1]
    assert lines[1].endswith(
        "spent 3.000 of 8 (left 5.000) as of run 20261202-000000, ledger head bbbbbbbbbbbb"
    )
    assert lines[2].endswith("no run yet")
    assert lines[3].startswith(
        f"note: {runs / 'broken' / 'summary.json'} skipped (not readable JSON"
    )


def test_the_superlinks_exit_is_said_in_words(coord: coordinator.Coordinator) -> None:
    import signal

    from server.deploy import superlink_exit_cause

    # uvicorn's words when the port is taken (a real `coordinator start`, 1.42).
    taken = (
        "2026-12-02T16:00:52.223Z ERROR [uvicorn.error] [Errno 98] error while attempting "
        "to bind on address ('0.0.0.0', 18123): address already in use\n"
        "2026-12-02T16:00:52.223Z INFO [uvicorn.error] Waiting for application shutdown.\n"
    )
    assert superlink_exit_cause(1, taken, coord) == (
        "a port the SuperLink needs is taken ([Errno 98] error while attempting to bind on "
        "address ('0.0.0.0', 18123): address already in use): another SuperLink or program "
        "listens there (`ss -ltnp` names it); stop it first"
    )
    assert superlink_exit_cause(-signal.SIGTERM, taken, coord) is None
    assert superlink_exit_cause(0, "", coord) is None
    flower = "\x1b[91mERROR \x1b[0m:     Exit Code: 105\nThe database schema does not match\n"
    assert superlink_exit_cause(1, flower, coord) == (
        "flower-superlink exited with status 1 (Flower exit code 105: The database schema "
        "does not match); its log is above"
    )
