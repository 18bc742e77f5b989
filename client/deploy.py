"""Site tooling for a data site joining a fedsilo federation: ``fedsilo site init``,
``roster``, ``check`` and ``start``.

What ``site init`` writes into the site folder ``DIR`` (mode 0700):

| file | what |
|---|---|
| ``node.key`` (0600), ``node.pub`` | the SuperNode's authentication key (EC P-384, OpenSSH); ``node.pub`` goes to the coordinator |
| ``ca.crt`` | the federation CA that must have signed the SuperLink's certificate |
| ``site.toml`` | where the SuperLink is, and the federation's data set (its label names) for checks |
| ``node-config.toml`` | the node config the ClientApp reads (``client/settings.py`` ``SiteSettings``): site id, data path, the site's own budget, ledger folder, columns |
| ``state/identity.key`` (0600), ``identity.pub``, ``fingerprint.key`` (0600), ``site-state.json``, ``ledger.jsonl`` | the signed privacy ledger, its key, the secret that keys its data fingerprints, and the marker without which a deployed site refuses to start a ledger (``common/privacy/identity.py``, ``ledger.py``) |
| ``state/roster.json`` | the federation's roster (``site roster``, or ``site init --roster``): the sites' identity keys, agreed out of band; without it the site refuses every secure round (``client/roster.py``) |
| ``supernode.pid`` | the running SuperNode's PID while ``site start`` runs it (``site stop`` reads it) |

``site check`` loads the data file with the loader the ClientApp uses and prints
only counts; with ``--connect`` it also meets the SuperLink as the SuperNode will: a TLS
handshake checked against ``ca.crt``, and a signed question that tells whether the node
key is registered without bringing the node online. ``site start`` runs the checks, then
runs ``flower-supernode`` (TLS root certificate, node key, node config, a free local
runtime port) as its child: Flower's log passes through, SIGTERM/SIGINT are passed on,
``supernode.pid`` names it while it runs (``site stop`` reads it), and when it fails the
cause is said in words (Flower's own exit status is 1 for every failure).
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import math
import re
import shlex
import socket
import ssl
import struct
import sys
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import tomli_w
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.roster import (
    Installed,
    install_roster,
    own_entry_problem,
    read_roster,
    size_problem,
)
from client.settings import (
    DATA_PATH_KEY,
    DATA_SIZE_KEY,
    DEFAULT_EVAL_EPSILON,
    DEFAULT_EVAL_FRACTION,
    DEFAULT_MIN_SECURE_SITES,
    DEFAULT_SITE_DELTA,
    DISJOINT_KEY,
    EVAL_EPSILON_KEY,
    EVAL_FRACTION_KEY,
    LABEL_COLUMN_KEY,
    MIN_SECURE_SITES_KEY,
    RESERVE_KEY,
    SECAGG_REQUIRED_KEY,
    SITE_DELTA_KEY,
    SITE_EPSILON_KEY,
    SITE_ID_KEY,
    STATE_DIR_KEY,
    TASK_DIGEST_KEY,
    TASK_FILE_KEY,
    TEXT_COLUMN_KEY,
    SiteConfigError,
    SiteSettings,
    read_site_file,
)
from common.config import ConfigError, RunConfig
from common.data import BUILTIN_DATASETS, DataValidationError, TextDataset, load_site_file
from common.flower_cli import (
    FLWR_HOME_DIR,
    FlowerProcess,
    PidFile,
    executable,
    flower_env,
    killed_by,
    plain,
    run_child,
    stop_process,
)
from common.pki import (
    CA_CERT,
    DeployError,
    ca_fingerprint_text,
    load_ca_certificate,
    load_node_key,
    new_node_key,
    openssh_public,
    private_mode_problem,
    write_private,
    write_public,
)
from common.privacy.budget import SiteBudget, delta_problem
from common.privacy.errors import LedgerError
from common.privacy.identity import (
    KEY_FILE,
    PUBLIC_KEY_FILE,
    SiteKeys,
    init_state,
    load_public_key,
    open_state,
)
from common.privacy.ledger import LEDGER_FILE, read_ledger, scope_of
from common.secagg.roster import ROSTER_FILE, Roster, RosterError
from common.task import Task, TaskError

SITE_FILE = "site.toml"
TASK_FILE = "task.toml"  # the task the site agreed to (`site init --task`)
NODE_CONFIG_FILE = "node-config.toml"
NODE_KEY = "node.key"
NODE_PUB = "node.pub"
SUPERNODE_PID = "supernode.pid"  # the running SuperNode's PID (`site start` keeps it)
DEFAULT_EPSILON = 8.0
STATE_DIR = "state"  # the site's identity key and privacy ledger


def parse_superlink(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) of the SuperLink's Fleet API."""
    host, sep, port_text = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DeployError(
            f"--superlink {address!r}: expected HOST:PORT, e.g. coord.example.org:8000"
        )
    return host, int(port_text)


