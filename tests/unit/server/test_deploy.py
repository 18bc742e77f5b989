"""The coordinator's tooling: site registration bookkeeping and the Flower CLI
connection."""

from __future__ import annotations

import json
from pathlib import Path

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
