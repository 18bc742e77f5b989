"""The federation's roster at a deployed site: `roster make` / `show` from the sites'
identity keys, `site roster` (installed only with the site itself on it), `site init
--roster / --secagg-min-sites`, and the roster line of `site check`."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.deploy import check_site, init_summary, install_site_roster, roster_summary
from client.roster import describe_roster, make_roster, read_roster, write_roster
from client.settings import SiteSettings
from common.config import RunConfig
from common.pki import DeployError
from common.privacy.identity import key_fingerprint, load_public_key
from common.secagg.roster import FORMAT, ROSTER_FILE, Roster
from server import deploy as coordinator
from tests.support.deploy_folders import (
    identity_pub,
    peer_identity,
    roster_file,
    site_folder,
    with_roster,
)

# ---- roster make / show -----------------------------------------------------------


def test_make_lists_every_site_under_its_name_and_describes_each_key(tmp_path: Path) -> None:
    keys = {n: peer_identity(tmp_path, n) for n in ("site-a", "site-b", "site-c")}

    roster = make_roster([f"{n}={p}" for n, p in keys.items()])
    write_roster(tmp_path / "roster.json", roster)

    read = Roster.load(tmp_path / "roster.json")  # as the ClientApp reads it
    assert read == roster and read.fingerprint() == roster.fingerprint()
    assert {n: k for n, k in read.sites.items()} == {
        n: load_public_key(p).public_bytes_raw() for n, p in keys.items()
    }
    lines = describe_roster(read)
    assert lines[0] == f"roster fingerprint {roster.fingerprint()} (3 sites)"
    for name, path in keys.items():  # what `site init` printed for each site's key
        assert f"  {name}  {key_fingerprint(load_public_key(path))}" in lines


def _ec_public_pem(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("site-a={a}", "--site 'site-a=.*': site site-a is listed twice"),
        ("site-c={a}", "--site 'site-c=.*': the same identity key as site site-a"),
        ("site-c={ec}", "--site 'site-c=.*ec.pem': .*not an Ed25519 public key"),
        ("site-c={junk}", "--site 'site-c=.*junk.pub': .*unreadable or corrupt public key"),
        ("site-c={missing}", "--site 'site-c=.*missing.pub': .*unreadable"),
        ("site-c", "--site 'site-c': expected NAME=PATH"),
        ("bad name={a}", "site name 'bad name': use 1-64 letters"),
    ],
)
def test_make_refuses_a_bad_entry_by_name(tmp_path: Path, entry: str, match: str) -> None:
    paths = {
        "a": peer_identity(tmp_path, "site-a"),
        "ec": _ec_public_pem(tmp_path / "ec.pem"),
        "junk": tmp_path / "junk.pub",
        "missing": tmp_path / "missing.pub",
    }
    paths["junk"].write_text("ssh-ed25519 AAAA not a PEM\n")
    good = [f"site-a={paths['a']}", f"site-b={peer_identity(tmp_path, 'site-b')}"]

    with pytest.raises(DeployError, match=match):
        make_roster([*good, entry.format(**paths)])


def test_make_needs_two_sites_and_does_not_overwrite_without_force(tmp_path: Path) -> None:
    a, b = peer_identity(tmp_path, "site-a"), peer_identity(tmp_path, "site-b")
    with pytest.raises(DeployError, match="at least 2 sites"):
        make_roster([f"site-a={a}"])
    out = roster_file(tmp_path / "roster.json", {"site-a": a, "site-b": b})
    before = out.read_text()

    with pytest.raises(DeployError, match="exists; use --force"):
        write_roster(out, make_roster([f"site-a={b}", f"site-b={a}"]))
    assert out.read_text() == before


def _raw_key() -> str:
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    return base64.b64encode(raw).decode()


_KEY, _OTHER = _raw_key(), _raw_key()


def _roster_json(**change: Any) -> dict[str, Any]:
    key, other = _KEY, _OTHER
    raw: dict[str, Any] = {
        "format": FORMAT,
        "sites": [{"name": "site-a", "identity": key}, {"name": "site-b", "identity": other}],
    }
    raw.update(change)
    return raw


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"format": "fedsilo-roster/1", "sites": [', "is not JSON"),
        (json.dumps(_roster_json(format="other/1")), "is not a fedsilo-roster/1 file"),
        (
            json.dumps(
                _roster_json(
                    sites=[{"name": "site-a", "identity": base64.b64encode(b"x" * 65).decode()}]
                )
            ),
            "key of site-a must be a raw 32-byte Ed25519 key",
        ),
        (
            json.dumps(
                _roster_json(
                    sites=[
                        {"name": "site-a", "identity": _KEY},
                        {"name": "site-a", "identity": _KEY},
                    ]
                )
            ),
            "site 'site-a' is listed twice",
        ),
        (
            json.dumps(
                _roster_json(
                    sites=[
                        {"name": "site-a", "identity": _KEY},
                        {"name": "site-b", "identity": _KEY},
                    ]
                )
            ),
            "one key for both site-a and site-b",
        ),
        (
            json.dumps(_roster_json(sites=[{"name": "site-a", "identity": "not base64!"}])),
            "identity of site-a is not base64",
        ),
    ],
)
def test_a_roster_file_a_site_would_refuse_is_refused_naming_it(
    tmp_path: Path, text: str, match: str
) -> None:
    path = tmp_path / "roster.json"
    path.write_text(text)
    with pytest.raises(DeployError, match=match) as info:
        read_roster(path)
    assert str(path) in str(info.value)


def test_reading_a_missing_roster_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match=re.escape(f"roster {tmp_path / 'x.json'}: no such")):
        read_roster(tmp_path / "x.json")


# ---- site roster ------------------------------------------------------------------


def test_site_roster_installs_where_the_client_app_reads_it(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = site_folder(tmp_path, coord)
    path = roster_file(
        tmp_path / "roster.json",
        {
            "site-a": identity_pub(site),
            "site-b": peer_identity(tmp_path, "site-b"),
            "site-c": peer_identity(tmp_path, "site-c"),
        },
    )

    installed = install_site_roster(site.directory, path)

    settings = SiteSettings.from_node_config(site.node_config, RunConfig())
    assert installed.path == settings.roster_path == site.directory / "state" / ROSTER_FILE
    assert Roster.load(installed.path) == read_roster(path)
    text = roster_summary(installed)
    assert f"installed roster {installed.path}" in text
    assert f"fingerprint     {read_roster(path).fingerprint()}" in text
    assert "3 sites: site-a, site-b, site-c" in text and "old fingerprint" not in text
    assert installed.path.stat().st_mode & 0o777 == 0o644


def test_replacing_a_roster_prints_the_old_and_new_fingerprints(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = site_folder(tmp_path, coord)
    first = with_roster(tmp_path, site, peers=2)
    bigger = roster_file(
        tmp_path / "bigger.json",
        {"site-a": identity_pub(site)}
        | {f"peer-{i}": peer_identity(tmp_path, f"peer-{i}") for i in range(3)},
    )

    again = install_site_roster(site.directory, first)
    replaced = install_site_roster(site.directory, bigger)

    assert "was already installed: nothing changed" in roster_summary(again)
    text = roster_summary(replaced)
    assert f"old fingerprint {read_roster(first).fingerprint()}" in text
    assert f"fingerprint     {read_roster(bigger).fingerprint()}" in text
    assert Roster.load(replaced.path) == read_roster(bigger)


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        (
            {"peer-0": "peer-0", "peer-1": "peer-1", "peer-2": "peer-2"},
            r"this site \(site-a, identity key sha256:[0-9a-f]{64}\) is not on the roster",
        ),
        (
            {"site-x": "self", "peer-0": "peer-0", "peer-1": "peer-1"},
            "lists this site's identity key .* as 'site-x', not as its site-id 'site-a'",
        ),
        (
            {"site-a": "peer-2", "peer-0": "peer-0", "peer-1": "peer-1"},
            "lists site-a with another identity key .* than this site's own",
        ),
        (
            {"site-a": "self", "peer-0": "peer-0"},
            "lists 2 sites, fewer than this site's secagg-min-sites 3",
        ),
    ],
)
def test_site_roster_refuses_a_roster_without_this_site_as_itself(
    tmp_path: Path, coord: coordinator.Coordinator, entries: dict[str, str], match: str
) -> None:
    site = site_folder(tmp_path, coord)
    keys = {"self": identity_pub(site)}
    keys |= {f"peer-{i}": peer_identity(tmp_path, f"peer-{i}") for i in range(3)}
    path = roster_file(tmp_path / "roster.json", {n: keys[k] for n, k in entries.items()})

    with pytest.raises(
        DeployError, match=f"roster {re.escape(str(path))} not installed: .*{match}"
    ):
        install_site_roster(site.directory, path)
    assert not (site.directory / "state" / ROSTER_FILE).exists()


# ---- site init --secagg-min-sites / --roster ---------------------------------------


def test_init_writes_the_sites_minimum_into_the_node_config(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    default = site_folder(tmp_path, coord)
    pair = site_folder(tmp_path, coord, name="site-b", min_secure_sites=2)

    assert default.node_config["secagg-min-sites"] == 3
    assert pair.node_config["secagg-min-sites"] == 2
    settings = SiteSettings.from_node_config(pair.node_config, RunConfig())
    assert settings.min_secure_sites == 2
    assert "at least 2 sites of its roster" in init_summary(pair)
    assert "learns this site's update" in init_summary(pair)
    with pytest.raises(DeployError, match="'secagg-min-sites' must be at least 2, got 1"):
        site_folder(tmp_path, coord, name="site-c", min_secure_sites=1)
    assert not (tmp_path / "site-c").exists()


def test_init_with_a_roster_installs_it_only_for_a_site_whose_key_is_on_it(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    # A new site has no identity key yet, so no roster can list it: refused, nothing written.
    other = roster_file(
        tmp_path / "other.json",
        {n: peer_identity(tmp_path, n) for n in ("peer-0", "peer-1", "peer-2")},
    )
    with pytest.raises(DeployError, match="this site has no identity key yet"):
        site_folder(tmp_path, coord, roster=other)
    assert not (tmp_path / "site-a").exists()
    site = site_folder(tmp_path, coord)
    assert "roster        none yet" in init_summary(site)
    assert "fedsilo site roster ROSTER.json" in init_summary(site)
    ours = roster_file(
        tmp_path / "ours.json",
        {"site-a": identity_pub(site), "peer-0": peer_identity(tmp_path, "peer-0")},
    )

    # Execute: a re-init lowering the minimum to 2 installs the two-site roster; a
    # roster without the site is refused before the settings are rewritten.
    with pytest.raises(DeployError, match="is not on the roster"):
        site_folder(tmp_path, coord, roster=other, force=True, epsilon=2.0)
    again = site_folder(tmp_path, coord, roster=ours, force=True, min_secure_sites=2)

    # Assert
    assert Roster.load(site.directory / "state" / ROSTER_FILE) == read_roster(ours)
    assert again.node_config["epsilon"] == 8.0 and again.node_config["secagg-min-sites"] == 2
    assert f"roster        {site.directory / 'state' / ROSTER_FILE}" in init_summary(again)
    assert check_site(site.directory).problems == []


# ---- site check -------------------------------------------------------------------


def test_site_check_reports_the_installed_roster(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = site_folder(tmp_path, coord)
    path = with_roster(tmp_path, site)

    report = check_site(site.directory)

    assert report.problems == []
    line = next(x for x in report.lines if x.startswith("ok    roster "))
    assert f"3 sites, fingerprint {read_roster(path).fingerprint()}" in line
    assert "site-a listed with its own identity key" in line


def _corrupt(path: Path) -> None:
    path.write_text("{")


def _drop_own_key(path: Path) -> None:
    roster = Roster.load(path)
    path.write_text(
        Roster({f"x-{n}" if n == "site-a" else n: k for n, k in roster.sites.items()}).to_json()
    )


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        (Path.unlink, "no roster at .*roster.json: every secure round will be refused"),
        (_corrupt, "roster.json is not JSON.*: every secure round will be refused"),
        (_drop_own_key, "as 'x-site-a', not as its site-id 'site-a': every secure round"),
    ],
)
def test_site_check_fails_without_a_usable_roster_naming_the_fix(
    tmp_path: Path, coord: coordinator.Coordinator, spoil: Any, match: str
) -> None:
    site = site_folder(tmp_path, coord)
    with_roster(tmp_path, site)
    spoil(site.directory / "state" / ROSTER_FILE)

    problems = check_site(site.directory).problems

    assert len(problems) == 1 and re.search(match, problems[0]), problems
    assert f"`fedsilo site roster ROSTER.json {site.directory}`" in problems[0]
