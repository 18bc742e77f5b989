"""What the coordinator's console shows (server/report.py): a deployed run's banner
without the simulation's settings, each exchange as it ends and while sites are slow,
the pre-flight per site, and refusals named in a failed round's row."""

from __future__ import annotations

import io

from rich.console import Console

from common.config import RunConfig
from common.outputs import Note, PreflightRow, RoundRecord
from server.report import Reporter, exchange_label


def _reporter(*, deployed: bool) -> tuple[Reporter, io.StringIO]:
    out = io.StringIO()
    return Reporter(Console(file=out, width=200), deployed=deployed), out


def test_exchanges_are_named_by_round_and_stage() -> None:
    assert exchange_label("preflight") == "pre-flight"
    assert exchange_label("3") == "round 3 train"
    assert exchange_label("3/advertise") == "round 3 advertise"
    assert exchange_label("3/evaluation/unmask") == "round 3 evaluation unmask"


def test_a_deployed_run_shows_what_applies_and_each_exchange_as_it_happens() -> None:
    reporter, out = _reporter(deployed=True)
    reporter.start(RunConfig(rehearsal=True), num_params=10)
    reporter.exchange("1/advertise", 1, 2, 5.0, False)  # quiet: not slow yet
    reporter.exchange("1/advertise", 1, 2, 16.0, False)
    reporter.exchange("1/advertise", 1, 2, 20.0, False)  # quiet: 15 s not passed again
    reporter.exchange("1/advertise", 2, 2, 21.5, True)
    text = out.getvalue()
    assert "at the sites" in text and "split" not in text  # no simulation settings
    assert "REHEARSAL: every site trains on public stand-in data" in text
    assert text.count("round 1 advertise: 1/2 sites answered, waiting") == 1
    assert "round 1 advertise: 2/2 sites answered in 21.5 s" in text


def test_a_simulation_prints_no_line_per_exchange() -> None:
    reporter, out = _reporter(deployed=False)
    reporter.start(RunConfig(), num_params=10)
    reporter.exchange("1/advertise", 2, 2, 0.4, True)
    assert "split natural" in out.getvalue() and "advertise" not in out.getvalue()


def test_the_preflight_and_a_failed_round_name_each_site_and_its_cause() -> None:
    reporter, out = _reporter(deployed=True)
    reporter.start(RunConfig(), num_params=10)
    reporter.preflight(
        (
            PreflightRow(site="site-a", status="ok", epsilon=7.957, noise_multiplier=0.964,
                         steps=8, spent=0.0, after=7.997, budget=8.0, reserve=0.0),
            PreflightRow(site="site-b", status="refused", reason="budget spent: 7.997 of 8.000"),
        )
    )  # fmt: skip
    reporter.round_header()
    reporter.round(
        RoundRecord(
            round=1, sites_asked=1, trained=0, accuracy=None, loss=None, status="failed",
            reason="no site trained this round (1 refused: see the notes)",
            notes=(Note(site="site-a", status="refused", reason="budget spent: 8.000 of 8.000"),),
        )
    )  # fmt: skip
    text = out.getvalue()
    assert (
        "site-a: run epsilon 7.957 (sigma 0.964, 8 steps); lifetime 0.000 -> 7.997 of 8.000" in text
    )
    assert "site-b REFUSED: budget spent: 7.997 of 8.000" in text
    assert (
        "no site trained this round (1 refused: see the notes); site-a refused: budget spent"
        in text
    )
