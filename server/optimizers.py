"""Server optimizers applied to the averaged site update (Reddi et al. 2021).

Sites run plain local SGD (local momentum or Adam made the global model flip between
classes under label skew here); adaptivity and momentum live on the server, where
they also average the DP noise of successive rounds.
"""

from __future__ import annotations

from typing import Literal

import torch

Arrays = dict[str, torch.Tensor]
OptimizerName = Literal["fedavg", "fedavgm", "fedadam"]


def weighted_mean(updates: list[Arrays], weights: list[float]) -> Arrays:
    """Sum_i w_i u_i / Sum_i w_i, key by key; every update must have the same keys."""
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("update weights must sum to a positive number")
    keys = set(updates[0])
    for u in updates[1:]:
        if set(u) != keys:
            raise ValueError("updates disagree on their arrays")
    return {
        k: sum(
            (w * u[k] for u, w in zip(updates, weights, strict=True)),
            torch.zeros_like(updates[0][k]),
        )
        / total
        for k in updates[0]
    }


class ServerOptimizer:
    """x <- x + lr * direction(avg_update); FedAvg with lr 1 is plain averaging."""

    def __init__(
        self,
        name: OptimizerName,
        *,
        learning_rate: float = 1.0,
        momentum: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if name not in ("fedavg", "fedavgm", "fedadam"):
            raise ValueError(f"unknown server optimizer {name!r}")
        self.name = name
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.beta2 = beta2
        self.tau = tau
        self._m: Arrays = {}
        self._v: Arrays = {}

    def state(self) -> dict[str, Arrays]:
        """The moments a resumed run needs to go on exactly (server/resume.py)."""
        return {"m": dict(self._m), "v": dict(self._v)}

    def load_state(self, state: dict[str, Arrays], weights: Arrays) -> None:
        """Restore ``state()``; its arrays must be the weights' (names and shapes)."""
        for part, arrays in (("m", state.get("m", {})), ("v", state.get("v", {}))):
            for k, v in arrays.items():
                if k not in weights or v.shape != weights[k].shape:
                    raise ValueError(f"optimizer state {part}/{k} does not fit the weights")
        self._m = {k: v.clone() for k, v in state.get("m", {}).items()}
        self._v = {k: v.clone() for k, v in state.get("v", {}).items()}

    def step(self, weights: Arrays, update: Arrays) -> Arrays:
        if set(weights) != set(update):
            raise ValueError("update and weights disagree on their arrays")
        out: Arrays = {}
        for k, u in update.items():
            if self.name == "fedavg":
                direction = u
            elif self.name == "fedavgm":
                self._m[k] = self.momentum * self._m.get(k, torch.zeros_like(u)) + u
                direction = self._m[k]
            else:
                m = self.momentum * self._m.get(k, torch.zeros_like(u)) + (1 - self.momentum) * u
                v = self.beta2 * self._v.get(k, torch.zeros_like(u)) + (1 - self.beta2) * u * u
                self._m[k], self._v[k] = m, v
                direction = m / (v.sqrt() + self.tau)
            out[k] = weights[k] + self.learning_rate * direction
        return out
