"""``fedsilo simulate``: the real ServerApp and ClientApp on Flower's Simulation Engine.

Each simulated site is a Ray actor with one CPU (about 630 MB each), so a
2-core machine trains two sites at a time. A scenario is a TOML file of run-config
keys plus ``num-sites``; command-line options override it.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig
from common.outputs import SUMMARY_FILE, RunSummary, read_summary

SCENARIO_DIR = Path(__file__).parent / "scenarios"
SIMULATION_KEYS = {"num-sites"}
DEFAULT_SITES = 10

# Flower reads these at import time: no telemetry, no update check, no run-time
# `uv sync` (it would try to download torch).
QUIET_FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Transparent huge pages for torch's CPU tensors: the Opacus engine builds fresh
    # per-example gradient tensors every step; with huge pages its DP step costs about
    # 1.7x a plain one instead of about 2.0x (benchmarks/dp_step.py). Must be set before
    # torch allocates.
    "THP_MEM_ALLOC_ENABLE": "1",
}


def load_scenario(path_or_name: str) -> dict[str, Any]:
    """A scenario file (or the name of a bundled one) as a flat dict, validated."""
    path = Path(path_or_name)
    if not path.suffix and not path.exists():
        path = SCENARIO_DIR / f"{path_or_name}.toml"
    if not path.is_file():
        raise ConfigError(f"scenario {path_or_name!r} not found (looked for {path})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"scenario {path}: {err}") from None
    nested = [k for k, v in raw.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"scenario {path}: keys must be flat, found tables {nested}")
    sim = {k: raw.pop(k) for k in list(raw) if k in SIMULATION_KEYS}
    RunConfig.from_user_config(raw)  # names the first bad key
    return {**raw, **sim}


def _drop_python_api_deprecation(record: logging.LogRecord) -> bool:
    """Flower deprecates its Python simulation entry point in favour of `flwr run`;
    fedsilo uses it on purpose (in-process table and outputs), so the notice is noise."""
    return "`run_simulation` function is deprecated" not in record.getMessage()


def check_options(options: Mapping[str, Any]) -> tuple[RunConfig, int]:
    """The run config and number of sites of one simulation, or a ConfigError naming
    the bad key (``fedsilo sweep`` checks every run with it before the first starts)."""
    overrides = dict(options)
    num_sites = overrides.pop("num-sites", DEFAULT_SITES)
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
        raise ConfigError(f"num-sites must be a positive integer, got {num_sites!r}")
    cfg = RunConfig().with_overrides(overrides)
    if num_sites < cfg.min_sites:
        raise ConfigError(f"num-sites {num_sites} is below min-sites {cfg.min_sites}")
    return cfg, num_sites


def simulate(options: Mapping[str, Any]) -> RunSummary:
    """Run one simulation; ``options`` are run-config keys plus ``num-sites``."""
    for key, value in QUIET_FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    cfg, num_sites = check_options(options)  # before starting Ray: parsed once, here

    import torch
    from flwr.simulation import run_simulation

    # Our own per-round table says what happens; Flower's DEBUG chatter would bury it.
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    flwr_log.addFilter(_drop_python_api_deprecation)

    from client.app import app as client_app
    from server.app import make_server_app, with_run_folders

    cfg = with_run_folders(cfg)
    gpus = 1.0 / max(1, min(num_sites, 4)) if torch.cuda.is_available() else 0.0
    run_simulation(
        server_app=make_server_app(cfg),
        client_app=client_app,
        num_supernodes=num_sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": gpus},
            "init_args": {"logging_level": "ERROR", "log_to_driver": True},
        },
    )
    summary_path = Path(cfg.out_dir) / SUMMARY_FILE
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {summary_path}")
    return read_summary(summary_path)
