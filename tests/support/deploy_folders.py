"""Coordinator and site folders for the deployment tooling's tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from client.deploy import Site, init_site
from client.roster import make_roster, write_roster
from common.pki import load_node_public_key
from common.privacy.identity import PUBLIC_KEY_FILE, init_state
from server import deploy as coordinator
from tests.support.runs import ROOT

DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def make_site_data(path: Path, rows: int = 20) -> Path:
    lines = ["text,label"] + [
        f"review {i} SECRET-TEXT-{i},{'fresh' if i % 3 else 'rotten'}" for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def site_folder(
    tmp_path: Path, coord: coordinator.Coordinator, name: str = "site-a", **kw: Any
) -> Site:
    data = kw.pop("data", None) or make_site_data(tmp_path / f"{name}.csv")
    return init_site(
        tmp_path / name,
        site_id=name,
        data=data,
        ca=coord.directory / "ca.crt",
        superlink="coord.example.org:8123",
        **kw,
    )


def identity_pub(site: Site) -> Path:
    """A site folder's identity public key (``state/identity.pub``)."""
    return site.directory / "state" / PUBLIC_KEY_FILE


def peer_identity(tmp_path: Path, name: str) -> Path:
    """Another site's ``identity.pub``, as its ``site init`` would have made it."""
    state = tmp_path / "peers" / name / "state"
    init_state(state, site_id=name)
    return state / PUBLIC_KEY_FILE


def roster_file(path: Path, entries: dict[str, Path]) -> Path:
    """A roster of ``name -> identity.pub`` written to ``path``, as `roster make` does."""
    write_roster(path, make_roster([f"{n}={p}" for n, p in entries.items()]), force=True)
    return path


def with_roster(tmp_path: Path, site: Site, peers: int = 2) -> Path:
    """A roster of ``site`` and ``peers`` other sites, installed at ``site`` as
    `fedsilo site roster` does; its path."""
    from client.deploy import install_site_roster

    name = str(site.node_config["site-id"])
    entries = {name: identity_pub(site)}
    entries |= {f"peer-{i}": peer_identity(tmp_path, f"peer-{i}") for i in range(peers)}
    path = roster_file(tmp_path / f"roster-{name}.json", entries)
    install_site_roster(site.directory, path)
    return path


def fake_superlink(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Flower's side of ``coordinator register``, in place of `flwr supernode register`:
    node ids by key fingerprint; a key it already holds is refused as `flwr` reports it."""
    held: dict[str, int] = {}

    def fake_flwr(_coord: object, key: Path, name: str) -> tuple[int | None, str]:
        fp = load_node_public_key(key)[1]
        if fp in held:
            return None, "Using SuperLink: fedsilo [code: 23] Public key already in use."
        held[fp] = 1000 + len(held)
        return held[fp], ""

    monkeypatch.setattr(coordinator, "_flwr_register", fake_flwr)
    return held
