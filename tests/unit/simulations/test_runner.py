"""Scenario files are validated like any config."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError
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
