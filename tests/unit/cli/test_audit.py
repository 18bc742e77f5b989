"""``fedsilo audit verify / report / fingerprint`` and ``fedsilo coordinator register
--ledger-key``: what the commands print and exit with."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import cli
from common.pki import DeployError
from common.privacy.audit import PRIVACY_UNIT
from common.privacy.identity import (
    FINGERPRINT_KEY_FILE,
    PUBLIC_KEY_FILE,
    init_state,
    load_fingerprint_key,
)
from common.privacy.ledger import (
    LEDGER_FILE,
    Ledger,
    dataset_fingerprint,
    file_digest,
    read_ledger,
)
from server import deploy as coordinator
from server.deploy import register_site
from tests.support.deploy_folders import fake_superlink, make_site_data, site_folder
from tests.unit.common.privacy.federation import SITES, Site, run_summary, site_state
from tests.unit.common.privacy.ledgers import append, append_v1

runner = CliRunner()


@pytest.fixture
def federation(tmp_path: Path) -> tuple[list[Site], Path]:
    sites = [site_state(tmp_path / "sites", name) for name in SITES]
    summary = tmp_path / "run" / "summary.json"
    summary.parent.mkdir()
    summary.write_text(run_summary(sites).to_json())
    return sites, summary


def test_verify_against_the_summary_passes_on_an_untouched_federation(
    tmp_path: Path, federation: tuple[list[Site], Path]
) -> None:
    _, summary = federation

    result = runner.invoke(
        cli, ["audit", "verify", str(tmp_path / "sites"), "--summary", str(summary)]
    )

    assert result.exit_code == 0, result.output
    out = result.output.strip().splitlines()
    assert len(out) == 2 and all(": OK (2 entries, site site-" in line for line in out)
    assert "lifetime epsilon" in out[0]


def test_verify_names_a_site_whose_ledger_was_deleted(
    tmp_path: Path, federation: tuple[list[Site], Path]
) -> None:
    # Prepare: site-2's ledger file deleted from its state folder.
    sites, summary = federation
    sites[1].ledger.unlink()
    verify = ["audit", "verify", str(tmp_path / "sites"), "--summary", str(summary)]

    # Execute
    file_gone = runner.invoke(cli, verify)
    shutil.rmtree(sites[1].state)  # now the whole state folder
    folder_gone = runner.invoke(cli, verify)
    machine = runner.invoke(cli, [*verify, "--json"])

    # Assert
    assert file_gone.exit_code == 1
    assert f"{sites[1].ledger}: ledger: truncated: " in file_gone.output
    assert "the ledger of site 'site-2' is empty or absent" in file_gone.output
    assert folder_gone.exit_code == 1
    assert f"{summary}: ledger: missing: site 'site-2'" in folder_gone.output
    report = json.loads(machine.stdout)
    assert machine.exit_code == 1 and report["ok"] is False
    assert [f["kind"] for f in report["findings"]] == ["missing"]
    assert [a["site"] for a in report["ledgers"]] == ["site-1"]


def test_verify_with_the_registry_catches_another_ledger_key(
    tmp_path: Path, federation: tuple[list[Site], Path]
) -> None:
    _, summary = federation
    other = init_state(tmp_path / "other", site_id="site-1").identity
    registry = tmp_path / "sites.json"
    registry.write_text(
        json.dumps({"site-1": {"key": "k", "node_id": 1, "ledger_key": other.fingerprint()}})
    )

    result = runner.invoke(
        cli,
        [
            "audit",
            "verify",
            str(tmp_path / "sites"),
            "--summary",
            str(summary),
            "--sites",
            str(registry),
        ],
    )

    assert result.exit_code == 1
    assert "re-keyed" in result.output and "registered" in result.output


def test_report_shows_scopes_both_epsilons_and_the_privacy_unit(
    tmp_path: Path, federation: tuple[list[Site], Path]
) -> None:
    # Prepare: site-1 also spends on a declared disjoint data set; an older ledger.
    sites, _ = federation
    append(
        Ledger(sites[0].ledger, sites[0].identity),
        "run-d",
        1,
        site_id="site-1",
        scope="data-set:clinic",
    )
    old = tmp_path / "old" / LEDGER_FILE
    old.parent.mkdir()
    append_v1(old, sites[0].identity, "run-old", 1)

    # Execute
    text = runner.invoke(cli, ["audit", "report", str(tmp_path / "sites"), str(old)])
    machine = runner.invoke(cli, ["audit", "report", str(tmp_path / "sites"), str(old), "--json"])

    # Assert
    assert text.exit_code == 0, text.output
    flat = " ".join(text.output.split())
    assert "data-set:clinic" in flat and "per data set" in flat and "lifetime" in flat
    assert "adaptive" in flat and "PRV" in flat
    assert f"privacy unit: {PRIVACY_UNIT}" in flat
    report = json.loads(machine.stdout)
    assert report["privacy_unit"] == PRIVACY_UNIT
    assert "adaptive" in report["accountants"]["epsilon_lifetime"]
    assert "fixed" in report["accountants"]["epsilon_run"]
    rows = {(r["site"], r["scope"], r["run"]): r for r in report["rows"]}
    a = rows[("site-1", "site", "run-a")]
    last = read_ledger(sites[0].ledger)[1]
    assert (a["rounds"], a["planned_rounds"], a["budget_kind"]) == (2, 3, "lifetime")
    assert a["epsilon_run"] == last.epsilon_run and a["epsilon_lifetime"] == last.epsilon_lifetime
    assert a["remaining"] == pytest.approx(a["budget"] - a["epsilon_lifetime"])
    assert rows[("site-1", "data-set:clinic", "run-d")]["rounds"] == 1
    (v1,) = [r for r in report["rows"] if r["schema"] == 1]
    assert v1["budget_kind"] == "per-data-set" and v1["epsilon_lifetime"] is None
    assert v1["epsilon_dataset"] > 0


def test_fingerprint_is_the_one_the_site_records(tmp_path: Path) -> None:
    # Prepare: a deployed site's state folder and data file, and another file.
    state = tmp_path / "state"
    init_state(state, site_id="site-1")
    data = make_site_data(tmp_path / "data.csv")
    other = make_site_data(tmp_path / "other.csv", rows=21)

    # Execute
    mine = runner.invoke(cli, ["audit", "fingerprint", "--state", str(state), str(data)])
    theirs = runner.invoke(cli, ["audit", "fingerprint", "--state", str(state), str(other)])

    # Assert: what client/round.py writes into the ledger's ``dataset`` field.
    expected = dataset_fingerprint(load_fingerprint_key(state), file_digest(data))
    assert mine.exit_code == 0 and mine.stdout.strip() == expected
    assert theirs.stdout.strip() != expected
    another_site = tmp_path / "state-2"
    init_state(another_site, site_id="site-2")
    keyed = runner.invoke(cli, ["audit", "fingerprint", "--state", str(another_site), str(data)])
    assert keyed.stdout.strip() != expected  # without the site's key, no guessing


def test_fingerprint_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli import main as cli_main

    state = tmp_path / "state"
    init_state(state, site_id="site-1")
    for args, message in (
        ([str(tmp_path / "absent.csv")], "cannot read the data file"),
        ([str(make_site_data(tmp_path / "d.csv"))], "fingerprint key"),
    ):
        if message == "fingerprint key":
            (state / FINGERPRINT_KEY_FILE).unlink()
        monkeypatch.setattr(
            sys, "argv", ["fedsilo", "audit", "fingerprint", "--state", str(state), *args]
        )
        with pytest.raises(SystemExit) as exit_info:
            cli_main.main()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


# ---- the coordinator's registry -----------------------------------------------------


@pytest.fixture
def flower(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Flower's side: the SuperLink refuses a node key it already holds."""
    return fake_superlink(monkeypatch)


