"""What a site does with one round plan, in plain Python (no Flower).

Order of a DP round (the invariants of ARCHITECTURE.md):
1. know the site's budget (its own node config first, else the federation's);
2. calibrate sigma ONCE per run from the whole plan (rounds x local steps);
3. budget filter: compose everything spent with the planned round, refuse if it
   would exceed the budget, before touching the data with a model;
4. train with DP-SGD, record the spend in the persistent accountant, and only then
   hand back the update.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from common.data import (
    TextDataset,
    builtin_label_names,
    load_builtin,
    load_site_file,
    partition,
)
from common.model import build_model
from common.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from common.privacy.budget import DatasetBudget, check_delta
from common.privacy.errors import PrivacyError
from common.privacy.events import SubsampledGaussianEvent
from common.privacy.identity import load_or_create_identity
from common.privacy.ledger import LEDGER_FILE, Ledger, dataset_fingerprint
from common.text import encode
from common.training import (
    Batchable,
    batches_per_epoch,
    default_device,
    sample_rate,
    train_dp,
    trainable_delta,
)
from common.wire import SITE_NAME, RoundPlan, SiteReport

PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
DATA_PATH_KEY = "data-path"
SITE_EPSILON_KEY = "epsilon"
SITE_DELTA_KEY = "delta"
SITE_ID_KEY = "site-id"
STATE_DIR_KEY = "state-dir"
ALLOW_NO_DP_KEY = "allow-no-dp"
TEXT_COLUMN_KEY = "text-column"
LABEL_COLUMN_KEY = "label-column"
DEFAULT_SITE_DELTA = 1e-5
LOCK_FILE = "ledger.lock"


class SiteConfigError(ValueError):
    """The site's own settings (node config) are unusable."""


@dataclass(frozen=True)
class SiteSettings:
    """Where the site's data comes from and what it allows itself to spend."""

    site_id: str
    data_path: str | None
    partition_id: int | None
    num_partitions: int | None
    epsilon: float
    delta: float
    state_dir: Path | None  # identity key + privacy ledger; None: no ledger (no-DP only)
    allow_no_dp: bool  # a deployed site trains without DP only if its own config says so
    text_column: str
    label_column: str

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any], config: RunConfig) -> SiteSettings:
        """Deployment: ``data-path`` (+ optional own ``epsilon``/``delta``).
        Simulation: ``partition-id``/``num-partitions`` from the engine, and a ledger
        folder per site under the plan's ``sites-dir``."""
        data_path = node.get(DATA_PATH_KEY)
        pid, num = node.get(PARTITION_ID_KEY), node.get(NUM_PARTITIONS_KEY)
        if data_path is None and (pid is None or num is None):
            raise SiteConfigError(
                f"node config needs '{DATA_PATH_KEY}' (a site's data file) or "
                f"'{PARTITION_ID_KEY}' and '{NUM_PARTITIONS_KEY}' (simulation)"
            )
        if data_path is None:  # simulation: the researcher is coordinator and site at once
            epsilon = float(node.get(SITE_EPSILON_KEY, config.epsilon))
            delta = float(node.get(SITE_DELTA_KEY, config.delta))
        else:  # a deployed site's budget is its own, never the coordinator's plan
            if SITE_EPSILON_KEY not in node:
                raise SiteConfigError(f"a deployed site sets its own '{SITE_EPSILON_KEY}' budget")
            epsilon = float(node[SITE_EPSILON_KEY])
            delta = float(node.get(SITE_DELTA_KEY, DEFAULT_SITE_DELTA))
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise SiteConfigError(f"site epsilon budget must be positive, got {epsilon}")
        if not 0 < delta < 1:
            raise SiteConfigError(f"site delta must be in (0, 1), got {delta}")
        default_id = f"site-{pid}" if data_path is None else "site"
        site_id = str(node.get(SITE_ID_KEY, default_id))
        if not SITE_NAME.fullmatch(site_id):
            raise SiteConfigError(f"site-id {site_id!r}: use 1-64 letters, digits, '.', '_', '-'")
        state = node.get(STATE_DIR_KEY)
        if state is None and data_path is None and config.sites_dir:
            state = str(Path(config.sites_dir) / site_id)
        return cls(
            allow_no_dp=data_path is None or bool(node.get(ALLOW_NO_DP_KEY, False)),
            text_column=str(node.get(TEXT_COLUMN_KEY, "text")),
            label_column=str(node.get(LABEL_COLUMN_KEY, "label")),
            state_dir=Path(str(state)) if state is not None else None,
            site_id=site_id,
            data_path=str(data_path) if data_path is not None else None,
            partition_id=int(pid) if data_path is None and pid is not None else None,
            num_partitions=int(num) if data_path is None and num is not None else None,
            epsilon=epsilon,
            delta=delta,
        )


