"""Coordinator and site folders for the deployment tooling's tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from client.deploy import Site, init_site
from common.pki import load_node_public_key
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
