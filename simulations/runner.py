"""``fedsilo simulate``: the real ServerApp and ClientApp on Flower's Simulation Engine.

Each simulated site is a Ray actor with one CPU (about 630 MB each), so a
2-core machine trains two sites at a time. A scenario is a TOML file of run-config
keys plus ``num-sites``; command-line options override it.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.config import AT_THE_SITES, ConfigError, RunConfig
from common.data.dataset import DataValidationError
from common.data.owndata import discover_task, load_own_data, own_sites
from common.outputs import SUMMARY_FILE, RunSummary, read_summary
from common.task import TaskError, resolve_task, run_task

SCENARIO_DIR = Path(__file__).parent / "scenarios"
SIMULATION_KEYS = {"num-sites"}
SIMULATION_FILE = "simulation.json"  # what a resumed simulation needs beyond run.json
DEFAULT_SITES = 10
TASK_FILE = "task.toml"
NOTICE = (
    "# Written by fedsilo simulate: the label set was READ FROM THE DATA, as no task\n"
    "# file was given. A real federation declares its labels; it does not read them.\n"
)

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


def resume_options(run_dir: str, out: str | None = None) -> dict[str, Any]:
    """The options of a simulation that takes over where the one in ``run_dir`` died:
    its plan and number of sites, its sites' folder (their ledgers go on), and a new
    output folder (``out``, default runs/<timestamp>); server/resume.py does the rest."""
    from server.resume import OPERATIONAL_KEYS, RUN_FILE

    path = Path(run_dir).resolve()
    try:
        config = json.loads((path / RUN_FILE).read_text())["config"]
        num_sites = json.loads((path / SIMULATION_FILE).read_text())["num-sites"]
    except FileNotFoundError as err:
        raise ConfigError(
            f"--resume {path}: not the folder of a simulation ({Path(str(err.filename)).name} "
            "missing)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--resume {path}: unreadable ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--resume {path}: {RUN_FILE} holds no config")
    kept = {
        k: v
        for k, v in config.items()
        if k not in OPERATIONAL_KEYS and k not in ("resumes-run", "resume-round")
    }
    return {**kept, "num-sites": num_sites, "resume": str(path), "out-dir": out or ""}


def check_options(options: Mapping[str, Any]) -> tuple[RunConfig, int]:
    """The run config and number of sites of one simulation, or a ConfigError naming
    the bad key (``fedsilo sweep`` checks every run with it before the first starts).
    On data of one's own the data's sites set the number of sites (natural split)."""
    overrides = dict(options)
    num_sites = overrides.pop("num-sites", None)
    if num_sites is not None and (
        isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1
    ):
        raise ConfigError(f"num-sites must be a positive integer, got {num_sites!r}")
    cfg = RunConfig().with_overrides(overrides)
    if cfg.dataset == AT_THE_SITES:
        raise ConfigError(
            f"dataset {AT_THE_SITES!r} is a deployment's (the sites hold the data): "
            "simulate with --data FILE or FOLDER, or a bundled data set"
        )
    if not cfg.bundled and cfg.partition == "natural":
        found = len(own_site_names(cfg))
        if num_sites is not None and num_sites != found:
            raise ConfigError(
                f"num-sites {num_sites}: the data has {found} sites of its own (partition "
                "'natural'); leave num-sites out, or use iid / dirichlet"
            )
        num_sites = found
    num_sites = num_sites or DEFAULT_SITES
    if num_sites < cfg.min_sites:
        raise ConfigError(f"num-sites {num_sites} is below min-sites {cfg.min_sites}")
    return cfg, num_sites


def own_site_names(cfg: RunConfig) -> tuple[str, ...]:
    """The sites of data of one's own under the natural split: the site column's values
    or the folder's files (sorted; simulated site i is the i-th)."""
    try:
        data = load_own_data(
            cfg.dataset,
            None,
            site_column=cfg.site_column,
            text_column=_columns(cfg)[0],
            label_column=_columns(cfg)[1],
        )
    except (DataValidationError, OSError) as err:
        raise ConfigError(str(err)) from None
    if data.groups is None:
        raise ConfigError(
            f"{cfg.dataset}: partition 'natural' needs the data's own sites: --site-column "
            "COL (each value is a site) or a folder with one file per site; or use iid / "
            "dirichlet"
        )
    return tuple(sorted(set(data.groups)))


def _columns(cfg: RunConfig) -> tuple[str, str]:
    """The text and label columns: the task file's, else the run config's."""
    if cfg.task:
        task = resolve_task(cfg.task)
        return task.text_column, task.label_column
    return cfg.text_column, cfg.label_column


def prepare_task(cfg: RunConfig, num_sites: int, say: Callable[[str], None] = print) -> RunConfig:
    """Before an own-data simulation starts: the task, checked against the data (or read
    from it when there is no task file, printed and written to the run's task file) and
    the sites it makes. ``cfg`` has its run folders."""
    if cfg.bundled:
        return cfg
    # Simulated sites may run in another working folder: absolute paths.
    cfg = cfg.model_copy(
        update={
            "dataset": str(Path(cfg.dataset).resolve()),
            "task": str(Path(cfg.task).resolve()) if cfg.task.endswith(".toml") else cfg.task,
        }
    )
    if not cfg.task:
        text, label = _columns(cfg)
        try:
            task, counts = discover_task(
                cfg.dataset,
                name=Path(cfg.dataset).stem or "own-data",
                text_column=text,
                label_column=label,
                max_length=cfg.max_length or 48,
                model_preset=cfg.model_preset or "tiny",
            )
        except (DataValidationError, OSError, TaskError) as err:
            raise ConfigError(str(err)) from None
        path = Path(cfg.out_dir) / TASK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(NOTICE + task.to_toml(), encoding="utf-8")
        shown = ", ".join(f"{k} ({v})" for k, v in counts.items())
        say(f"labels read from the data: {shown}")
        say(
            f"notice: the label set was read from the data and written to {path}; a real "
            "federation declares its labels in a task file (--task), never reads them "
            "from private data"
        )
        cfg = cfg.model_copy(update={"task": str(path)})
    task = run_task(cfg)
    try:
        sites = own_sites(
            cfg.dataset,
            task,
            cfg.site_column,
            cfg.partition,
            num_sites,
            cfg.seed,
            cfg.dirichlet_alpha,
            cfg.min_partition_size,
        )
    except (DataValidationError, OSError, ValueError) as err:
        raise ConfigError(str(err)) from None
    for i, (name, part) in enumerate(zip(sites.names, sites.parts, strict=True)):
        counts = sites.data.subset(part).label_counts()
        say(
            f"site-{i} = {name}: {len(part)} rows, "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
        )
    return cfg


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

    cfg = prepare_task(with_run_folders(cfg), num_sites)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SIMULATION_FILE).write_text(json.dumps({"num-sites": num_sites}) + "\n")
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
    summary = read_summary(summary_path)
    if not summary.complete:
        raise RuntimeError(
            f"the simulation stopped after round {summary.rounds[-1].round if summary.rounds else 0}"
            f" of {cfg.num_server_rounds}; `fedsilo simulate --resume {cfg.out_dir}` goes on"
        )
    return summary
