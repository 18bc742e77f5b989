"""Fixtures several unit-test rooms share."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import deploy as coordinator
from server.deploy import init_coordinator


@pytest.fixture
def coord(tmp_path: Path) -> coordinator.Coordinator:
    """A coordinator folder (CA, SuperLink certificate) for the deployment tooling's tests."""
    return init_coordinator(tmp_path / "coord", ["coord.example.org", "10.1.2.3"], port=8123)
