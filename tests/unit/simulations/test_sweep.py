"""The sweep's orchestration with stand-in run functions (no training here): every run
made, failures recorded, bad settings refused before the first run."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from common.config import ConfigError
from common.outputs import RunSummary
from simulations.sweep import run_sweep
from tests.support import summaries


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
