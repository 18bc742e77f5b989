"""Running a federation day to day, with the real ServerApp and ClientApp on the
in-process grid: a rehearsal that spends nothing and never opens the sites' files,
then a real run whose pre-flight shows each site's cost, then a run that the sites
refuse at the pre-flight, each naming its cause, before anything is spent."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from client.app import app as client_app
from common.export import export_run
from common.messages import REHEARSAL_NOTE
from common.privacy.ledger import LEDGER_FILE, read_ledger
from server.app import app as server_app
from tests.support.inprocess_grid import InProcessGrid
from tests.support.reference import reference_epsilon, reference_filter_epsilon
from tests.support.runs import SMALL_RUN
from tests.support.sites import deployed_node, install_roster

SECRET = "SECRET-PATIENT-0815"


def _write(path: Path, rows: int) -> Path:
    path.write_text(
        "text,label\n"
        + "".join(f"review {i} {'good' if i % 2 else 'bad'},{'fresh' if i % 2 else 'rotten'}\n"
        for i in range(rows))
    )  # fmt: skip
    return path


def _entries(state: Path) -> int:
    path = state / LEDGER_FILE
    return len(read_ledger(path)) if path.exists() else 0


def _words(text: str) -> str:
    """The console's text without the line breaks a narrow terminal puts in."""
    return " ".join(text.split())


def _run(grid: InProcessGrid, out: Path) -> dict:
    server_app(grid, grid.server_context())
    return json.loads((out / "summary.json").read_text())


def test_rehearse_run_then_be_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: three deployed sites on one roster. site-a's lifetime budget is one run's
    # worth; site-b's two runs' (at the filter's 5.6 a run); site-c keeps 2 of its 8. Their data files do not exist yet.
    names = ["site-a", "site-b", "site-c"]
    states = {n: tmp_path / n / "state" for n in names}
    files = {n: tmp_path / n / "data.csv" for n in names}
    budgets = {"site-a": 4.0, "site-b": 12.0, "site-c": 8.0}
    extra = {"site-c": {"epsilon-reserve": 2.0}}
    nodes = [
        deployed_node(
            files[n], states[n], site_id=n, epsilon=budgets[n], data_size=300, **extra.get(n, {})
        )
        for n in names
    ]
    install_roster(states, into=states.values())
    run = {**SMALL_RUN, "num-server-rounds": 1}

    runs = iter(range(100, 200))

    def federation(out: Path, **config: object) -> InProcessGrid:
        cfg = {**run, "out-dir": str(out), **config}
        return InProcessGrid(
            client_app, num_nodes=3, node_configs=nodes, run_config=cfg, run_id=next(runs)
        )

    # Execute 1: a rehearsal, before any site has its file (a site that opened its own
    # file would fail).
    rehearsal = _run(federation(tmp_path / "rehearsal", rehearsal=True), tmp_path / "rehearsal")
    shown = _words(capsys.readouterr().out)

    # Assert 1: the whole path ran on public stand-ins, nothing was charged, and every
    # output says REHEARSAL.
    assert rehearsal["rehearsal"] is True
    [row] = rehearsal["rounds"]
    assert row["status"] == "ok" and sorted(row["trained_sites"]) == names, row
    assert row["ledger_heads"] == {} and row["epsilon_per_site"] == dict.fromkeys(names, 0.0)
    assert all(_entries(states[n]) == 0 for n in names)
    assert (
        "REHEARSAL" in shown and "REHEARSAL (public stand-in data, nothing spent): final" in shown
    )
    assert all(s["lifetime_epsilon"] == 0.0 for s in rehearsal["sites"])
    assert f"{REHEARSAL_NOTE} (256 public rows" in caplog.text
    # Its pre-flight says what a real run would cost, and spends nothing either.
    assert [p["status"] for p in rehearsal["preflight"]] == ["ok"] * 3
    assert "what a real run of this plan would cost" in shown
    # Its model, exported, says so too (the card and the plot).
    export_run(tmp_path / "rehearsal", latency_repeats=1)
    card = (tmp_path / "rehearsal" / "export" / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card") and "> **REHEARSAL.**" in card

    # Execute 2: the files arrive; a real run.
    for n in names:
        _write(files[n], 300)
    real = _run(federation(tmp_path / "real"), tmp_path / "real")
    shown = _words(capsys.readouterr().out)

    # Assert 2: the pre-flight named each site's cost, and the run spent what it said.
    assert real["rehearsal"] is False
    checked = {p["site"]: p for p in real["preflight"]}
    assert set(checked) == set(names)
    for n in names:
        p = checked[n]
        assert p["status"] == "ok" and p["spent"] == 0.0 and p["budget"] == budgets[n]
        assert p["after"] <= budgets[n] - (2.0 if n == "site-c" else 0.0)
        # The promised figures are what the run spent, by independent accountants (site-a's
        # budget of 4 binds through its filter before the run's target of 4 does).
        [entry] = read_ledger(states[n] / LEDGER_FILE)
        history = [(entry.noise_multiplier, entry.sample_rate, entry.steps)]
        assert p["after"] == pytest.approx(reference_filter_epsilon(history), rel=1e-6)
        assert p["epsilon"] == pytest.approx(reference_epsilon(*history[0]), rel=0.02)
        assert p["epsilon"] == pytest.approx(entry.epsilon_run, rel=1e-6)
        assert p["noise_multiplier"] == entry.noise_multiplier
        assert f"{n}: run epsilon " in shown
    assert real["rounds"][0]["trained"] == 3
    assert checked["site-b"]["epsilon"] == pytest.approx(4.0, rel=0.01)
    assert checked["site-a"]["epsilon"] < 4.0

    # Execute 3: the same plan again.
    caplog.clear()
    before = {n: (states[n] / LEDGER_FILE).read_bytes() for n in names}
    again = _run(federation(tmp_path / "again"), tmp_path / "again")
    shown = _words(capsys.readouterr().out)

    # Assert 3: site-a (budget spent) and site-c (its reserve) refuse at the pre-flight,
    # in words, on the coordinator's console and in their own logs; one site is fewer
    # than min-sites, so the run stops before its first round and nothing is spent.
    checked = {p["site"]: p for p in again["preflight"]}
    spent_a = checked["site-a"]["spent"]
    assert checked["site-a"]["status"] == "refused"
    assert checked["site-a"]["reason"].startswith(f"budget spent: {spent_a:.3f} of 4.000 on ")
    assert checked["site-c"]["status"] == "refused"
    assert "is left above its reserve of 2" in checked["site-c"]["reason"]
    assert checked["site-b"]["status"] == "ok"
    assert again["rounds"] == []
    assert f"site-a REFUSED: budget spent: {spent_a:.3f} of 4.000" in shown
    assert "the run stops before its first round; nothing was spent" in shown
    assert all((states[n] / LEDGER_FILE).read_bytes() == before[n] for n in names)
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        m.startswith("the run's pre-flight refused at site site-a: budget spent") for m in refusals
    )
    assert SECRET not in json.dumps(again)
