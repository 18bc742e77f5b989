"""The sweep's numbers: epsilon lists, per-run options, the table, the plot."""

from __future__ import annotations

import io
import math
import statistics
from pathlib import Path

import pytest
from rich.console import Console

from common.config import ConfigError
from simulations.sweep_results import (
    RunResult,
    epsilon_dirname,
    epsilon_label,
    parse_epsilons,
    plot_privacy_utility,
    results_table,
    run_options,
    summarize,
)


def test_epsilon_list_sorted_with_no_dp_last() -> None:
    assert parse_epsilons("1,2,4,8,inf") == [1.0, 2.0, 4.0, 8.0, math.inf]
    assert parse_epsilons(" 8, INF ,0.5") == [0.5, 8.0, math.inf]
    assert parse_epsilons("inf") == [math.inf]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("0", "'0'"),
        ("-1", "'-1'"),
        ("abc", "'abc'"),
        ("1,abc,2", "'abc'"),
        ("1,,2", "''"),
        ("nan", "'nan'"),
        ("1,1.0", "'1.0'"),
        ("", "empty"),
        ("  ", "empty"),
    ],
)
def test_bad_epsilon_lists_name_the_value(text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named) as err:
        parse_epsilons(text)
    assert "\n" not in str(err.value)


def test_labels_and_folders() -> None:
    assert epsilon_label(math.inf) == "inf (no DP)"
    assert epsilon_label(8.0) == "8" and epsilon_label(0.5) == "0.5"
    assert epsilon_dirname(math.inf) == "eps-inf" and epsilon_dirname(2.0) == "eps-2"


def test_run_options_set_seed_privacy_and_folders(tmp_path: Path) -> None:
    base = {"num-sites": 4, "seed": 7, "epsilon": 3.0, "sites-dir": "shared", "max-length": 16}
    dp = run_options(base, 2.0, 1, tmp_path / "a")
    assert dp == {
        "num-sites": 4,
        "max-length": 16,
        "seed": 1,
        "out-dir": str(tmp_path / "a"),
        "sites-dir": "",  # never a ledger folder shared across runs: budgets would carry over
        "dp": True,
        "epsilon": 2.0,
    }
    no_dp = run_options(base, math.inf, 0, tmp_path / "b")
    assert no_dp["dp"] is False and "epsilon" not in no_dp and no_dp["seed"] == 0


def _run(eps: float, seed: int, acc: float | None) -> RunResult:
    return RunResult("federated", eps, seed, f"eps/{seed}", acc, 1.0, None if acc else "boom")


def _central(seed: int, acc: float | None) -> RunResult:
    return RunResult("central", None, seed, f"c/{seed}", acc, 1.0, None if acc else "boom")


def test_mean_std_and_paired_gap() -> None:
    runs = [
        _run(1.0, 0, 0.60),
        _run(1.0, 1, 0.64),
        _run(1.0, 2, 0.62),
        _run(math.inf, 0, 0.74),
        _run(math.inf, 1, 0.76),
        _run(math.inf, 2, None),  # failed: counted, not used
    ]
    central = [_central(0, 0.78), _central(1, 0.80), _central(2, 0.79)]
    rows = summarize([1.0, math.inf], runs, central)
    low, top = rows
    assert low.mean == pytest.approx(0.62)
    assert low.std == pytest.approx(statistics.stdev([0.60, 0.64, 0.62]))
    assert low.gap_points == pytest.approx(100 * (0.79 - 0.62))
    assert top.accuracies == [0.74, 0.76] and top.failed == 1 and top.seeds == [0, 1]
    # Paired by seed: the failed seed 2 is left out on both sides.
    assert top.gap_points == pytest.approx(100 * ((0.78 - 0.74) + (0.80 - 0.76)) / 2)
    assert top.to_json()["epsilon"] is None and top.to_json()["label"] == "inf (no DP)"


def test_one_seed_has_no_std_and_the_table_shows_a_dash() -> None:
    rows = summarize([4.0], [_run(4.0, 0, 0.7)], [_central(0, 0.75)])
    assert rows[0].std is None and rows[0].gap_points == pytest.approx(5.0)
    out = io.StringIO()
    Console(file=out, width=120).print(results_table(rows, [_central(0, 0.75)]))
    text = out.getvalue()
    line = next(x for x in text.splitlines() if "0.7000" in x)
    assert (
        line.replace("│", " ").replace("|", " ").split()[0] == "4"
        and " - " in line
        and "+5.00" in line
    )
    assert "central, no DP" in text and "0.7500" in text


def test_no_central_gives_no_gap() -> None:
    rows = summarize([1.0], [_run(1.0, 0, 0.6)], [_central(0, None)])
    assert rows[0].gap_points is None


@pytest.mark.parametrize("epsilons", [[1.0, 2.0, 8.0, math.inf], [math.inf], [4.0]])
def test_plot_is_written(tmp_path: Path, epsilons: list[float]) -> None:
    runs = [_run(e, s, 0.6 + 0.01 * i + 0.005 * s) for i, e in enumerate(epsilons) for s in (0, 1)]
    rows = summarize(epsilons, runs, [_central(0, 0.78), _central(1, 0.8)])
    path = tmp_path / "privacy_utility.png"
    plot_privacy_utility(rows, [_central(0, 0.78), _central(1, 0.8)], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
