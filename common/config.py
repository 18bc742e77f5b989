"""The run configuration: parsed once, frozen, unknown keys refused.

Flower hands the app a flat kebab-case dict (``[tool.flwr.app.config]`` in
pyproject.toml, overridden by ``flwr run --run-config`` or ``fedsilo simulate``). It
is turned into a ``RunConfig`` at the edge and handlers only ever see that object.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

# The model presets common/model.py builds (listed here so that parsing a config does
# not load torch).
Preset = Literal["tiny", "small", "minilm-probe", "minilm-lora"]
BUNDLED_DATASETS = ("rotten-tomatoes", "20newsgroups")
MAX_ROUNDS = 100_000  # a plan's rounds: bounded, so a site can list its evaluation rounds
AT_THE_SITES = "sites"  # a deployment's data set: the sites' own files, nothing central


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names it."""


class RunConfig(BaseModel):
    """Federation-wide settings chosen by the coordinator (a site's own budget may be
    tighter: see client/)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=_kebab, populate_by_name=True
    )

    # The federation
    num_server_rounds: int = 20
    fraction_train: float = 1.0
    min_sites: int = 2
    round_timeout: float = 600.0
    seed: int = 0
    # Data. ``dataset``: a bundled data set, "sites" (deployment: only the sites hold
    # data), or (simulation) a CSV/JSONL file or a folder of them (one file per site). ``task``: a task file or bundled task name (common/
    # task.py); "" = the bundled data set's own task (own data: ``fedsilo simulate``
    # reads the labels once and writes the run's task file). ``natural``: the data's own
    # sites (movies packed into sites; own data: ``site-column`` values, or one file per
    # site).
    dataset: str = "rotten-tomatoes"
    task: str = ""
    site_column: str = ""
    partition: Literal["natural", "iid", "dirichlet"] = "natural"
    dirichlet_alpha: float = 0.5
    min_partition_size: int = 50
    text_column: str = "text"
    label_column: str = "label"
    # Model: "" and 0 = the task's (a value here overrides the task, which changes its
    # digest: a deployed site that pinned the task then refuses the plan)
    model_preset: Literal["", "tiny", "small", "minilm-probe", "minilm-lora"] = ""
    max_length: int = 0
    # Local training (plain SGD: local momentum/Adam flips the model under label skew)
    local_epochs: int = 1
    batch_size: int = 256
    learning_rate: float = 1.0
    # Differential privacy (per site, example-level)
    dp: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    clip_norm: float = 1.5
    # Per-example clipping: "bookkeeping" (one backward, common/dp_engine.py) or "opacus".
    dp_engine: Literal["bookkeeping", "opacus"] = "bookkeeping"
    # Aggregation. Each site's model delta is L2-clipped to update-clip-norm (bounds its
    # influence and the quantization range); the mean is uniform over sites or weighted
    # by example counts (capped at max-site-weight, which is public).
    update_clip_norm: float = 15.0
    weighting: Literal["uniform", "examples"] = "uniform"
    max_site_weight: int = 4096
    # Secure aggregation (SecAgg+): the coordinator sees only the sum of b-bit encodings.
    secure_aggregation: bool = True
    secagg_bits: Literal[4, 8, 16] = 8
    # Shares needed to recover a site's secrets, as a fraction of its holders (at least a
    # strict majority); 0 degree = complete graph for few sites, about 3 log2(n) above
    # (sites refuse a lower degree: dropouts could cut a sparser graph into pieces).
    secagg_threshold: float = 0.5
    secagg_degree: int = 0
    # Server optimizer on the averaged update
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam"] = "fedavgm"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9
    # Exponential moving average of the global model across rounds, evaluated and
    # shipped (0 = off). Post-processing of released updates: no privacy cost.
    server_ema: float = 0.8
    # Simulation only: a simulated site crashes in a round with this probability, at a
    # random stage of it (to exercise dropouts; deployed sites ignore it).
    dropout_rate: float = 0.0
    # Evaluation. "auto": central on the task's public test set if it has one, else
    # private federated evaluation: each site evaluates the global model on its held-out
    # share (rows chosen by a keyed hash, never trained on) and sends per-class counts,
    # with Gaussian noise calibrated to eval-epsilon (charged to the site's evaluation
    # budget), inside the secure sum when secure aggregation is on. eval-every: also
    # every N rounds (0: after the last round only).
    evaluation: Literal["auto", "central", "federated", "both"] = "auto"
    eval_fraction: float = 0.2  # simulated sites' held-out share (deployed: their own)
    eval_epsilon: float = 1.0
    eval_every: int = 0
    # Simulation only, a labelled option: federated evaluation without noise (exact
    # counts, no privacy; deployed sites ignore it and say so).
    eval_noise: bool = True
    # A rehearsal: every site trains and evaluates on a small public stand-in instead of
    # its own data and spends nothing (client/rehearsal.py); every output says REHEARSAL.
    rehearsal: bool = False
    # Before a DP run's first round each site answers what the plan would cost it and
    # what its budget leaves; sites that would refuse are named and not asked.
    preflight: bool = True
    # Resume a run that died (server/resume.py): its output folder. The coordinator fills
    # in for the sites the ids of the runs this one continues (comma-separated) and the
    # rounds they finished; a site calibrates the new run with their entries as spent.
    resume: str = ""
    resumes_run: str = ""
    resume_round: int = 0
    # Output ("" = runs/<timestamp>)
    out_dir: str = ""
    # Simulation only: where simulated sites keep their identity keys and privacy
    # ledgers ("" = <out-dir>/sites). Reuse a folder across runs and the sites' budgets
    # span those runs. Deployed sites use their own node config `state-dir`.
    sites_dir: str = ""

    @field_validator(
        "num_server_rounds",
        "min_sites",
        "local_epochs",
        "batch_size",
        "min_partition_size",
        "max_site_weight",
    )
    @classmethod
    def _positive_int(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator(
        "round_timeout",
        "dirichlet_alpha",
        "learning_rate",
        "clip_norm",
        "server_learning_rate",
        "update_clip_norm",
    )
    @classmethod
    def _positive_float(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError("must be a positive finite number")
        return v

    @field_validator("num_server_rounds")
    @classmethod
    def _rounds(cls, v: int) -> int:
        if v > MAX_ROUNDS:
            raise ValueError(f"must be at most {MAX_ROUNDS}")
        return v

    @field_validator("max_length", "eval_every")
    @classmethod
    def _natural(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be 0 (the default) or a positive number")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(f"name a bundled data set {list(BUNDLED_DATASETS)} or a data path")
        return v

    @field_validator("eval_fraction")
    @classmethod
    def _eval_fraction(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError("must be in (0, 1)")
        return v

    @field_validator("fraction_train")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("must be in (0, 1]")
        return v

    @field_validator("secagg_threshold")
    @classmethod
    def _threshold(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("must be in (0, 1]; a strict majority of holders is always required")
        return v

    @field_validator("secagg_degree")
    @classmethod
    def _degree(cls, v: int) -> int:
        if v < 0 or v % 2:
            raise ValueError("must be 0 (automatic) or an even number of neighbours")
        return v

    @field_validator("epsilon", "eval_epsilon")
    @classmethod
    def _epsilon(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError("must be a positive finite number (use dp=false for no DP)")
        return v

    @field_validator("delta")
    @classmethod
    def _delta(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError("must be in (0, 1)")
        return v

    @field_validator("server_momentum", "server_ema", "dropout_rate")
    @classmethod
    def _momentum(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError("must be in [0, 1)")
        return v

    @field_validator("resumes_run")
    @classmethod
    def _run_ids(cls, v: str) -> str:
        if v and not all(part and part.isalnum() for part in v.split(",")):
            raise ValueError("must be comma-separated run ids (letters and digits)")
        if len(v) > 2000:
            raise ValueError("names too many runs")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> RunConfig:
        if not 0 <= self.resume_round < self.num_server_rounds:
            raise ValueError(
                f"resume-round {self.resume_round} must be in [0, num-server-rounds "
                f"{self.num_server_rounds})"
            )
        if self.rehearsal and not self.dp:
            raise ValueError("a rehearsal rehearses a DP run: it needs dp = true")
        if bool(self.resume_round) != bool(self.resumes_run):
            raise ValueError("resume-round and resumes-run go together (the coordinator sets both)")
        if self.dataset == "20newsgroups" and self.partition == "natural":
            raise ValueError(
                "20newsgroups has no natural grouping column: use partition 'iid' or 'dirichlet'"
            )
        if self.site_column and self.bundled:
            raise ValueError("site-column splits a data file of your own, not a bundled data set")
        if self.site_column and self.partition != "natural":
            raise ValueError(
                f"site-column makes each of its values a site (partition 'natural'), "
                f"not {self.partition!r}"
            )
        return self

    @property
    def resumed_runs(self) -> tuple[str, ...]:
        """The runs this one continues, oldest first (empty: a run of its own)."""
        return tuple(self.resumes_run.split(",")) if self.resumes_run else ()

    @property
    def bundled(self) -> bool:
        """Whether ``dataset`` names a bundled data set (else: a path to own data)."""
        return self.dataset in BUNDLED_DATASETS

    @classmethod
    def from_user_config(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's flat kebab-case dict; any error names the key."""
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as err:
            raise ConfigError(describe_validation_error(err)) from None

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A copy with kebab-case overrides applied and validated again."""
        return RunConfig.from_user_config({**self.to_user_config(), **overrides})

    def to_user_config(self) -> dict[str, Any]:
        """Back to the flat kebab-case dict (what summary.json and Flower carry)."""
        return self.model_dump(by_alias=True)


def describe_validation_error(err: ValidationError) -> str:
    """One line per problem: the kebab-case key and what is wrong with it."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'")
        else:
            lines.append(f"config key '{key}': {e['msg']}")
    return "; ".join(lines)
