"""The sweep's pure parts: epsilon lists, per-run options, the table's numbers, the plot,
and the orchestration with stand-in run functions (no training here)."""

from __future__ import annotations

import io
import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from common.config import ConfigError
from common.outputs import RunSummary
from simulations.sweep import (
    RunResult,
    epsilon_dirname,
    epsilon_label,
    parse_epsilons,
    plot_privacy_utility,
    results_table,
    run_options,
    run_sweep,
    summarize,
)
from tests.support import summaries


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


def test_sweep_runs_everything_and_records_failures(tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []

    def fake_simulate(options: Mapping[str, Any]) -> RunSummary:
        calls.append(dict(options))
        print("a run's own chatter")
        if options["seed"] == 1 and not options["dp"]:
            raise RuntimeError("ray fell over\nsecond line")
        eps = options.get("epsilon", 100.0) if options["dp"] else 100.0
        return summaries.federated(0.6 + eps / 1000 + options["seed"] / 100)

    def fake_central(options: Mapping[str, Any]) -> RunSummary:
        calls.append({"central": True, **options})
        return summaries.central(0.8, learning_rate=1.0)

    out = io.StringIO()
    record = run_sweep(
        {"num-sites": 2, "num-server-rounds": 1},
        [math.inf, 1.0, 8.0],
        2,
        tmp_path / "sweep",
        scenario="test",
        console=Console(file=out, width=140),
        simulate_fn=fake_simulate,
        central_fn=fake_central,
    )
    assert len(calls) == 2 * 3 + 2
    assert [c.get("central", False) for c in calls[:2]] == [True, True]
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(record)) and saved["complete"] is True
    assert (tmp_path / "sweep" / "privacy_utility.png").is_file()
    assert [r["label"] for r in saved["rows"]] == ["1", "8", "inf (no DP)"]
    assert saved["rows"][0]["accuracies"] == pytest.approx([0.601, 0.611])
    assert saved["rows"][2]["failed"] == 1 and saved["rows"][2]["accuracies"] == [0.7]
    assert saved["central_mean"] == pytest.approx(0.8)
    failed = [r for r in saved["runs"] if r["error"]]
    assert len(failed) == 1 and failed[0]["error"] == "RuntimeError: ray fell over"
    assert failed[0]["run_dir"] == str(tmp_path / "sweep" / "eps-inf" / "seed-1")
    # Each run's own output goes to its log, not to the sweep's screen.
    log = tmp_path / "sweep" / "eps-1" / "seed-0" / "log.txt"
    assert "a run's own chatter" in log.read_text()
    text = out.getvalue()
    assert "a run's own chatter" not in text
    assert "FAILED" in text and "privacy against utility" in text


def test_sweep_refuses_bad_settings_before_running(tmp_path: Path) -> None:
    def never(options: Mapping[str, Any]) -> dict[str, Any]:
        raise AssertionError("must not run")

    console = Console(file=io.StringIO())
    with pytest.raises(ConfigError, match="seeds"):
        run_sweep({}, [1.0], 0, tmp_path, console=console, simulate_fn=never, central_fn=never)
    with pytest.raises(ConfigError, match="learning-rat"):
        run_sweep(
            {"learning-rat": 1},
            [1.0],
            1,
            tmp_path,
            console=console,
            simulate_fn=never,
            central_fn=never,
        )
    # The same checks as `fedsilo simulate` (simulations.runner.check_options).
    with pytest.raises(ConfigError, match="num-sites 1 is below min-sites 2"):
        run_sweep(
            {"num-sites": 1},
            [1.0],
            1,
            tmp_path,
            console=console,
            simulate_fn=never,
            central_fn=never,
        )