def render_node_config(
    *,
    site_id: str,
    data_path: Path,
    state_dir: Path,
    epsilon: float,
    delta: float,
    text_column: str,
    label_column: str,
    data_size: int,
    disjoint_data_set: str | None = None,
    min_secure_sites: int = DEFAULT_MIN_SECURE_SITES,
    secagg_required: bool = True,
    task_digest: str | None = None,
    task_file: Path | None = None,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    eval_epsilon: float = DEFAULT_EVAL_EPSILON,
    reserve: float = 0.0,
) -> dict[str, str | float | int]:
    """The node config, keyed exactly as ``SiteSettings.from_node_config`` reads it,
    and validated by it (so a value the ClientApp would refuse is refused now)."""
    if not (math.isfinite(epsilon) and math.isfinite(delta)):
        raise DeployError("--epsilon and --delta must be finite numbers")
    config: dict[str, str | float | int] = {
        SITE_ID_KEY: site_id,
        DATA_PATH_KEY: str(data_path),
        DATA_SIZE_KEY: data_size,
        SITE_EPSILON_KEY: float(epsilon),
        SITE_DELTA_KEY: float(delta),
        STATE_DIR_KEY: str(state_dir),
        TEXT_COLUMN_KEY: text_column,
        LABEL_COLUMN_KEY: label_column,
        MIN_SECURE_SITES_KEY: min_secure_sites,
        SECAGG_REQUIRED_KEY: secagg_required,
        EVAL_FRACTION_KEY: float(eval_fraction),
        EVAL_EPSILON_KEY: float(eval_epsilon),
        RESERVE_KEY: float(reserve),
    }
    if disjoint_data_set is not None:
        config[DISJOINT_KEY] = disjoint_data_set
    if task_digest is not None and task_file is not None:
        config[TASK_DIGEST_KEY] = task_digest
        config[TASK_FILE_KEY] = str(task_file)
    if text_column == label_column:
        raise DeployError(f"--text-column and --label-column must differ, both are {text_column!r}")
    try:
        SiteSettings.from_node_config(config, RunConfig())
    except SiteConfigError as err:
        raise DeployError(str(err)) from None
    return config


def node_config_toml(config: Mapping[str, Any]) -> str:
    """A flat TOML table: ``flower-supernode --node-config FILE.toml`` reads it as is
    (no quoting trouble with spaces or quotes in paths)."""
    header = (
        "# Node config of this fedsilo site (read by the ClientApp as context.node_config).\n"
        "# epsilon/delta: this site's own lifetime budget (the coordinator cannot change them);\n"
        "# data-size: the number of examples it declares public;\n"
        "# secagg-min-sites: the fewest sites on its roster (itself included) it joins a\n"
        "# secure sum with (2 lets the other site of a pair learn its update: keep 3+);\n"
        "# secagg-required: refuse plain rounds, where the update travels in the clear;\n"
        "# epsilon-reserve: what the site keeps of its budget: it refuses a run that would\n"
        "# leave less.\n"
    )
    return header + tomli_w.dumps(dict(config))


@dataclass(frozen=True)
class Site:
    """A site folder as ``site init`` left it."""

    directory: Path
    superlink: str
    dataset: str
    node_config: dict[str, Any]

    @property
    def node_key(self) -> Path:
        return self.directory / NODE_KEY

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def node_config_file(self) -> Path:
        return self.directory / NODE_CONFIG_FILE

    @classmethod
    def load(cls, directory: Path) -> Site:
        directory = directory.resolve()
        settings = _read_toml(directory / SITE_FILE, hint="run `fedsilo site init` first")
        node = _read_toml(directory / NODE_CONFIG_FILE, hint="run `fedsilo site init --force`")
        try:
            superlink = str(settings["superlink"])
            dataset = str(settings.get("dataset", "rotten-tomatoes"))
        except KeyError as err:
            raise DeployError(f"{directory / SITE_FILE}: missing key {err}") from None
        parse_superlink(superlink)
        return cls(directory, superlink, dataset, node)


def _read_toml(path: Path, *, hint: str) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise DeployError(f"{path}: not found ({hint})") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise DeployError(f"{path}: unreadable ({err})") from None


