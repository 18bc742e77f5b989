"""The federation's roster of identity keys (issue 13): one key per site name and one
name per key, a canonical JSON form with a stable fingerprint, strict reading, and the
simulation's enrolment that never replaces a listed key."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from common.secagg.roster import ROSTER_FILE, Roster, RosterError, enrol
from tests.unit.common.secagg.rounds import identity_keys, public, roster_of

KEYS = {u: public(k) for u, k in identity_keys(range(1, 4)).items()}


def test_roster_json_round_trip_and_fingerprint() -> None:
    # Prepare
    roster = roster_of(identity_keys(range(1, 4)))

    # Execute
    again = Roster.from_json(roster.to_json())
    reordered = Roster(dict(reversed(list(roster.sites.items()))))

    # Assert: the fingerprint does not depend on the order the sites were listed in.
    assert again == roster
    assert roster.name_of(KEYS[2]) == "site-2"
    assert roster.name_of(bytes(32)) is None
    assert reordered.fingerprint() == roster.fingerprint()
    assert roster.fingerprint().startswith("sha256:")
    assert Roster({"site-1": KEYS[1]}).fingerprint() != roster.fingerprint()


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        ({"a": KEYS[1], "b": KEYS[1]}, "one key for both a and b"),
        ({"a b": KEYS[1]}, "must be 1-64 letters"),
        ({"": KEYS[1]}, "must be 1-64 letters"),
        ({"a": KEYS[1][:31]}, "raw 32-byte Ed25519 key"),
    ],
)
def test_roster_refuses_shared_keys_and_bad_entries(sites: dict[str, bytes], message: str) -> None:
    # Execute / Assert
    with pytest.raises(RosterError, match=message):
        Roster(sites)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "is not JSON"),
        ("[]", "is not a fedsilo-roster/1 file"),
        ('{"format": "fedsilo-roster/1", "sites": {}}', "'sites' must be a list"),
        ('{"format": "fedsilo-roster/1", "sites": [{"name": "a"}]}', "exactly {name, identity}"),
        (
            '{"format": "fedsilo-roster/1", "sites": [{"name": "a", "identity": "!!"}]}',
            "not base64",
        ),
    ],
)
def test_roster_from_malformed_json_is_refused(text: str, message: str) -> None:
    # Execute / Assert
    with pytest.raises(RosterError, match=message):
        Roster.from_json(text)


def test_roster_listing_a_name_twice_is_refused() -> None:
    # Prepare
    entry = {"name": "a", "identity": base64.b64encode(KEYS[1]).decode()}
    text = json.dumps({"format": "fedsilo-roster/1", "sites": [entry, entry]})

    # Execute / Assert
    with pytest.raises(RosterError, match="listed twice"):
        Roster.from_json(text)


def test_a_missing_roster_names_the_way_to_install_one(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(RosterError, match=r"no roster at .*`fedsilo site roster`"):
        Roster.load(tmp_path / ROSTER_FILE)


def test_enrol_adds_each_site_once_and_never_replaces_a_key(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "sites" / ROSTER_FILE

    # Execute
    enrol(path, "site-1", KEYS[1])
    roster = enrol(path, "site-2", KEYS[2])
    again = enrol(path, "site-2", KEYS[2])  # a restarted site enrols again: no change

    # Assert
    assert roster == again == Roster.load(path)
    assert roster.sites == {"site-1": KEYS[1], "site-2": KEYS[2]}
    with pytest.raises(RosterError, match="lists another key for site-1"):
        enrol(path, "site-1", KEYS[3])
    with pytest.raises(RosterError, match="one key for both"):
        enrol(path, "site-3", KEYS[1])
    assert Roster.load(path) == roster


def test_a_roster_refuses_a_key_of_small_order() -> None:
    # Anyone could sign as it (tests/unit/common/secagg/test_crypto.py shows how).
    with pytest.raises(RosterError, match="site-x is a point of small order"):
        Roster({"site-x": b"\x01" + bytes(31)})
