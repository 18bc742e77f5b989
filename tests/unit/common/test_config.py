"""RunConfig: one parse at the edge, unknown keys refused, pyproject defaults kept equal."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[3]


def test_pyproject_app_config_equals_the_typed_defaults() -> None:
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_user_config(raw) == RunConfig()
    assert set(raw) == set(RunConfig().to_user_config())


def test_round_trip_through_flowers_flat_dict() -> None:
    cfg = RunConfig(num_server_rounds=3, dp=False)
    assert RunConfig.from_user_config(cfg.to_user_config()) == cfg
    assert cfg.to_user_config()["num-server-rounds"] == 3


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'learning-rat'"):
        RunConfig.from_user_config({"learning-rat": 0.1})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epsilon", -1.0),
        ("epsilon", float("inf")),
        ("delta", 1.0),
        ("num-server-rounds", 0),
        ("fraction-train", 1.5),
        ("partition", "random"),
        ("server-optimizer", "sgd"),
        ("batch-size", "many"),
        ("server-momentum", 1.0),
        ("dp-engine", "foo"),
    ],
)
def test_bad_values_name_their_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_user_config({key: value})


def test_incoherent_combination_is_refused() -> None:
    with pytest.raises(ConfigError, match="no natural grouping"):
        RunConfig.from_user_config({"dataset": "20newsgroups", "partition": "natural"})


def test_config_is_frozen_and_overrides_validate() -> None:
    cfg = RunConfig()
    with pytest.raises(ValueError, match="frozen"):
        cfg.epsilon = 1.0  # type: ignore[misc]
    assert cfg.with_overrides({"epsilon": 2.0}).epsilon == 2.0
    with pytest.raises(ConfigError):
        cfg.with_overrides({"epsilon": 0})
