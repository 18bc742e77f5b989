"""A site's own settings: what its node config says (where its data is, what it allows
itself to spend, where its ledger lives), read and checked once per round.

A deployed site's node config is written by ``fedsilo site init`` (client/deploy.py);
a simulated site's comes from the Simulation Engine (partition id and count) and the
plan's ``sites-dir``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.data import TextDataset, builtin_label_names, load_site_file
from common.messages import SITE_NAME
from common.secagg.roster import ROSTER_FILE
from common.task import Task

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
# The number of examples the site declares public: its sample rate and steps come from
# it (never from the private count of its file), and so does its weight.
DATA_SIZE_KEY = "data-size"
# The explicit opt-in to a budget of its own for a data set disjoint from all others.
DISJOINT_KEY = "disjoint-data-set"
# The largest L2 norm of the trainable global weights the site accepts (public).
MAX_GLOBAL_NORM_KEY = "max-global-norm"
# The fewest authenticated sites (itself included) this site joins a secure sum with.
MIN_SECURE_SITES_KEY = "secagg-min-sites"
DEFAULT_MIN_SECURE_SITES = 3  # with two, each site's sum minus its own is the other's update
# The task the site agreed to (``fedsilo site init --task``): its digest, and the copy of
# its file in the site folder. A plan whose task differs is refused before anything.
TASK_DIGEST_KEY = "task-digest"
TASK_FILE_KEY = "task-file"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Whether the site refuses plain rounds (its update in the clear): default on for a
# deployed site, so the coordinator cannot switch secure aggregation off for it.
SECAGG_REQUIRED_KEY = "secagg-required"
# The private federated evaluation: the share of the site's rows it holds out (pinned
# in its state folder at first use, never trained on) and its evaluation budget, which
# caps what a run may ask (the run config may ask for less, never more).
EVAL_FRACTION_KEY = "eval-fraction"
EVAL_EPSILON_KEY = "eval-epsilon"
DEFAULT_EVAL_FRACTION = 0.2
DEFAULT_EVAL_EPSILON = 1.0
DEFAULT_SITE_DELTA = 1e-5
# What the site keeps of its lifetime budget for later: it refuses a run that would leave
# less (its own node config; the coordinator cannot lower it).
RESERVE_KEY = "epsilon-reserve"
DEFAULT_MAX_GLOBAL_NORM = 1e4  # the tiny model starts at 22 and trains to about 64


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
    declared_size: int | None = None  # None: simulation, where partition sizes are public
    # Simulation without a site budget of its own: the lifetime budget is one run at the
    # plan's target (``epsilon`` is then that target).
    one_run_budget: bool = False
    disjoint_data_set: str | None = None
    max_global_norm: float = DEFAULT_MAX_GLOBAL_NORM
    min_secure_sites: int = DEFAULT_MIN_SECURE_SITES
    secagg_required: bool = False
    task_digest: str | None = None  # the task the site agreed to (None: not pinned)
    task_file: Path | None = None
    # Deployed: the site's own held-out share and evaluation budget. Simulated: the
    # plan's share (rows are held out only in runs that evaluate privately), and its own
    # evaluation budget only when it has a budget of its own (else this run's releases).
    eval_fraction: float | None = None
    eval_epsilon: float | None = None
    reserve: float = 0.0

    @property
    def deployed(self) -> bool:
        return self.data_path is not None

    @property
    def roster_path(self) -> Path | None:
        """The federation's roster: in a deployed site's state folder (installed out of
        band, `fedsilo site roster`); for simulated sites, one shared file beside their
        state folders, which each site enrols in (common/secagg/roster.py)."""
        if self.state_dir is None:
            return None
        folder = self.state_dir if self.deployed else self.state_dir.parent
        return folder / ROSTER_FILE

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
            # Without its own budget a simulated site gets one run's worth: what its
            # filter certifies for a run at the plan's target (see one_run_budget).
            one_run = SITE_EPSILON_KEY not in node
            epsilon = float(node.get(SITE_EPSILON_KEY, config.epsilon))
            delta = float(node.get(SITE_DELTA_KEY, config.delta))
        else:  # a deployed site's budget is its own, never the coordinator's plan
            one_run = False
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
        declared = _positive_int(node, DATA_SIZE_KEY)
        if data_path is not None and declared is None:
            raise SiteConfigError(
                f"a deployed site declares its public '{DATA_SIZE_KEY}' (the number of "
                "examples it lets the coordinator know; `fedsilo site init --data-size`)"
            )
        disjoint = node.get(DISJOINT_KEY)
        if disjoint is not None and not (
            isinstance(disjoint, str) and SITE_NAME.fullmatch(disjoint)
        ):
            raise SiteConfigError(
                f"'{DISJOINT_KEY}' {disjoint!r}: name the data set with 1-64 letters, digits, "
                "'.', '_', '-'"
            )
        max_norm = float(node.get(MAX_GLOBAL_NORM_KEY, DEFAULT_MAX_GLOBAL_NORM))
        if not (math.isfinite(max_norm) and max_norm > 0):
            raise SiteConfigError(
                f"'{MAX_GLOBAL_NORM_KEY}' must be a positive number, got {max_norm}"
            )
        min_sites = _positive_int(node, MIN_SECURE_SITES_KEY) or DEFAULT_MIN_SECURE_SITES
        if min_sites < 2:
            raise SiteConfigError(f"'{MIN_SECURE_SITES_KEY}' must be at least 2, got {min_sites}")
        digest, task_file = node.get(TASK_DIGEST_KEY), node.get(TASK_FILE_KEY)
        if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
            raise SiteConfigError(f"'{TASK_DIGEST_KEY}' must be 'sha256:' and 64 hex digits")
        if (digest is None) != (task_file is None):
            raise SiteConfigError(f"'{TASK_DIGEST_KEY}' and '{TASK_FILE_KEY}' go together")
        required = node.get(SECAGG_REQUIRED_KEY, data_path is not None)
        if not isinstance(required, bool):
            raise SiteConfigError(
                f"'{SECAGG_REQUIRED_KEY}' must be true or false, got {required!r}"
            )
        reserve = float(node.get(RESERVE_KEY, 0.0))
        if not (math.isfinite(reserve) and 0 <= reserve < epsilon):
            raise SiteConfigError(
                f"'{RESERVE_KEY}' must be at least 0 and below the site's budget {epsilon:g}, "
                f"got {reserve}"
            )
        eval_fraction = eval_epsilon = None
        if data_path is None and (EVAL_EPSILON_KEY in node or not one_run):
            # A simulated site with a budget of its own: its evaluation is capped by its
            # own evaluation budget, or else by its lifetime budget, never by the plan.
            eval_epsilon = float(node.get(EVAL_EPSILON_KEY, epsilon))
            if not (math.isfinite(eval_epsilon) and 0 < eval_epsilon <= epsilon):
                raise SiteConfigError(
                    f"'{EVAL_EPSILON_KEY}' must be positive and at most the site's budget "
                    f"{epsilon:g}, got {eval_epsilon}"
                )
        if data_path is not None:
            eval_fraction = float(node.get(EVAL_FRACTION_KEY, DEFAULT_EVAL_FRACTION))
            if not 0 < eval_fraction < 1:
                raise SiteConfigError(
                    f"'{EVAL_FRACTION_KEY}' must be in (0, 1), got {eval_fraction}"
                )
            eval_epsilon = float(node.get(EVAL_EPSILON_KEY, DEFAULT_EVAL_EPSILON))
            if not (math.isfinite(eval_epsilon) and 0 < eval_epsilon <= epsilon):
                raise SiteConfigError(
                    f"'{EVAL_EPSILON_KEY}' must be positive and at most the site's budget "
                    f"{epsilon:g}, got {eval_epsilon}"
                )
        return cls(
            reserve=reserve,
            eval_fraction=eval_fraction,
            eval_epsilon=eval_epsilon,
            task_digest=digest,
            task_file=Path(str(task_file)) if task_file is not None else None,
            secagg_required=required,
            min_secure_sites=min_sites,
            one_run_budget=one_run,
            declared_size=declared,
            disjoint_data_set=disjoint,
            max_global_norm=max_norm,
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


def _positive_int(node: Mapping[str, Any], key: str) -> int | None:
    value = node.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SiteConfigError(f"'{key}' must be a whole number of at least 1, got {value!r}")
    return value


def read_site_file(path: str, dataset: str, text_column: str, label_column: str) -> TextDataset:
    """A deployed site's own data file, validated against the federation's label set:
    the ClientApp, ``fedsilo site check`` and ``fedsilo check-data`` read it with this
    (no torch: the checks stay light)."""
    return load_site_file(
        path,
        label_names=builtin_label_names(dataset),
        text_column=text_column,
        label_column=label_column,
    )


def task_problem(settings: SiteSettings, offered: Task) -> str | None:
    """Why the plan's task is not the one this site agreed to (None: it is, or the site
    pinned none). The plan carries the task; its digest must be the pinned one, so the
    coordinator cannot change labels, columns, length or model under the site."""
    if settings.task_digest is None:
        if not settings.deployed:
            return None
        # A deployed site that agreed to no task reads its file with a bundled data set's
        # labels: a plan of any other labels would make its file fail, on its content,
        # after the charge (a data-dependent signal), or train on permuted labels.
        from common.task import bundled_task, bundled_tasks

        bundled = {bundled_task(name).labels for name in bundled_tasks()}
        if offered.labels in bundled:
            return None
        return (
            f"the plan's task {offered.name} is not a bundled one, and this site agreed to no "
            "task (`fedsilo site init --task`)"
        )
    if offered.digest() == settings.task_digest:
        return None
    return (
        f"the plan's task {offered.name} ({offered.digest()[:19]}...) is not the task this "
        f"site agreed to ({settings.task_digest[:19]}...)"
    )
