"""What a run keeps so that a new run can take over where it died (``resume``).

Every run writes, in its output folder:

| file | when | what |
|---|---|---|
| ``run.json`` | at its start | its Flower run id and its whole run config |
| ``summary.json`` | after each round (``complete`` false until the end) | the rounds so far (common/outputs.py) |
| ``checkpoints/resume.safetensors`` | after each round, replaced atomically | the raw global weights, their moving average, the server optimizer's state, the round, the site sampler's state, the nodes banned for cheating and the sites' names |

A run started with ``resume = RUN_DIR`` is a NEW run (new Flower run id, new ledger
entries): it adopts the dead run's plan (only ``out-dir``, ``round-timeout`` and
``min-sites`` may differ), restores that state and trains the rounds after the last
checkpointed one. A round that was interrupted is run again from scratch, secure
aggregation included; what the sites spent in it stays charged (their ledgers), and
they calibrate the new run's noise with the dead run's entries as earlier spend
(client/round.py). Nothing half-finished is reused. (NVIDIA FLARE built in-place
resume and removed it after resumed-aborted-job bugs; Flower recommends a new run from
saved weights: this is that, with everything the run needs.)
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config import ConfigError, RunConfig
from common.outputs import (
    CHECKPOINT_DIR,
    SUMMARY_FILE,
    RoundRecord,
    RunOutputError,
    read_summary,
)

Arrays = dict[str, torch.Tensor]
RUN_FILE = "run.json"
STATE_FILE = f"{CHECKPOINT_DIR}/resume.safetensors"
# What the resuming operator may change; everything else is the dead run's plan.
OPERATIONAL_KEYS = ("out-dir", "round-timeout", "min-sites", "resume")
_PARTS = ("weights", "shipped", "m", "v")


@dataclass
class Resumable:
    """The coordinator's state after ``round``: what a new run needs to go on."""

    round: int
    run_id: str
    weights: Arrays
    shipped: Arrays | None
    optimizer: dict[str, Arrays]  # "m", "v": the server optimizer's moments
    sampler: Any  # random.Random.getstate()
    banned: dict[int, int] = field(default_factory=dict)  # node -> round it cheated in
    names: dict[int, str] = field(default_factory=dict)  # node -> site name


def record_run(out_dir: Path, cfg: RunConfig, run_id: str) -> None:
    """``run.json``: the run's id and its whole config, at its start."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic(
        out_dir / RUN_FILE,
        json.dumps({"run_id": run_id, "config": cfg.to_user_config()}, indent=2).encode(),
    )


def save_state(out_dir: Path, state: Resumable) -> None:
    """The state after a round, replacing the previous one atomically."""
    from safetensors.torch import save

    tensors = {f"weights/{k}": v for k, v in state.weights.items()}
    if state.shipped is not None:
        tensors.update({f"shipped/{k}": v for k, v in state.shipped.items()})
    for part in ("m", "v"):
        tensors.update({f"{part}/{k}": v for k, v in state.optimizer.get(part, {}).items()})
    meta = {
        "round": str(state.round),
        "run_id": state.run_id,
        "sampler": json.dumps(state.sampler),
        "banned": json.dumps({str(k): v for k, v in state.banned.items()}),
        "names": json.dumps({str(k): v for k, v in state.names.items()}),
    }
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    _atomic(out_dir / STATE_FILE, blob)


def _atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load(run_dir: Path) -> tuple[RunConfig, Resumable, tuple[RoundRecord, ...]]:
    """The dead run's config, its last state and its rounds up to that state; a
    ``RunOutputError`` that names the file when anything is missing or damaged."""
    run_dir = run_dir.resolve()
    if not run_dir.is_dir():
        raise RunOutputError(f"resume {run_dir}: no such run folder")
    path = run_dir / RUN_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        run_id, config = raw["run_id"], raw["config"]
        if not isinstance(run_id, str) or not isinstance(config, dict):
            raise TypeError("run_id or config has the wrong type")
        dead = RunConfig.from_user_config(config)
    except FileNotFoundError:
        raise RunOutputError(
            f"resume {run_dir}: no {RUN_FILE} (not a run folder, or a run of an older fedsilo)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as err:
        raise RunOutputError(f"{path}: unreadable ({err})") from None
    state = _load_state(run_dir / STATE_FILE, run_id)
    # The rounds up to the state (a round recorded after it is one the new run redoes).
    rows = tuple(r for r in read_summary(run_dir).rounds if r.round <= state.round)
    if [r.round for r in rows] != list(range(1, state.round + 1)):
        raise RunOutputError(f"{run_dir / SUMMARY_FILE}: does not hold rounds 1..{state.round}")
    return dead, state, rows


def _load_state(path: Path, run_id: str) -> Resumable:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise RunOutputError(f"{path}: missing: the run died before its first round ended")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        rnd = int(meta["round"])
        sampler = json.loads(meta["sampler"])
        state = (int(sampler[0]), tuple(int(x) for x in sampler[1]), sampler[2])
        random.Random().setstate(state)  # refuses a malformed state
        banned = {int(k): int(v) for k, v in json.loads(meta["banned"]).items()}
        names = {int(k): str(v) for k, v in json.loads(meta["names"]).items()}
        recorded = meta["run_id"]
    except (OSError, SafetensorError, KeyError, ValueError, TypeError, IndexError) as err:
        raise RunOutputError(f"{path}: damaged ({type(err).__name__}: {err})") from None
    if recorded != run_id:
        raise RunOutputError(f"{path}: belongs to run {recorded}, not to run {run_id}")
    if rnd < 1:
        raise RunOutputError(f"{path}: damaged (round {rnd})")
    parts: dict[str, Arrays] = {p: {} for p in _PARTS}
    for name, value in tensors.items():
        part, _, key = name.partition("/")
        if part not in parts or not key:
            raise RunOutputError(f"{path}: damaged (unknown array {name!r})")
        parts[part][key] = value
    if not parts["weights"]:
        raise RunOutputError(f"{path}: damaged (no global weights)")
    return Resumable(
        round=rnd,
        run_id=run_id,
        weights=parts["weights"],
        shipped=parts["shipped"] or None,
        optimizer={"m": parts["m"], "v": parts["v"]},
        sampler=state,
        banned=banned,
        names=names,
    )


def resumed_config(cfg: RunConfig, dead: RunConfig, state: Resumable) -> RunConfig:
    """The new run's config: the dead run's plan with this run's operational keys, and
    what the sites need to know of what it resumes (the dead run's id and the rounds
    it finished)."""
    if state.round >= dead.num_server_rounds:
        raise RunOutputError(
            f"resume {cfg.resume}: run {state.run_id} finished all its "
            f"{dead.num_server_rounds} rounds; nothing to resume"
        )
    mine = cfg.to_user_config()
    keep = {k: mine[k] for k in OPERATIONAL_KEYS}
    # A resumed run resumed again: the sites count every run of the chain as spent.
    chain = ",".join([*dead.resumed_runs, state.run_id])
    return dead.with_overrides({**keep, "resumes-run": chain, "resume-round": state.round})
