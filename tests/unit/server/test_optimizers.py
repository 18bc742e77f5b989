"""Server optimizers against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from server.optimizers import ServerOptimizer, weighted_mean


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_weighted_mean_weights_by_examples() -> None:
    got = weighted_mean([{"w": t(1.0, 0.0)}, {"w": t(0.0, 4.0)}], [3.0, 1.0])
    assert torch.allclose(got["w"], t(0.75, 1.0))


def test_weighted_mean_rejects_mismatches() -> None:
    with pytest.raises(ValueError):
        weighted_mean([{"w": t(1.0)}, {"v": t(1.0)}], [1.0, 1.0])
    with pytest.raises(ValueError):
        weighted_mean([], [])
    with pytest.raises(ValueError):
        weighted_mean([{"w": t(1.0)}], [0.0])


def test_fedavg_adds_the_average_update() -> None:
    opt = ServerOptimizer("fedavg", learning_rate=1.0)
    assert torch.allclose(opt.step({"w": t(1.0)}, {"w": t(0.5)})["w"], t(1.5))


def test_fedavgm_accumulates_momentum() -> None:
    opt = ServerOptimizer("fedavgm", learning_rate=0.5, momentum=0.9)
    w = opt.step({"w": t(0.0)}, {"w": t(1.0)})  # m = 1 -> w = 0.5
    w = opt.step(w, {"w": t(1.0)})  # m = 1.9 -> w = 0.5 + 0.95
    assert torch.allclose(w["w"], t(1.45))


def test_fedadam_normalizes_the_step() -> None:
    opt = ServerOptimizer("fedadam", learning_rate=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    w = opt.step({"w": t(0.0)}, {"w": t(2.0)})
    m, v = 0.1 * 2.0, 0.01 * 4.0
    assert torch.allclose(w["w"], t(0.1 * m / (v**0.5 + 1e-3)))


def test_unknown_optimizer_and_mismatched_arrays() -> None:
    with pytest.raises(ValueError):
        ServerOptimizer("sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ServerOptimizer("fedavg").step({"w": t(1.0)}, {"v": t(1.0)})