def init_site(
    directory: Path,
    *,
    site_id: str,
    data: Path,
    ca: Path,
    superlink: str,
    epsilon: float = DEFAULT_EPSILON,
    delta: float = DEFAULT_SITE_DELTA,
    dataset: str = "rotten-tomatoes",
    text_column: str = "text",
    label_column: str = "label",
    data_size: int | None = None,
    disjoint_data_set: str | None = None,
    min_secure_sites: int = DEFAULT_MIN_SECURE_SITES,
    roster: Path | None = None,
    task: Path | None = None,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    eval_epsilon: float = DEFAULT_EVAL_EPSILON,
    reserve: float = 0.0,
    force: bool = False,
) -> Site:
    """Write the site's keys and settings. An existing site is refused unless
    ``force``; even then its keys are kept (the node key is registered at the
    coordinator, the ledger key signs the site's ledger).

    ``data_size`` is the number of examples the site declares public (its sample rate
    and weight come from it); by default the data file's row count. ``roster``, when
    given, is installed as ``site roster`` would, and checked before anything is
    written: the site's identity key must already be on it, so only a site whose state
    folder exists (``--force``) can name one."""
    directory = directory.resolve()
    parse_superlink(superlink)
    agreed_task: Task | None = None
    if task is not None:  # the task the site agrees to: its labels and columns rule
        try:
            agreed_task = Task.load(task)
        except TaskError as err:
            raise DeployError(f"--task: {err}") from None
        dataset = agreed_task.name
        text_column, label_column = agreed_task.text_column, agreed_task.label_column
    if dataset not in BUILTIN_DATASETS and agreed_task is None:
        raise DeployError(f"--dataset {dataset!r}: one of {', '.join(BUILTIN_DATASETS)}")
    data = data.expanduser().resolve()
    if not data.exists():
        raise DeployError(f"--data {data}: no such file")
    if not data.is_file():
        raise DeployError(f"--data {data}: not a regular file")
    ca_cert = load_ca_certificate(ca)
    state = directory / STATE_DIR
    if data_size is None:
        try:
            data_size = len(_read_for(str(data), dataset, text_column, label_column, agreed_task))
        except (DataValidationError, OSError, ValueError) as err:
            raise DeployError(
                f"--data {data}: cannot count its rows to declare its size ({err}); fix the "
                "file or pass --data-size"
            ) from None
    config = render_node_config(
        data_size=data_size,
        disjoint_data_set=disjoint_data_set,
        site_id=site_id,
        data_path=data,
        state_dir=state,
        epsilon=epsilon,
        delta=delta,
        text_column=text_column,
        label_column=label_column,
        min_secure_sites=min_secure_sites,
        task_digest=agreed_task.digest() if agreed_task is not None else None,
        task_file=directory / TASK_FILE if agreed_task is not None else None,
        eval_fraction=eval_fraction,
        eval_epsilon=eval_epsilon,
        reserve=reserve,
    )
    if (directory / SITE_FILE).exists() or (directory / NODE_KEY).exists():
        if not force:
            raise DeployError(
                f"{directory} already holds a site; use --force to rewrite its settings "
                "(its keys are kept)"
            )
    agreed = None if roster is None else _roster_for(roster, state, site_id, min_secure_sites)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    if (directory / NODE_KEY).exists():  # --force: the registered key stays
        public = openssh_public(load_node_key(directory / NODE_KEY))
    else:
        private, public = new_node_key()
        write_private(directory / NODE_KEY, private)
    write_public(directory / NODE_PUB, public + f" {site_id}\n".encode())
    try:
        init_state(state, site_id=site_id)  # never replaces an existing key or ledger
    except LedgerError as err:
        raise DeployError(str(err)) from None
    if agreed is not None:
        install_roster(state, agreed)
    write_public(directory / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    if task is not None:
        write_public(directory / TASK_FILE, task.read_bytes())
    write_public(directory / NODE_CONFIG_FILE, node_config_toml(config))
    write_public(
        directory / SITE_FILE,
        "# fedsilo site settings (written by `fedsilo site init`)\n"
        + tomli_w.dumps({"superlink": superlink.strip(), "dataset": dataset}),
    )
    return Site(directory, superlink.strip(), dataset, config)


def _roster_for(path: Path, state: Path, site_id: str, min_sites: int) -> Roster:
    """``path``'s roster, if this site (its state folder's identity key) may install
    it under ``site_id``; else a DeployError that says why, before anything is written."""
    agreed = read_roster(path)
    pub = state / PUBLIC_KEY_FILE
    if not pub.is_file():
        raise DeployError(
            f"--roster {path}: this site has no identity key yet ({pub}); `site init` makes "
            "it: hand its identity.pub to whoever makes the roster, then install the roster "
            "with `fedsilo site roster`"
        )
    try:
        identity = load_public_key(pub).public_bytes_raw()
    except LedgerError as err:
        raise DeployError(str(err)) from None
    problem = own_entry_problem(agreed, site_id, identity) or size_problem(agreed, min_sites)
    if problem:
        raise DeployError(f"roster {path} not installed: {problem}")
    return agreed


def install_site_roster(directory: Path, path: Path) -> Installed:
    """``fedsilo site roster FILE DIR``: check the roster (format, this site listed
    under its site-id with its own identity key, at least its secagg-min-sites sites)
    and put it in the site's state folder, where the ClientApp reads it."""
    site = Site.load(directory)
    try:
        settings = SiteSettings.from_node_config(site.node_config, RunConfig())
    except (SiteConfigError, ValueError) as err:
        raise DeployError(f"{site.node_config_file}: {err}") from None
    if settings.state_dir is None:
        raise DeployError(f"{site.node_config_file}: a deployed site needs '{STATE_DIR_KEY}'")
    agreed = _roster_for(path, settings.state_dir, settings.site_id, settings.min_secure_sites)
    return install_roster(settings.state_dir, agreed)


def roster_summary(installed: Installed) -> str:
    """What ``site roster`` prints: the fingerprint to compare, and what changed."""
    new = installed.roster.fingerprint()
    names = ", ".join(sorted(installed.roster.sites))
    if installed.previous is None:
        head = f"installed roster {installed.path}"
    elif not installed.changed:
        head = f"roster {installed.path} was already installed: nothing changed"
    else:
        head = f"replaced roster {installed.path}\n  old fingerprint {installed.previous}"
    return (
        f"{head}\n  fingerprint     {new}\n  {len(installed.roster.sites)} sites: {names}\n"
        "compare the fingerprint with every other site's, out of band (not through the "
        "coordinator)"
    )


def init_summary(site: Site) -> str:
    d = site.directory
    pub = (d / NODE_PUB).read_text().strip()
    q = shlex.quote(str(d))
    cfg = site.node_config
    ledger_key = open_state(d / STATE_DIR).identity.fingerprint()
    scope = f", disjoint data set {cfg[DISJOINT_KEY]!r}" if DISJOINT_KEY in cfg else ""
    min_sites = int(cfg.get(MIN_SECURE_SITES_KEY, DEFAULT_MIN_SECURE_SITES))
    pair = (
        " (with 2, the other site of a pair learns this site's update from the mean)"
        if min_sites < 3
        else ""
    )
    try:
        ca = ca_fingerprint_text(load_ca_certificate(d / CA_CERT))
    except DeployError as err:
        ca = f"unreadable: {err}"
    roster_file = d / STATE_DIR / ROSTER_FILE
    try:
        roster = f"{roster_file}: {Roster.load(roster_file).fingerprint()}"
        then = f"fedsilo site check {q}     then: fedsilo site start {q}"
    except RosterError:
        roster = (
            "none yet: every secure round is refused until the federation's roster is installed"
        )
        then = (
            f"fedsilo site roster ROSTER.json {q}     (the federation's roster, once "
            f"agreed)\nthen: fedsilo site check {q}     then: fedsilo site start {q}"
        )
    return f"""site {cfg[SITE_ID_KEY]} ready in {d}
  node key      {d / NODE_KEY} (0600, stays here)
  ledger key    {d / STATE_DIR / KEY_FILE} (0600, stays here); auditors get {d / STATE_DIR / PUBLIC_KEY_FILE} ({ledger_key})
  node config   {d / NODE_CONFIG_FILE}: data {cfg[DATA_PATH_KEY]}, lifetime epsilon budget {cfg[SITE_EPSILON_KEY]:g}{scope} (reserve {cfg.get(RESERVE_KEY, 0.0):g}), delta {cfg[SITE_DELTA_KEY]:g}
  public size   {cfg[DATA_SIZE_KEY]} examples: the coordinator learns this number (sample rate, weight), never the file's count
  secure sums   with at least {min_sites} sites of its roster, itself included (secagg-min-sites){pair}
  roster        {roster}
  SuperLink     {site.superlink}: TLS will be checked against {d / CA_CERT} (CA {ca}); `fedsilo site check --connect` tries it

hand this public key to the coordinator (file {d / NODE_PUB}):
{pub}
and the ledger key {d / STATE_DIR / PUBLIC_KEY_FILE} (fingerprint {ledger_key}) to the
coordinator (auditors) and to whoever makes the federation's roster (`fedsilo roster make`)

next: {then}"""


@dataclass
class CheckReport:
    """What ``site check`` found: printable lines (counts only) and problems."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def ok(self, text: str) -> None:
        self.lines.append(f"ok    {text}")

    def fail(self, text: str) -> None:
        self.lines.append(f"FAIL  {text}")
        self.problems.append(text)

    def note(self, text: str) -> None:
        """Something not checked, said so; not a problem."""
        self.lines.append(f"note  {text}")


def check_site(
    directory: Path, *, connect: bool = False, timeout: float | None = None
) -> CheckReport:
    """Everything ``site start`` needs, checked locally; nothing leaves the machine and
    no text of the data is printed. With ``connect``, then the SuperLink as the
    SuperNode will meet it (``check_connection``): its TLS certificate against the
    site's CA, and whether the node key is registered."""
    report = CheckReport()
    site = Site.load(directory)
    _check_local(report, site)
    if connect:
        check_connection(report, site, timeout=CONNECT_TIMEOUT if timeout is None else timeout)
    return report


def _check_local(report: CheckReport, site: Site) -> None:
    d = site.directory
    try:
        key = load_node_key(site.node_key)
        problem = private_mode_problem(site.node_key)
        if problem:
            report.fail(problem)
        else:
            pub = openssh_public(key)
            listed = (d / NODE_PUB).read_bytes().split()[:2] if (d / NODE_PUB).exists() else []
            if b" ".join(listed) != pub:
                report.fail(f"{d / NODE_PUB}: does not match {site.node_key}")
            else:
                report.ok(f"node key {site.node_key} (EC {key.curve.name}, mode 0600)")
    except DeployError as err:
        report.fail(str(err))
    try:
        ca = load_ca_certificate(site.ca_cert)
        report.ok(
            f"CA certificate {site.ca_cert} ({ca_fingerprint_text(ca)}, valid until "
            f"{ca.not_valid_after_utc:%Y-%m-%d})"
        )
    except DeployError as err:
        report.fail(str(err))
    try:
        # A task of the site's own (not bundled) has no run config yet: its node config
        # is read against the defaults, and its data against the pinned task.
        bundled = site.dataset in BUILTIN_DATASETS
        config = RunConfig().with_overrides({"dataset": site.dataset} if bundled else {})
        settings = SiteSettings.from_node_config(site.node_config, config)
    except (SiteConfigError, ConfigError, ValueError) as err:
        report.fail(f"{site.node_config_file}: {err}")
        return
    report.ok(
        f"node config {site.node_config_file}: site {settings.site_id}, budget epsilon "
        f"{settings.epsilon:g}, delta {settings.delta:g}"
    )
    if settings.data_path is None or settings.state_dir is None:
        report.fail(
            f"{site.node_config_file}: a deployed site needs '{DATA_PATH_KEY}' and '{STATE_DIR_KEY}'"
        )
        return
    _check_data(report, settings.data_path, settings, site.dataset)
    keys = _check_ledger(report, settings.state_dir, settings)
    _check_roster(report, d, settings, keys)


def _read_for(
    path: str, dataset: str, text_column: str, label_column: str, task: Task | None
) -> TextDataset:
    """A site's file read with the ClientApp's loader, against the task the site agreed
    to (its labels and columns) or, without one, the bundled data set's labels."""
    if task is None:
        return read_site_file(path, dataset, text_column, label_column)
    return load_site_file(
        path, label_names=task.labels, text_column=task.text_column, label_column=task.label_column
    )


def _check_task(report: CheckReport, settings: SiteSettings) -> Task | None:
    """The task the site agreed to, still the one its node config pinned."""
    if settings.task_file is None:
        return None
    try:
        task = Task.load(settings.task_file)
    except TaskError as err:
        report.fail(f"task: {err}")
        return None
    if task.digest() != settings.task_digest:
        report.fail(
            f"task {settings.task_file} changed since `site init` (digest {task.digest()}, "
            f"the node config pinned {settings.task_digest}): run `fedsilo site init --force "
            "--task` with the task the federation agreed on"
        )
        return None
    report.ok(f"task {task.name}: {len(task.labels)} labels, digest {task.digest()}")
    return task


def _check_data(report: CheckReport, data_path: str, settings: SiteSettings, dataset: str) -> None:
    """The ClientApp's own loader and label set (client.settings.read_site_file, or the
    pinned task's), and the file's size against the public size the site declared."""
    task = _check_task(report, settings)
    if settings.task_file is not None and task is None:
        return
    try:
        data = _read_for(data_path, dataset, settings.text_column, settings.label_column, task)
    except DataValidationError as err:
        report.fail(f"data rejected: {err} (the ClientApp refuses the whole file until fixed)")
        return
    except (OSError, ValueError) as err:
        report.fail(f"data {data_path}: cannot be loaded ({type(err).__name__})")
        return
    counts = ", ".join(f"{k}: {v}" for k, v in data.label_counts().items())
    n = len(data)
    report.ok(f"data {data_path}: {n} rows, 0 rejected ({counts})")
    declared = settings.declared_size
    if declared is not None and n > declared:
        report.fail(
            f"the file has {n} rows, more than the declared public size {declared}: declare "
            "it again (`fedsilo site init --force --data-size`), the sample rate follows it"
        )
    problem = delta_problem(settings.delta, max(n, declared or 0))
    if problem:
        report.fail(f"{problem}; lower --delta")


def _check_ledger(report: CheckReport, state: Path, settings: SiteSettings) -> SiteKeys | None:
    key_path = state / KEY_FILE
    if not key_path.exists():
        report.fail(f"{key_path}: ledger key missing (run `fedsilo site init --force`)")
        return None
    problem = private_mode_problem(key_path)
    if problem:
        report.fail(problem)
        return None
    try:
        keys = open_state(state)  # the marker and both secrets, or a refusal by name
        entries = read_ledger(state / LEDGER_FILE, missing_ok=True)
    except LedgerError as err:
        report.fail(str(err))
        return None
    # What the ClientApp's budget check composes: every entry charged to this site's
    # budget (all runs, all data), at the site's current delta.
    scope = scope_of(settings.disjoint_data_set)
    budget = SiteBudget.from_ledger(
        entries, scope=scope, budget=settings.epsilon, delta=settings.delta
    )
    report.ok(
        f"ledger {state / LEDGER_FILE}: {len(entries)} entries, key "
        f"{keys.identity.fingerprint()[:23]}...; lifetime epsilon spent {budget.spent():.3f} "
        f"of {settings.epsilon:g} ({scope}, adaptive filter); "
        f"{max(0.0, settings.epsilon - settings.reserve - budget.spent()):.3f} left for runs"
        + (f" above the reserve of {settings.reserve:g}" if settings.reserve else "")
    )
    return keys


def _check_roster(
    report: CheckReport, directory: Path, settings: SiteSettings, keys: SiteKeys | None
) -> None:
    """The roster the ClientApp checks every secure round's peers against: readable,
    listing this site under its site-id with its own identity key, and at least as
    many sites as the site's secagg-min-sites."""
    path = settings.roster_path
    if path is None:
        return  # no state folder: reported above
    fix = (
        "install the federation's roster with "
        f"`fedsilo site roster ROSTER.json {shlex.quote(str(directory))}`"
    )
    if not path.exists():
        report.fail(
            f"no roster at {path}: every secure round will be refused (secure aggregation "
            f"is on by default); {fix}"
        )
        return
    try:
        roster = read_roster(path)
    except DeployError as err:
        report.fail(f"{err}: every secure round will be refused; {fix}")
        return
    if keys is None:
        return  # the identity key's problem is reported above
    identity = keys.identity.public_key.public_bytes_raw()
    problem = own_entry_problem(roster, settings.site_id, identity)
    if problem:
        report.fail(f"roster {path}: {problem}: every secure round will be refused; {fix}")
        return
    problem = size_problem(roster, settings.min_secure_sites)
    if problem:
        report.fail(f"roster {path}: {problem}; {fix}")
        return
    report.ok(
        f"roster {path}: {len(roster.sites)} sites, fingerprint {roster.fingerprint()}; "
        f"{settings.site_id} listed with its own identity key; secure sums need "
        f"{settings.min_secure_sites} sites (secagg-min-sites)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def supernode_command(site: Site, *, port: int) -> list[str]:
    """The exact SuperNode command: TLS against the federation CA, node
    authentication, the node config file, a local runtime API port of its own."""
    return [
        "flower-supernode",
        "--superlink",
        site.superlink,
        "--root-certificates",
        str(site.ca_cert),
        "--auth-supernode-private-key",
        str(site.node_key),
        "--node-config",
        str(site.node_config_file),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def supernode_env(site: Site, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each site keeps Flower's files (installed apps) in its own folder."""
    return flower_env(site.directory / FLWR_HOME_DIR, base)


def prepare_start(
    directory: Path, *, port: int | None = None
) -> tuple[CheckReport, list[str], dict[str, str]]:
    """Run the checks; on success the SuperNode command and environment."""
    report = check_site(directory)
    if report.problems:
        return report, [], {}
    site = Site.load(directory)
    cmd = supernode_command(site, port=port if port is not None else free_port())
    cmd[0] = executable(cmd[0])
    return report, cmd, supernode_env(site)


# ---- site check --connect: the SuperLink as the SuperNode will meet it -------------------

CONNECT_TIMEOUT = 10.0  # seconds, to connect and again for each step after
# Flower 1.42's SuperNode speaks the Fleet API as protobuf over HTTP/1.1 (httpx without
# HTTP/2, to the SuperLink's uvicorn), so its TLS handshake offers ALPN "http/1.1" only;
# this check offers the same (nginx, the docker fleet proxy, refuses a handshake that
# offers only a protocol it does not serve).
FLEET_ALPN = ("http/1.1",)
ACTIVATE_PATH = "/v1/fleet/activate-node"
# Flower's Fleet API error codes (flwr/supercore/error/base.py, ApiErrorCode).
FLEET_INVALID_HEARTBEAT_INTERVAL = 2003
FLEET_NODE_ACTIVATION_FAILED = 2004
# Below Flower's minimum heartbeat interval (10 s): the SuperLink refuses the request
# after it has looked the key up and before it activates anything. Were a later Flower
# to activate anyway, the node would lapse to offline 2 s later (2 x the interval).
PROBE_HEARTBEAT_INTERVAL = 1.0


def tls_context(ca: Path) -> ssl.SSLContext:
    """The SuperNode's view: the system's defaults, trusting only the site's CA."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(list(FLEET_ALPN))
    return context


def tls_handshake(host: str, port: int, ca: Path, *, timeout: float) -> None:
    """A TLS handshake with ``host:port``, its certificate verified against ``ca`` for
    the name ``host``; raises what the socket or ssl raised."""
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        tls_context(ca).wrap_socket(raw, server_hostname=host),
    ):
        pass


def foreign_ca_words(ca: Path, ca_fingerprint: str) -> str:
    return (
        f"the SuperLink's certificate is not signed by this site's CA ({ca}, "
        f"{ca_fingerprint}): get the coordinator's ca.crt again and compare its "
        "fingerprint with the one the coordinator printed"
    )


def certificate_problem(message: str, host: str, ca: Path, ca_fingerprint: str) -> str:
    """What a failed certificate verification means for a site, from OpenSSL's words
    (``ssl.SSLCertVerificationError.verify_message``, or the text of Flower's log)."""
    low = message.lower()
    if "mismatch" in low:  # "Hostname mismatch" / "IP address mismatch"
        return (
            f"the SuperLink's certificate does not name {host!r} (its names are the "
            "coordinator's `fedsilo coordinator init --host` values): put one of those "
            f"names in site.toml (`fedsilo site init --force --superlink`), or ask the "
            f"coordinator for a certificate that names {host!r}"
        )
    if "expired" in low:
        return (
            "the SuperLink's certificate (or the CA) has expired: the coordinator must "
            "renew it; if it made a new CA, get its ca.crt and compare the fingerprint"
        )
    if "not yet valid" in low:
        return "the SuperLink's certificate is not valid yet: check this machine's clock"
    if "issuer" in low or "self-signed" in low or "self signed" in low:
        return foreign_ca_words(ca, ca_fingerprint)
    return (
        f"the SuperLink's certificate failed verification against this site's CA ({ca}, "
        f"{ca_fingerprint}): {message}"
    )


def nothing_listens_words(address: str) -> str:
    return (
        f"nothing listens at {address}: is the SuperLink started (`fedsilo coordinator "
        "start`), and is this its address and port?"
    )


def unresolved_words(host: str, reason: str) -> str:
    return (
        f"the name {host!r} does not resolve ({reason}): check the SuperLink's address in "
        "site.toml and this machine's DNS"
    )


def no_answer_words(address: str, timeout: float | None = None) -> str:
    within = f" within {timeout:g} s" if timeout is not None else ""
    return (
        f"no answer from {address}{within}: a firewall drops the connection, or the "
        "address is wrong"
    )


def connect_failure(
    err: OSError, address: str, ca: Path, ca_fingerprint: str, *, timeout: float
) -> str:
    """Why a TLS connection to the SuperLink failed, in words, from what Python raised."""
    host, _ = parse_superlink(address)
    if isinstance(err, ssl.SSLCertVerificationError):
        return certificate_problem(str(err.verify_message or err), host, ca, ca_fingerprint)
    if isinstance(err, ssl.SSLError):
        return (
            f"the TLS handshake with {address} failed ({err.reason or err}): is it the "
            "SuperLink (or its Fleet proxy) that answers at that port?"
        )
    if isinstance(err, ConnectionRefusedError):
        return nothing_listens_words(address)
    if isinstance(err, socket.gaierror):
        return unresolved_words(host, str(err.strerror or err))
    if isinstance(err, TimeoutError):
        return no_answer_words(address, timeout)
    if isinstance(err, ConnectionResetError):
        return (
            f"{address} closed the connection during the TLS handshake: a proxy or "
            "firewall in between refuses it"
        )
    return f"cannot reach {address} ({err.strerror or err})"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def activation_probe(
    key: ec.EllipticCurvePrivateKey, when: dt.datetime
) -> tuple[bytes, dict[str, str]]:
    """The request a SuperNode sends to come online (Flower's ``ActivateNodeRequest``,
    protobuf, signed as Flower's ``NodeAuthHttpInterceptor`` signs it: ECDSA-SHA256 over
    the ISO timestamp), with a heartbeat interval the SuperLink refuses.

    Flower 1.42's handler (flwr/superlink/servicer/fleet/fleet_handlers.py,
    ``activate_node``) first looks the key up ("No SuperNode found with the given public
    key." -> code 2004), then checks the interval (code 2003), and only then activates:
    an unregistered key is answered 2004, a registered one 2003, and nothing changes
    (the SuperLink logs the refusal)."""
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = (
        _varint(1 << 3 | 2)  # public_key: bytes, field 1
        + _varint(len(public))
        + public
        + _varint(2 << 3 | 1)  # heartbeat_interval: double, field 2
        + struct.pack("<d", PROBE_HEARTBEAT_INTERVAL)
    )
    stamp = when.astimezone(dt.UTC).isoformat()
    signature = key.sign(stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    headers = {
        "content-type": "application/protobuf",
        "accept": "application/protobuf",
        "flwr-public-key": base64.b64encode(public).decode("ascii"),
        "flwr-timestamp": stamp,
        "flwr-signature": base64.b64encode(signature).decode("ascii"),
    }
    return body, headers


@dataclass(frozen=True)
class ProbeAnswer:
    """What the SuperLink's answer to ``activation_probe`` says about the node key."""

    registered: bool | None  # None: the answer does not tell
    status: int
    detail: str  # the SuperLink's own words, for a message


def read_probe_answer(status: int, body: bytes) -> ProbeAnswer:
    """Flower's error payload is ``{"code": N, "detail": "..."}``
    (flwr/supercore/error/http.py); the code tells registered (2003) from not (2004)."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    code = payload.get("code") if isinstance(payload, dict) else None
    detail = payload.get("detail") if isinstance(payload, dict) else None
    text = str(detail) if detail is not None else body[:200].decode(errors="replace").strip()
    if code == FLEET_INVALID_HEARTBEAT_INTERVAL:
        return ProbeAnswer(True, status, text)
    if code == FLEET_NODE_ACTIVATION_FAILED:
        return ProbeAnswer(False, status, text)
    if status == 200:  # activated after all (see PROBE_HEARTBEAT_INTERVAL)
        return ProbeAnswer(True, status, "activated")
    return ProbeAnswer(None, status, text)


def probe_registration(
    site: Site, key: ec.EllipticCurvePrivateKey, *, timeout: float = CONNECT_TIMEOUT
) -> ProbeAnswer:
    """Ask the SuperLink whether it knows this node's key (``activation_probe``)."""
    host, port = parse_superlink(site.superlink)
    body, headers = activation_probe(key, dt.datetime.now(dt.UTC))
    conn = http.client.HTTPSConnection(
        host, port, context=tls_context(site.ca_cert), timeout=timeout
    )
    try:
        conn.request("POST", ACTIVATE_PATH, body=body, headers=headers)
        response = conn.getresponse()
        return read_probe_answer(response.status, response.read(65536))
    finally:
        conn.close()


def not_registered_words(site: Site) -> str:
    name = site.node_config.get(SITE_ID_KEY, "SITE")
    return (
        "this node's key is not registered at the coordinator (hand "
        f"{site.directory / NODE_PUB} to the coordinator: `fedsilo coordinator register "
        f"node.pub --name {name} --ledger-key identity.pub`)"
    )


STILL_ONLINE_WORDS = (
    "the coordinator still holds this node as online (it stopped without saying "
    "goodbye); wait about a minute and start again"
)


def check_connection(report: CheckReport, site: Site, *, timeout: float = CONNECT_TIMEOUT) -> None:
    """``site check --connect``: a TLS handshake with the SuperLink checked against the
    site's CA (the fingerprint printed in the coordinator's format), then whether it
    knows the node key. Nothing is activated: the SuperLink keeps the node as it was."""
    try:
        ca_fp = ca_fingerprint_text(load_ca_certificate(site.ca_cert))
    except DeployError:
        report.note("no connection tried: the CA certificate is unusable (above)")
        return
    host, port = parse_superlink(site.superlink)
    try:
        tls_handshake(host, port, site.ca_cert, timeout=timeout)
    except OSError as err:
        report.fail(connect_failure(err, site.superlink, site.ca_cert, ca_fp, timeout=timeout))
        return
    report.ok(
        f"TLS handshake with {site.superlink}: certificate verified against the CA, "
        f"CA fingerprint {ca_fp}"
    )
    try:
        key = load_node_key(site.node_key)
    except DeployError:
        report.note("registration not checked: the node key is unusable (above)")
        return
    try:
        answer = probe_registration(site, key, timeout=timeout)
    except (OSError, http.client.HTTPException) as err:
        report.note(
            f"registration not checked: the Fleet API at {site.superlink} did not answer ({err})"
        )
        return
    if answer.registered is True:
        report.ok(
            f"node key registered at the coordinator (the SuperLink knows {site.directory / NODE_PUB}; "
            "this check does not bring the node online, nor tells whether it is online now)"
        )
    elif answer.registered is False:
        report.fail(not_registered_words(site))
    elif answer.status == 401:
        report.fail(
            f"the SuperLink refused this node's signed request (HTTP 401, {answer.detail}): "
            "every request carries this machine's time, which the SuperLink accepts from "
            "5 s ahead to 5 min behind its own; check this machine's clock (NTP)"
        )
    elif answer.status in (403, 404):
        report.fail(
            f"{site.superlink} does not serve Flower's Fleet API ({ACTIVATE_PATH}: HTTP "
            f"{answer.status}): a proxy in front of the SuperLink must forward /v1/fleet/"
        )
    else:
        report.note(
            f"registration not checked: the SuperLink answered HTTP {answer.status} "
            f"({answer.detail}); `fedsilo site start` will say whether it is"
        )


# ---- site start / stop: the SuperNode as a child, and why it stopped ---------------------

_EXIT_CODE = re.compile(r"Exit Code: (\d+)\s*\n(.*)")
# The line Flower's SuperNode logs while it cannot reach the SuperLink (it retries
# without end unless started with --max-retries; flwr/supercore/retry/http_retry.py).
RETRY_LINE = "Connection attempt failed, retrying"
RETRY_SUCCESS = "Connection successful after"
RETRY_HINT_SECONDS = 15.0
_UNRESOLVED = (
    "Name or service not known",
    "Temporary failure in name resolution",
    "nodename nor servname",
    "No address associated with hostname",
)


def activation_refused(output: str) -> bool:
    """Whether the SuperNode's log ends with the SuperLink refusing to activate it:
    ``[code: 2004] Failed to activate SuperNode.`` (flwr/supernode/
    fleet_http_connection.py), the same words for a key that was never registered and
    for a node the SuperLink still holds as online: only the SuperLink's own log tells
    them apart, or ``probe_registration``."""
    return f"[code: {FLEET_NODE_ACTIVATION_FAILED}]" in plain(output)


def supernode_exit_cause(
    returncode: int,
    output: str,
    site: Site,
    *,
    ca_fingerprint: str,
    registered: bool | None = None,
) -> str | None:
    """Why ``flower-supernode`` stopped, in words, from its exit status and the end of
    its log (Flower exits 1 for every failure; the cause is only in the log), and for a
    refused activation whether the key is registered (``probe_registration``). None
    when nothing went wrong: exit 0, or stopped by the signal we passed on."""
    if returncode == 0:
        return None
    if returncode < 0:
        name = killed_by(returncode)
        if name is None:
            return None
        return (
            f"flower-supernode was killed by {name}: the coordinator holds the node as "
            "online for about a minute more; wait before starting it again"
        )
    text = plain(output)
    # Flower's last word is its exit message ("Exit Code: N", the reason, a help
    # line): read from there, so an older line of a long log (a ClientApp's error)
    # is not taken for the cause.
    last = text.rfind("Exit Code:")
    text = text[last:] if last >= 0 else text
    host, _ = parse_superlink(site.superlink)
    if activation_refused(text):
        if registered is False:
            return not_registered_words(site)
        if registered is True:
            return STILL_ONLINE_WORDS
        return (
            "the SuperLink refused to activate this node: either its key is not registered "
            f"at the coordinator (hand {site.directory / NODE_PUB} to the coordinator) or the "
            "coordinator still holds it as online (wait about a minute); `fedsilo site check "
            "--connect` tells which"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text:
        reason = text.split("certificate verify failed:", 1)[-1].split("\n", 1)[0]
        return certificate_problem(reason, host, site.ca_cert, ca_fingerprint)
    if "[SSL" in text or "SSL/TLS handshake error" in text:
        return (
            f"the TLS handshake with {site.superlink} failed (see Flower's log above): is it "
            "the SuperLink (or its Fleet proxy) that answers at that port?"
        )
    if "Connection refused" in text:
        return nothing_listens_words(site.superlink)
    if any(words in text for words in _UNRESOLVED):
        return unresolved_words(host, "name resolution failed")
    if "timed out" in text.lower():
        return no_answer_words(site.superlink)
    found = _EXIT_CODE.findall(text)
    if found:
        code, first = found[-1]
        return (
            f"flower-supernode exited with status {returncode} (Flower exit code {code}: "
            f"{first.strip()}); its log is above"
        )
    return f"flower-supernode exited with status {returncode}; its log is above"


def supernode_process(site: Site) -> FlowerProcess:
    """The SuperNode of this folder: the only one started with its node key."""
    return FlowerProcess("flower-supernode", str(site.node_key))


def claim_supernode(site: Site) -> PidFile:
    """``DIR/supernode.pid``, or a refusal that names the SuperNode already running."""
    return PidFile.claim(
        site.directory / SUPERNODE_PID,
        supernode_process(site),
        stop_hint=f"stop it with `fedsilo site stop {shlex.quote(str(site.directory))}`",
    )


@dataclass(frozen=True)
class SupernodeExit:
    returncode: int  # the SuperNode's (negative: the signal that ended it)
    cause: str | None  # why it failed, in words; None when it did not


def run_supernode(
    site: Site,
    cmd: list[str],
    env: Mapping[str, str],
    pid_file: PidFile,
    *,
    say: Callable[[str], None] | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> SupernodeExit:
    """Run the SuperNode until it exits; its status and, when it failed, why. A
    refused activation is followed by ``probe_registration`` to tell an unregistered
    key from a node the SuperLink still holds as online."""
    tell = say if say is not None else _to_stderr
    hint = (
        f"fedsilo: the SuperNode has not reached the SuperLink at {site.superlink} for "
        f"{RETRY_HINT_SECONDS:g} s and keeps retrying; `fedsilo site check --connect "
        f"{shlex.quote(str(site.directory))}` tells why"
    )
    timers: list[threading.Timer] = []

    def watch(line: str) -> None:
        # The SuperExec logs the same retry line while its SuperNode shuts down: only a
        # SuperNode still running, still retrying, a while later, gets the hint.
        if RETRY_SUCCESS in line:
            for timer in timers:
                timer.cancel()
            timers.clear()
        elif RETRY_LINE in line and not timers:
            timer = threading.Timer(RETRY_HINT_SECONDS, tell, args=(hint,))
            timer.daemon = True
            timers.append(timer)
            timer.start()

    try:
        done = run_child(cmd, env, pid_file=pid_file, on_line=watch, stdout=stdout, stderr=stderr)
    finally:
        for timer in timers:
            timer.cancel()
    if done.returncode == 0:
        return SupernodeExit(0, None)
    registered: bool | None = None
    if activation_refused(done.tail):
        try:
            registered = probe_registration(
                site, load_node_key(site.node_key), timeout=timeout
            ).registered
        except (OSError, http.client.HTTPException, DeployError):
            registered = None
    try:
        ca_fp = ca_fingerprint_text(load_ca_certificate(site.ca_cert))
    except DeployError:
        ca_fp = "unreadable"
    cause = supernode_exit_cause(
        done.returncode, done.tail, site, ca_fingerprint=ca_fp, registered=registered
    )
    return SupernodeExit(done.returncode, cause)


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def stop_supernode(directory: Path, *, timeout: float = 30.0) -> str:
    """``fedsilo site stop``: SIGTERM to the SuperNode ``supernode.pid`` names (only if
    it is this folder's flower-supernode), then wait until it is gone."""
    site = Site.load(directory)
    stopped = stop_process(
        site.directory / SUPERNODE_PID,
        supernode_process(site),
        timeout=timeout,
        no_file_hint=" (one started another way is stopped that way)",
    )
    if stopped.stale:
        return (
            f"flower-supernode (PID {stopped.pid}) was not running; removed the stale "
            f"{site.directory / SUPERNODE_PID}"
        )
    return (
        f"stopped flower-supernode (PID {stopped.pid}); it told the SuperLink it left, so "
        "it can start again at once"
    )
