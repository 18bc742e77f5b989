"""A site's tooling: init (keys kept on --force), the node config read back through
Flower into the ClientApp's settings, the SuperNode's flags, and site check."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from flwr.common.config import parse_config_args

from client.deploy import (
    Site,
    check_site,
    init_site,
    init_summary,
    node_config_toml,
    render_node_config,
    supernode_command,
)
from client.settings import SiteSettings
from common.config import RunConfig
from common.pki import (
    DeployError,
)
from server import deploy as coordinator
from server.deploy import superlink_command
from tests.support.deploy_folders import BIN, make_site_data, site_folder, with_roster

# ---- site init ---------------------------------------------------------------------


def test_site_init_again_refuses_and_force_keeps_the_keys(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = site_folder(tmp_path, coord)
    keys = {p: p.read_bytes() for p in (site.node_key, site.directory / "state" / "identity.key")}

    with pytest.raises(DeployError, match="already holds a site; use --force"):
        site_folder(tmp_path, coord)
    changed = site_folder(tmp_path, coord, epsilon=3.0, force=True)

    assert changed.node_config["epsilon"] == 3.0
    assert Site.load(site.directory).node_config["epsilon"] == 3.0
    assert {p: p.read_bytes() for p in keys} == keys


# ---- node config ------------------------------------------------------------------


def test_node_config_file_reads_back_through_flower_into_site_settings(tmp_path: Path) -> None:
    # Paths with spaces and quotes survive: the file is TOML, not a flag string.
    odd = tmp_path / "my data 'v2'"
    odd.mkdir()
    config = render_node_config(
        site_id="hospital-a",
        data_path=odd / "notes.csv",
        state_dir=odd / "state",
        epsilon=4.0,
        delta=1e-6,
        text_column="note",
        label_column="outcome",
        data_size=1200,
        disjoint_data_set="notes-2025",
    )
    path = tmp_path / "node-config.toml"
    path.write_text(node_config_toml(config))

    read = parse_config_args([str(path)])  # what flower-supernode does with the flag

    settings = SiteSettings.from_node_config(read, RunConfig())
    assert settings.site_id == "hospital-a"
    assert settings.data_path == str(odd / "notes.csv")
    assert settings.state_dir == odd / "state"
    assert (settings.epsilon, settings.delta) == (4.0, 1e-6)
    assert (settings.text_column, settings.label_column) == ("note", "outcome")
    assert (settings.declared_size, settings.disjoint_data_set) == (1200, "notes-2025")
    assert not settings.allow_no_dp


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"epsilon": 0.0}, "epsilon budget must be positive"),
        ({"epsilon": float("nan")}, "finite"),
        ({"delta": 1.0}, "delta must be in"),
        ({"site_id": "bad name"}, "site-id 'bad name'"),
        ({"text_column": "label"}, "must differ"),
        ({"data_size": 0}, "'data-size' must be a whole number"),
        ({"disjoint_data_set": "a b"}, "'disjoint-data-set'"),
    ],
)
def test_node_config_values_the_client_app_would_refuse_are_refused_now(
    tmp_path: Path, kw: dict[str, Any], match: str
) -> None:
    args: dict[str, Any] = {
        "site_id": "a",
        "data_path": tmp_path / "d.csv",
        "state_dir": tmp_path / "s",
        "epsilon": 8.0,
        "delta": 1e-5,
        "text_column": "text",
        "label_column": "label",
        "data_size": 100,
    }
    args.update(kw)
    with pytest.raises(DeployError, match=match):
        render_node_config(**args)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"superlink": "no-port"}, "--superlink 'no-port'"),
        ({"superlink": "host:99999"}, "HOST:PORT"),
        ({"data": Path("/nonexistent/site.csv")}, "--data /nonexistent/site.csv: no such file"),
        ({"dataset": "mnist"}, "--dataset 'mnist'"),
    ],
)
def test_bad_site_inputs_are_named(
    tmp_path: Path, coord: coordinator.Coordinator, kw: dict[str, Any], match: str
) -> None:
    args: dict[str, Any] = {
        "site_id": "a",
        "data": make_site_data(tmp_path / "d.csv"),
        "ca": coord.directory / "ca.crt",
        "superlink": "h:1",
    }
    args.update(kw)
    with pytest.raises(DeployError, match=re.escape(match)):
        init_site(tmp_path / "site", **args)
    assert not (tmp_path / "site" / "node.key").exists()


def test_site_start_flags(tmp_path: Path, coord: coordinator.Coordinator) -> None:
    site = site_folder(tmp_path, coord)
    cmd = supernode_command(site, port=9555)
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert cmd[0] == "flower-supernode"
    assert flags == {
        "--superlink": "coord.example.org:8123",
        "--root-certificates": str(site.directory / "ca.crt"),
        "--auth-supernode-private-key": str(site.directory / "node.key"),
        "--node-config": str(site.directory / "node-config.toml"),
        "--host": "127.0.0.1",
        "--port": "9555",
    }


def _flags_of(command: str) -> set[str]:
    done = subprocess.run(
        [str(BIN / command), "--help"], capture_output=True, text=True, timeout=60
    )
    return set(re.findall(r"--[a-z][a-z-]+", done.stdout))


def test_every_flag_we_pass_exists_in_this_flower(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = site_folder(tmp_path, coord)
    ours_node = {a for a in supernode_command(site, port=1) if a.startswith("--")}
    ours_link = {a for a in superlink_command(coord) if a.startswith("--")}
    assert ours_node <= _flags_of("flower-supernode")
    assert ours_link <= _flags_of("flower-superlink")


# ---- site check -------------------------------------------------------------------


def test_site_check_prints_counts_only(tmp_path: Path, coord: coordinator.Coordinator) -> None:
    site = site_folder(tmp_path, coord)
    with_roster(tmp_path, site)

    report = check_site(site.directory)

    assert report.problems == []
    text = "\n".join(report.lines)
    assert "20 rows, 0 rejected (rotten: 7, fresh: 13)" in text
    assert "0 entries" in text
    assert "ok    roster " in text
    assert "SECRET" not in text


def test_site_check_states_the_lifetime_spend_the_clientapp_enforces(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    # Entries on two different data files (and at another delta): the check composes
    # both under the adaptive filter at the site's delta, as the ClientApp does.
    from client.settings import SiteSettings
    from common.config import RunConfig
    from common.privacy.accounting import filter_epsilon
    from common.privacy.events import SubsampledGaussianEvent
    from common.privacy.identity import open_state
    from common.privacy.ledger import LEDGER_FILE, Ledger

    site = site_folder(tmp_path, coord)
    settings = SiteSettings.from_node_config(site.node_config, RunConfig())
    assert settings.state_dir is not None
    event = SubsampledGaussianEvent(1.0, 0.5, 10)
    ledger = Ledger(settings.state_dir / LEDGER_FILE, open_state(settings.state_dir).identity)
    for run, dataset in (("r1", "a" * 64), ("r2", "b" * 64)):
        ledger.append(
            site_id="site-a",
            dataset=dataset,
            run_id=run,
            round=1,
            event=event,
            clip_norm=1.0,
            delta=0.1,
            rounds=1,
            public_size=20,
            epsilon_target=1.0,
            epsilon_run=1.0,
            epsilon_lifetime=filter_epsilon([event] * 2, 0.1),
            budget=settings.epsilon,
            code_version="test",
        )

    text = "\n".join(check_site(site.directory).lines)

    enforced = filter_epsilon([event, event], settings.delta)
    assert f"lifetime epsilon spent {enforced:.3f} of 8 (site, adaptive filter)" in text


def test_init_declares_the_files_size_public_and_check_holds_the_file_to_it(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = site_folder(tmp_path, coord)  # 20 rows
    assert site.node_config["data-size"] == 20
    assert "public size   20 examples" in init_summary(site)
    small = site_folder(tmp_path, coord, name="site-b", data_size=10)
    problems = check_site(small.directory).problems
    assert any("more than the declared public size 10" in p for p in problems)


def test_site_check_names_bad_data_and_loose_keys(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    data = make_site_data(tmp_path / "d.csv")
    site = site_folder(tmp_path, coord, data=data)
    data.write_text(data.read_text() + ",fresh\n")  # an empty text on line 22
    site.node_key.chmod(0o644)

    report = check_site(site.directory)

    assert any("d.csv line 22: empty text" in p for p in report.problems)
    assert any("readable by others (mode 0644)" in p for p in report.problems)
    assert "SECRET" not in "\n".join(report.lines)


def test_site_check_refuses_a_delta_not_below_one_over_n(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = site_folder(tmp_path, coord, data=make_site_data(tmp_path / "d.csv", rows=5), delta=0.5)
    report = check_site(site.directory)
    assert any("delta 0.5 is not below 1/n" in p for p in report.problems)


def test_site_check_of_a_missing_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="run `fedsilo site init` first"):
        check_site(tmp_path / "nothing")
