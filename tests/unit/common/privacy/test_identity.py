"""The site's identity key: created once, private, never overwritten, named when bad."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from common.privacy.errors import LedgerError
from common.privacy.identity import load_or_create_identity, load_public_key


def test_identity_is_created_once_with_private_permissions(tmp_path: Path) -> None:
    # Prepare
    directory = tmp_path / "keys"

    # Execute
    identity = load_or_create_identity(directory)

    # Assert
    key, pub = directory / "identity.key", directory / "identity.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert b"BEGIN PRIVATE KEY" in key.read_bytes()
    assert pub.read_bytes() == identity.public_key_pem()
    assert sorted(p.name for p in directory.iterdir()) == ["identity.key", "identity.pub"]
    load_public_key(pub).verify(identity.sign(b"round 1"), b"round 1")


def test_identity_reloads_and_never_overwrites_the_key(tmp_path: Path) -> None:
    # Prepare
    first = load_or_create_identity(tmp_path)
    key_bytes = (tmp_path / "identity.key").read_bytes()

    # Execute
    second = load_or_create_identity(tmp_path)

    # Assert
    assert second.public_key_pem() == first.public_key_pem()
    assert (tmp_path / "identity.key").read_bytes() == key_bytes


def test_corrupt_key_is_refused_by_name_and_left_alone(tmp_path: Path) -> None:
    # Prepare
    key = tmp_path / "identity.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")

    # Execute
    with pytest.raises(LedgerError, match=r"identity\.key") as caught:
        load_or_create_identity(tmp_path)

    # Assert
    assert "corrupt" in str(caught.value)
    assert key.read_bytes() == b"-----BEGIN PRIVATE KEY-----\ngarbage\n"


def test_bad_public_key_file_is_named(tmp_path: Path) -> None:
    # Prepare
    pub = tmp_path / "site.pub"
    pub.write_text("not a key")

    # Execute / Assert
    with pytest.raises(LedgerError, match=r"site\.pub"):
        load_public_key(pub)
    with pytest.raises(LedgerError, match=r"missing\.pub"):
        load_public_key(tmp_path / "missing.pub")