def data_key(settings: SiteSettings, config: RunConfig) -> tuple[Any, ...]:
    if settings.data_path is not None:
        path = Path(settings.data_path)
        stat = path.stat() if path.is_file() else None
        return (
            "file",
            str(path.resolve()),
            stat.st_mtime_ns if stat else None,
            stat.st_size if stat else None,
            config.dataset,
            settings.text_column,
            settings.label_column,
            config.max_length,
        )
    return (
        "partition",
        config.dataset,
        config.partition,
        config.dirichlet_alpha,
        config.min_partition_size,
        config.seed,
        settings.partition_id,
        settings.num_partitions,
        config.max_length,
    )


def read_site_file(path: str, dataset: str, text_column: str, label_column: str) -> TextDataset:
    """A deployed site's own data file, validated against the federation's label set
    (``fedsilo site check`` reads it with this too)."""
    return load_site_file(
        path,
        label_names=builtin_label_names(dataset),
        text_column=text_column,
        label_column=label_column,
    )


@lru_cache(maxsize=4)
def _load(key: tuple[Any, ...]) -> tuple[Batchable, str]:
    """The site's tokenized examples and the data set's fingerprint (cached per process:
    simulated sites share actors)."""
    if key[0] == "file":
        _, path, _, _, dataset, text_col, label_col, max_length = key
        data = read_site_file(path, dataset, text_col, label_col)
    else:
        _, dataset, scheme, alpha, min_size, seed, pid, num, max_length = key
        full = load_builtin(dataset, "train", seed=seed)
        parts = partition(full, scheme, num, seed=seed, alpha=alpha, min_size=min_size)
        if not 0 <= pid < num:
            raise SiteConfigError(f"partition-id {pid} is outside 0..{num - 1}")
        data = full.subset(parts[pid])
    fingerprint = dataset_fingerprint(data.texts, data.labels.tolist())
    return Batchable.from_encoded(encode(data.texts, max_length), data.labels), fingerprint


def load_site_data(settings: SiteSettings, config: RunConfig) -> tuple[Batchable, str]:
    return _load(data_key(settings, config))


@dataclass
class SiteState:
    """What a site keeps across rounds of one run (Flower's context.state)."""

    plan_key: str = ""
    noise_multiplier: float = 0.0
    noise_free_steps: int = 0  # steps of the labelled no-DP baseline (no accountant)

    def to_json(self) -> str:
        return json.dumps(
            {
                "plan_key": self.plan_key,
                "noise_multiplier": self.noise_multiplier,
                "noise_free_steps": self.noise_free_steps,
            }
        )

    @classmethod
    def from_json(cls, text: str | None) -> SiteState:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(
            plan_key=str(raw["plan_key"]),
            noise_multiplier=float(raw["noise_multiplier"]),
            noise_free_steps=int(raw.get("noise_free_steps", 0)),
        )


def site_report(status: str, reason: str, site: str, **values: Any) -> SiteReport:
    """A report with every number not given set to 0."""
    base: dict[str, Any] = {
        "num_examples": 0,
        "dp": True,
        "epsilon": 0.0,
        "budget": 0.0,
        "delta": 0.0,
        "noise_multiplier": 0.0,
        "sample_rate": 0.0,
        "steps": 0,
        "total_steps": 0,
    }
    base.update(values)
    return SiteReport(status=status, reason=reason, site=site, **base)  # type: ignore[arg-type]


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def code_version() -> str:
    try:
        return f"fedsilo {metadata.version('fedsilo')}"
    except metadata.PackageNotFoundError:
        return "fedsilo (not installed)"


