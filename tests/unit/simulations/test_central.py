"""Central training, the ceiling: a tiny real run on a few hundred pooled examples."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from common.config import RunConfig
from common.data import load_builtin
from common.outputs import CENTRAL_MODE, read_model, read_summary
from simulations.central import (
    CentralReporter,
    central_config,
    train_central,
)

TINY = {"num-server-rounds": 2, "max-length": 16, "batch-size": 64}


def _quiet() -> tuple[CentralReporter, io.StringIO]:
    out = io.StringIO()
    return CentralReporter(Console(file=out, width=120)), out


def test_tiny_central_run_writes_what_a_federated_run_writes(tmp_path: Path) -> None:
    cfg = RunConfig().with_overrides(TINY)
    reporter, out = _quiet()
    summary = train_central(
        cfg, tmp_path, reporter, max_train=300, learning_rates=(1e-3, 3e-3), workers=1
    )

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == json.loads(summary.to_json()) and read_summary(tmp_path) == summary
    # The federated summary's top-level keys, so tools reading summaries take both.
    assert {"version", "dp", "mode", "config", "rounds", "sites", "final"} <= set(saved)
    assert saved["mode"] == CENTRAL_MODE == "central-no-dp" and saved["dp"] is False
    assert [r["round"] for r in saved["rounds"]] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"]) for r in saved["rounds"])
    assert saved["final"]["accuracy"] == saved["rounds"][-1]["accuracy"]
    assert saved["final"]["rounds_completed"] == 2 and saved["final"]["epsilon_max"] is None

    central = saved["central"]
    assert central["epochs"] == 2 and central["train_examples"] == 300
    assert central["test_examples"] == len(load_builtin("rotten-tomatoes", "test"))
    candidates = central["selection"]["candidates"]
    assert [c["learning_rate"] for c in candidates] == [1e-3, 3e-3]
    assert central["learning_rate"] in (1e-3, 3e-3) and central["optimizer"] == "adam"
    best = max(c["val_accuracy"] for c in candidates)
    chosen = next(c for c in candidates if c["learning_rate"] == central["learning_rate"])
    assert chosen["val_accuracy"] == best

    for name in ("accuracy.png", "epsilon.png", "model/model.safetensors"):
        assert (tmp_path / name).is_file(), name
    text = out.getvalue()
    assert "NO DIFFERENTIAL PRIVACY" in text and "final accuracy" in text
    assert text.count("\n    1  ") == 1 and text.count("\n    2  ") == 1  # one line per round


def test_one_learning_rate_is_used_without_selection(tmp_path: Path) -> None:
    cfg = RunConfig().with_overrides({**TINY, "num-server-rounds": 1})
    summary = train_central(
        cfg, tmp_path, _quiet()[0], max_train=120, optimizer="sgd", learning_rates=[0.5]
    )
    assert summary.central is not None
    assert summary.central.learning_rate == 0.5 and summary.central.optimizer == "sgd"
    assert summary.central.selection.candidates == ()


def test_central_config_names_the_keys_it_ignores() -> None:
    cfg, ignored = central_config(
        {"num-sites": 3, "epsilon": 2.0, "dp": False, "max-length": 16, "seed": 4}
    )
    assert ignored == ["dp", "epsilon", "num-sites"]
    assert cfg.max_length == 16 and cfg.seed == 4


@pytest.mark.parametrize("preset", ["minilm-probe", "minilm-lora"])
def test_central_trains_each_pretrained_preset(tmp_path: Path, preset: str) -> None:
    # --mode central for the pretrained presets (issue 15): the probe on the encoder's
    # cached features, DP-free LoRA through the encoder; the saved model is the preset's.
    cfg = RunConfig().with_overrides(
        {**TINY, "num-server-rounds": 1, "model-preset": preset, "max-length": 12}
    )
    summary = train_central(cfg, tmp_path, _quiet()[0], max_train=96, learning_rates=[1e-3])
    assert summary.final.accuracy is not None and 0.0 <= summary.final.accuracy <= 1.0
    saved = read_model(tmp_path / "model" / "model.safetensors")
    assert saved.spec.kind == preset
    adapters = [name for name in saved.arrays if ".lora_A." in name or ".lora_B." in name]
    assert set(saved.arrays) - set(adapters) == {"head.weight", "head.bias"}
    assert len(adapters) == (24 if preset == "minilm-lora" else 0)