def test_register_records_the_ledger_key_once(
    tmp_path: Path, coord: coordinator.Coordinator, flower: dict[str, int]
) -> None:
    # Prepare
    a = site_folder(tmp_path, coord, "site-a").directory
    b = site_folder(tmp_path, coord, "site-b").directory
    node_a, ledger_a = a / "node.pub", a / "state" / PUBLIC_KEY_FILE
    node_b, ledger_b = b / "node.pub", b / "state" / PUBLIC_KEY_FILE
    fingerprint_a = init_state(a / "state", site_id="site-a").identity.fingerprint()

    # Execute
    first = register_site(coord.directory, node_a, "site-a", ledger_key=ledger_a)
    again = register_site(coord.directory, node_a, "site-a", ledger_key=ledger_a)
    without = register_site(coord.directory, node_a, "site-a")

    # Assert
    assert first.created and first.ledger_key == fingerprint_a
    assert not again.created and not again.ledger_key_added and again.ledger_key == fingerprint_a
    assert not without.created and without.ledger_key == fingerprint_a
    registry = json.loads((coord.directory / "sites.json").read_text())
    assert registry == {
        "site-a": {"key": first.key_fingerprint, "node_id": 1000, "ledger_key": fingerprint_a}
    }
    with pytest.raises(DeployError, match="'site-a' is already registered with another ledger key"):
        register_site(coord.directory, node_a, "site-a", ledger_key=ledger_b)
    with pytest.raises(DeployError, match="this ledger key is already registered as site 'site-a'"):
        register_site(coord.directory, node_b, "site-b", ledger_key=ledger_a)
    with pytest.raises(DeployError, match=r"^--ledger-key .*(not an Ed25519 public key|corrupt)"):
        register_site(coord.directory, node_b, "site-b", ledger_key=node_b)
    assert json.loads((coord.directory / "sites.json").read_text()) == registry
    assert flower == {first.key_fingerprint: 1000}  # nothing refused reached the SuperLink


def test_a_ledger_key_is_added_to_a_site_registered_without_one(
    tmp_path: Path, coord: coordinator.Coordinator, flower: dict[str, int]
) -> None:
    a = site_folder(tmp_path, coord, "site-a").directory

    runner.invoke(
        cli,
        [
            "coordinator",
            "register",
            str(a / "node.pub"),
            "--name",
            "site-a",
            "--dir",
            str(coord.directory),
        ],
    )
    added = runner.invoke(
        cli,
        ["coordinator", "register", str(a / "node.pub"), "--name", "site-a", "--dir", str(coord.directory),
         "--ledger-key", str(a / "state" / PUBLIC_KEY_FILE)],
    )  # fmt: skip
    again = runner.invoke(
        cli,
        ["coordinator", "register", str(a / "node.pub"), "--name", "site-a", "--dir", str(coord.directory),
         "--ledger-key", str(a / "state" / PUBLIC_KEY_FILE)],
    )  # fmt: skip

    assert added.exit_code == 0 and "recorded its ledger key sha256:" in added.stdout
    assert again.exit_code == 0 and "nothing changed" in again.stdout
    registry = json.loads((coord.directory / "sites.json").read_text())
    assert registry["site-a"]["ledger_key"].startswith("sha256:")