def run_round(
    plan: RoundPlan,
    global_arrays: dict[str, torch.Tensor],
    settings: SiteSettings,
    state: SiteState,
    *,
    run_id: str,
    generator: torch.Generator,
) -> tuple[SiteReport, dict[str, torch.Tensor] | None]:
    """One round at a site. With DP, the signed ledger is the record of every spend: the
    budget filter reads it (all runs on this data set), and the round's entry is written
    and fsync'd before the update is handed back."""
    cfg = plan.config
    data, fingerprint = load_site_data(settings, cfg)
    n = len(data)
    model = build_model(cfg.model_spec(len(builtin_label_names(cfg.dataset))))
    model.load_trainable_state(global_arrays)
    q = sample_rate(n, cfg.batch_size)
    steps = cfg.local_epochs * batches_per_epoch(n, cfg.batch_size)
    train = partial(
        train_dp,
        model,
        data,
        steps=steps,
        sample_rate=q,
        clip_norm=cfg.clip_norm,
        learning_rate=cfg.learning_rate,
        generator=generator,
        engine=cfg.dp_engine,
        device=default_device(),
    )
    if not cfg.dp and not settings.allow_no_dp:
        raise SiteConfigError(
            f"the plan asks for no DP; this site requires DP ('{ALLOW_NO_DP_KEY}')"
        )
    if not cfg.dp:
        train(noise_multiplier=0.0)  # the labelled baseline: clipped, no noise, no epsilon
        state.noise_free_steps += steps
        no_dp = {"dp": False, "epsilon": math.nan, "budget": math.nan, "delta": math.nan}
        return site_report(
            "ok",
            "",
            settings.site_id,
            num_examples=n,
            sample_rate=q,
            steps=steps,
            total_steps=state.noise_free_steps,
            **no_dp,
        ), trainable_delta(global_arrays, model.trainable_state())

    check_delta(settings.delta, n)
    if settings.state_dir is None:
        raise SiteConfigError(f"a DP site needs '{STATE_DIR_KEY}' for its privacy ledger")
    ledger = Ledger(settings.state_dir / LEDGER_FILE, load_or_create_identity(settings.state_dir))
    # One round at a time per site: the budget read, the training and the entry are one
    # critical section, so two concurrent runs cannot both spend the last of a budget.
    with _exclusive(settings.state_dir / LOCK_FILE):
        return _dp_round(
            plan,
            settings,
            state,
            ledger,
            run_id=run_id,
            fingerprint=fingerprint,
            train=train,
            trained=lambda: trainable_delta(global_arrays, model.trainable_state()),
            n=n,
            q=q,
            steps=steps,
        )


def _dp_round(
    plan: RoundPlan,
    settings: SiteSettings,
    state: SiteState,
    ledger: Ledger,
    *,
    run_id: str,
    fingerprint: str,
    train: Callable[..., object],
    trained: Callable[[], dict[str, torch.Tensor]],
    n: int,
    q: float,
    steps: int,
) -> tuple[SiteReport, dict[str, torch.Tensor] | None]:
    cfg = plan.config
    everything = ledger.entries()  # a torn ledger raises LedgerError: fail closed
    budget = DatasetBudget.from_ledger(
        everything, fingerprint, budget=settings.epsilon, delta=settings.delta
    )  # every run
    this_run = [e.event for e in everything if e.run_id == run_id]  # as the auditor composes
    common = {
        "num_examples": n,
        "budget": settings.epsilon,
        "delta": settings.delta,
        "sample_rate": q,
    }

    def refuse(reason: str) -> tuple[SiteReport, None]:
        return site_report(
            "refused",
            reason,
            settings.site_id,
            epsilon=budget.spent(),
            steps=0,
            total_steps=budget.steps,
            noise_multiplier=state.noise_multiplier,
            **common,
        ), None

    plan_key = json.dumps([n, q, steps, cfg.num_server_rounds, settings.epsilon, settings.delta])
    if state.plan_key != plan_key:
        # Once per run: the noise that, composed after what earlier runs spent on this
        # data set, reaches the budget exactly at the last planned round.
        earlier = budget.earlier_runs(run_id)
        try:
            state.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=settings.epsilon,
                delta=settings.delta,
                sample_rate=q,
                steps=steps * cfg.num_server_rounds,
                prior=earlier,
            )
        except PrivacyError as err:  # our own text: it names no data
            return refuse(f"no noise fits this plan: {err}")
        state.plan_key = plan_key
    event = SubsampledGaussianEvent(state.noise_multiplier, q, steps)
    fits, after = budget.allows(event)
    if not fits:
        return refuse(f"budget {settings.epsilon:g} would reach {after:.2f}")
    train(noise_multiplier=state.noise_multiplier)
    entry = ledger.append(  # written and fsync'd before the update exists outside
        site_id=settings.site_id,
        dataset=fingerprint,
        run_id=run_id,
        round=plan.round,
        event=event,
        clip_norm=cfg.clip_norm,
        delta=settings.delta,
        epsilon_run=compute_epsilon([*this_run, event], settings.delta),
        epsilon_dataset=after,
        budget=settings.epsilon,
        code_version=code_version(),
    )
    return site_report(
        "ok",
        "",
        settings.site_id,
        epsilon=after,
        steps=steps,
        total_steps=budget.steps + steps,
        noise_multiplier=state.noise_multiplier,
        ledger_head=entry.entry_hash(),
        ledger_signature=entry.signature,
        **common,
    ), trained()
