"""Fixtures of the privacy tests: a site identity and a clean five-entry ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.privacy.identity import SiteIdentity, load_or_create_identity
from common.privacy.ledger import Ledger
from tests.unit.common.privacy.ledgers import PLAN, append


@pytest.fixture
def identity(tmp_path: Path) -> SiteIdentity:
    return load_or_create_identity(tmp_path / "keys")


@pytest.fixture
def ledger_path(tmp_path: Path, identity: SiteIdentity) -> Path:
    """A clean ledger of five realistic entries."""
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    for run_id, rnd in PLAN:
        append(ledger, run_id, rnd)
    return path
