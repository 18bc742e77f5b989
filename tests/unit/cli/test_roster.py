"""``fedsilo roster make / show`` and ``fedsilo site roster``: what they print (the
fingerprints every site compares out of band) and their one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import cli
from client.roster import read_roster
from common.privacy.identity import key_fingerprint, load_public_key
from common.secagg.roster import ROSTER_FILE
from server import deploy as coordinator
from tests.support.deploy_folders import identity_pub, peer_identity, site_folder

runner = CliRunner()


def test_make_show_and_install_print_the_fingerprints_to_compare(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    # Prepare: one site folder and two other sites' identity keys.
    site = site_folder(tmp_path, coord)
    keys = {
        "site-a": identity_pub(site),
        "site-b": peer_identity(tmp_path, "site-b"),
        "site-c": peer_identity(tmp_path, "site-c"),
    }
    out = tmp_path / "roster.json"

    # Execute
    made = runner.invoke(
        cli, ["roster", "make", str(out), *(f"--site={n}={p}" for n, p in keys.items())]
    )
    shown = runner.invoke(cli, ["roster", "show", str(out)])
    installed = runner.invoke(cli, ["site", "roster", str(out), str(site.directory)])
    checked = runner.invoke(cli, ["site", "check", str(site.directory)])

    # Assert: the same fingerprint everywhere, each site's key as `site init` printed it.
    assert made.exit_code == 0, made.output
    fingerprint = read_roster(out).fingerprint()
    assert f"roster fingerprint {fingerprint} (3 sites)" in made.output
    for name, path in keys.items():
        assert f"{name}  {key_fingerprint(load_public_key(path))}" in made.output
    assert shown.exit_code == 0 and shown.output.splitlines() == made.output.splitlines()[1:5]
    assert installed.exit_code == 0, installed.output
    assert f"fingerprint     {fingerprint}" in installed.output
    assert (site.directory / "state" / ROSTER_FILE).is_file()
    assert checked.exit_code == 0, checked.output
    assert f"ok    roster {site.directory / 'state' / ROSTER_FILE}: 3 sites" in checked.output


@pytest.mark.parametrize("command", ["make", "site"])
def test_roster_errors_are_one_line_with_exit_code_2(
    tmp_path: Path,
    coord: coordinator.Coordinator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    from cli import main as cli_main

    site = site_folder(tmp_path, coord)
    a, b = peer_identity(tmp_path, "site-b"), peer_identity(tmp_path, "site-c")
    others = tmp_path / "others.json"
    runner.invoke(cli, ["roster", "make", str(others), f"--site=site-b={a}", f"--site=site-c={b}"])
    argv = {
        "make": [
            "roster",
            "make",
            str(tmp_path / "r.json"),
            f"--site=site-b={a}",
            f"--site=site-b={b}",
        ],
        "site": ["site", "roster", str(others), str(site.directory)],
    }[command]
    expected = {
        "make": f"error: --site 'site-b={b}': site site-b is listed twice",
        "site": f"error: roster {others} not installed: this site (site-a, identity key",
    }[command]
    monkeypatch.setattr(sys, "argv", ["fedsilo", *argv])

    with pytest.raises(SystemExit) as exit_info:
        cli_main.main()

    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "r.json").exists()
    assert not (site.directory / "state" / ROSTER_FILE).exists()
