"""Scenario files are validated like any config."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig
from simulations.runner import load_scenario


def test_scenario_keys_and_num_sites(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('num-sites = 4\nepsilon = 2.0\npartition = "iid"\n')
    assert load_scenario(str(path)) == {"num-sites": 4, "epsilon": 2.0, "partition": "iid"}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("epsilon = 2.0\nlearnig-rate = 1.0\n", "learnig-rate"),
        ("epsilon = -2.0\n", "'epsilon'"),
        ("[table]\nx = 1\n", "flat"),
        ("epsilon = \n", "s.toml"),
    ],
)
def test_bad_scenarios_name_the_problem(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_scenario(str(path))


def test_missing_scenario_is_named() -> None:
    with pytest.raises(ConfigError, match="no-such-scenario"):
        load_scenario("no-such-scenario")


BUNDLED = tuple(
    sorted(f.stem for f in (Path(__file__).parents[3] / "simulations" / "scenarios").glob("*.toml"))
)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_scenarios_load_and_validate(name: str) -> None:
    # Execute
    options = load_scenario(name)

    # Assert: every key but num-sites is a run-config key with a valid value
    cfg = RunConfig().with_overrides({k: v for k, v in options.items() if k != "num-sites"})
    assert options["num-sites"] >= 10
    assert cfg.dataset in ("rotten-tomatoes", "20newsgroups")


def test_bundled_scenarios_say_what_the_issue_asks() -> None:
    large, ng, dropout = load_scenario("large"), load_scenario("20ng"), load_scenario("dropout")
    assert large["num-sites"] == 1000 and 0.02 <= large["fraction-train"] <= 0.05
    assert ng["num-sites"] == 20 and ng["dirichlet-alpha"] == 0.3
    assert dropout["dropout-rate"] == 0.2
    assert load_scenario("rt-tiny") == {
        "num-sites": 10,
        "dataset": "rotten-tomatoes",
        "partition": "natural",
    }
    # make run: the same federation with the pretrained encoder's features (issue 15)
    assert load_scenario("default") == load_scenario("rt-tiny") | {
        "model-preset": "minilm-probe",
        "learning-rate": 8.0,
    }
    assert "--scenario default" in (Path(__file__).parents[3] / "Makefile").read_text()
