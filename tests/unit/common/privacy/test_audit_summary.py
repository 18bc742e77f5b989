"""The auditor against the coordinator's summary.json and registry: every site the
coordinator saw train with DP has its ledger, every head it saw is in it, and the
ledger's key is the one the site reported and registered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.outputs import RunSummary, SiteSummary
from common.privacy.audit import (
    FederationAudit,
    audit_against_summary,
    audit_ledgers,
    find_ledgers,
    registered_ledger_keys,
    verify,
)
from common.privacy.errors import LedgerError
from common.privacy.identity import MARKER_FILE, PUBLIC_KEY_FILE, init_state
from common.privacy.ledger import LEDGER_FILE
from tests.unit.common.privacy.federation import SITES, Site, run_summary, site_state


@pytest.fixture
def federation(tmp_path: Path) -> tuple[list[Site], RunSummary]:
    sites = [site_state(tmp_path / "sites", name) for name in SITES]
    return sites, run_summary(sites)


def _kinds(result: FederationAudit) -> dict[str | None, set[str]]:
    out: dict[str | None, set[str]] = {None: {f.kind for f in result.findings}}
    for a in result.ledgers:
        out[a.site] = out.get(a.site, set()) | {f.kind for f in a.findings}
    return out


def test_an_untouched_federation_verifies_against_its_summary(
    federation: tuple[list[Site], RunSummary],
) -> None:
    sites, summary = federation

    result = audit_against_summary([s.ledger for s in sites], summary)

    assert result.ok, result.to_json()
    assert [a.site for a in result.ledgers] == list(SITES)
    assert [a.identity for a in result.ledgers] == [s.identity.fingerprint() for s in sites]


def test_a_deleted_ledger_is_a_finding_naming_its_site(
    federation: tuple[list[Site], RunSummary],
) -> None:
    sites, summary = federation
    sites[1].ledger.unlink()

    result = audit_against_summary([sites[0].ledger], summary)

    assert not result.ok
    assert [(f.kind, "'site-2'" in f.message) for f in result.findings] == [("missing", True)]
    assert result.ledgers[0].ok


def test_an_emptied_ledger_is_matched_by_its_marker_and_its_heads_checked(
    federation: tuple[list[Site], RunSummary],
) -> None:
    sites, summary = federation
    sites[1].ledger.write_bytes(b"")

    result = audit_against_summary([s.ledger for s in sites], summary)

    emptied = result.ledgers[1]
    assert emptied.site == "site-2" and emptied.entries == []
    assert [f.kind for f in emptied.findings] == ["truncated", "truncated"]
    assert "the ledger of site 'site-2' is empty or absent" in emptied.findings[0].message
    assert result.findings == []


def test_an_emptied_ledger_without_a_marker_is_matched_by_its_key(
    federation: tuple[list[Site], RunSummary],
) -> None:
    sites, summary = federation
    sites[1].ledger.write_bytes(b"")
    (sites[1].state / MARKER_FILE).unlink()

    result = audit_against_summary([s.ledger for s in sites], summary)

    assert result.ledgers[1].site == "site-2"
    assert _kinds(result)["site-2"] == {"truncated"}
    assert result.findings == []


def test_an_emptied_ledger_nobody_can_place_is_a_finding_and_its_site_missing(
    tmp_path: Path, federation: tuple[list[Site], RunSummary]
) -> None:
    sites, summary = federation
    sites[1].ledger.write_bytes(b"")
    (sites[1].state / MARKER_FILE).unlink()
    stranger = init_state(tmp_path / "stranger", site_id="x").identity
    (sites[1].state / PUBLIC_KEY_FILE).write_bytes(stranger.public_key_pem())

    result = audit_against_summary([s.ledger for s in sites], summary)

    assert result.ledgers[1].site is None
    assert [f.kind for f in result.ledgers[1].findings] == ["site"]
    assert [f.kind for f in result.findings] == ["missing"]


def test_a_ledger_rewritten_under_a_fresh_key_is_re_keyed(
    tmp_path: Path, federation: tuple[list[Site], RunSummary]
) -> None:
    # Prepare: site-2's whole state folder replaced: a fresh key (identity.pub and marker
    # too) and a ledger with one honest-looking round, correctly signed and chained.
    sites, summary = federation
    shutil.rmtree(sites[1].state)
    fresh = site_state(tmp_path / "fresh", "site-2")
    shutil.copytree(fresh.state, sites[1].state)

    # Execute
    result = audit_against_summary([s.ledger for s in sites], summary)

    # Assert: the chain and signatures hold; the key and the heads do not.
    rewritten = result.ledgers[1]
    assert rewritten.site == "site-2"
    assert {f.kind for f in rewritten.findings} == {"re-keyed", "truncated"}
    assert verify(sites[1].ledger).findings == []  # alone, nothing is wrong with it


def test_a_replaced_public_key_alone_is_re_keyed(
    tmp_path: Path, federation: tuple[list[Site], RunSummary]
) -> None:
    sites, summary = federation
    other = init_state(tmp_path / "other", site_id="site-2").identity
    (sites[1].state / PUBLIC_KEY_FILE).write_bytes(other.public_key_pem())

    result = audit_against_summary([s.ledger for s in sites], summary)

    assert {"re-keyed", "signature"} <= _kinds(result)["site-2"]


def test_a_ledger_cut_back_is_truncated(federation: tuple[list[Site], RunSummary]) -> None:
    sites, summary = federation
    first = sites[0].ledger.read_text().splitlines()[0]
    sites[0].ledger.write_text(first + "\n")

    result = audit_against_summary([s.ledger for s in sites], summary)

    assert [f.kind for f in result.ledgers[0].findings] == ["truncated"]
    assert "round 2" in result.ledgers[0].findings[0].message


def test_the_registry_s_ledger_key_is_compared(
    tmp_path: Path, federation: tuple[list[Site], RunSummary]
) -> None:
    sites, summary = federation
    other = init_state(tmp_path / "other", site_id="site-2").identity
    registry = tmp_path / "sites.json"
    registry.write_text(
        json.dumps(
            {
                "site-1": {"key": "x", "node_id": 1, "ledger_key": sites[0].identity.fingerprint()},
                "site-2": {"key": "y", "node_id": 2, "ledger_key": other.fingerprint()},
                "site-3": {"key": "z", "node_id": 3},
            }
        )
    )
    registered = registered_ledger_keys(registry)

    with_summary = audit_against_summary([s.ledger for s in sites], summary, registered=registered)
    alone = audit_ledgers([s.ledger for s in sites], registered=registered)

    assert registered == {"site-1": sites[0].identity.fingerprint(), "site-2": other.fingerprint()}
    assert _kinds(with_summary) == {None: {"re-keyed"}, "site-1": set(), "site-2": {"re-keyed"}}
    assert _kinds(alone) == {None: set(), "site-1": set(), "site-2": {"re-keyed"}}


@pytest.mark.parametrize(
    "content",
    ["[", "[]", '{"a": {"ledger_key": "sha256:12"}}', '{"a": {"ledger_key": 5}}'],
)
def test_a_bad_registry_names_itself(tmp_path: Path, content: str) -> None:
    registry = tmp_path / "sites.json"
    registry.write_text(content)
    with pytest.raises(LedgerError, match=r"sites\.json"):
        registered_ledger_keys(registry)


def test_a_marker_naming_another_site_or_key_is_a_finding(
    tmp_path: Path, federation: tuple[list[Site], RunSummary]
) -> None:
    sites, _ = federation
    other = init_state(tmp_path / "other", site_id="x").identity
    marker = {"site_id": "site-9", "identity": other.fingerprint()}
    (sites[0].state / MARKER_FILE).write_text(json.dumps(marker))

    audit = verify(sites[0].ledger)

    assert {f.kind for f in audit.findings} == {"site", "re-keyed"}


def test_two_ledgers_of_one_site_are_a_finding(
    tmp_path: Path, federation: tuple[list[Site], RunSummary]
) -> None:
    sites, summary = federation
    copy = tmp_path / "copy"
    shutil.copytree(sites[0].state, copy)

    result = audit_against_summary([*(s.ledger for s in sites), copy / LEDGER_FILE], summary)

    assert [f.kind for f in result.findings] == ["site"]
    assert "'site-1' has 2 ledgers" in result.findings[0].message


def test_a_site_never_charged_has_a_state_folder_and_no_ledger(
    tmp_path: Path, federation: tuple[list[Site], RunSummary]
) -> None:
    # Prepare: site-3 was refused its first round: it reported its key, no head, and
    # its state folder holds no ledger file.
    _, summary = federation
    refused = init_state(tmp_path / "sites" / "site-3", site_id="site-3").identity
    site3 = SiteSummary(site="site-3", identity=refused.fingerprint(), rounds_refused=2)
    summary = summary.model_copy(update={"sites": (*summary.sites, site3)})

    # Execute
    paths = find_ledgers([tmp_path / "sites"], states=True)
    result = audit_against_summary(paths, summary)

    # Assert
    assert paths[-1] == tmp_path / "sites" / "site-3" / LEDGER_FILE
    assert result.ok, result.to_json()
    assert [(a.site, len(a.entries)) for a in result.ledgers][-1] == ("site-3", 0)
    assert find_ledgers([tmp_path / "sites"]) == paths[:2]


def test_a_deleted_ledger_file_in_its_state_folder_is_truncated(
    tmp_path: Path, federation: tuple[list[Site], RunSummary]
) -> None:
    sites, summary = federation
    sites[1].ledger.unlink()

    result = audit_against_summary(find_ledgers([tmp_path / "sites"], states=True), summary)

    assert [f.kind for f in result.ledgers[1].findings] == ["truncated", "truncated"]
    assert "site 'site-2'" in result.ledgers[1].findings[0].message
    assert result.findings == []


def test_sites_without_dp_or_without_a_ledger_need_none(
    federation: tuple[list[Site], RunSummary],
) -> None:
    sites, summary = federation
    plain = SiteSummary(site="site-3", dp=False)
    silent = SiteSummary(site="site-4", epsilon=None)  # refused everything, reported nothing
    summary = summary.model_copy(update={"sites": (*summary.sites, plain, silent)})

    result = audit_against_summary([s.ledger for s in sites], summary)

    assert result.ok, result.to_json()
