"""Coordinator tooling for Flower's Deployment Engine: a CA, the SuperLink's TLS
certificate, the Flower CLI connection, the exact SuperLink command, and site
registration (node authentication).

What it writes into the coordinator folder ``DIR``:

| file | what |
|---|---|
| ``ca.key`` (0600), ``ca.crt`` | the federation's CA; ``ca.crt`` goes to every site |
| ``superlink.key`` (0600), ``superlink.crt`` | the SuperLink's TLS key and certificate (SANs: the given names, 127.0.0.1, ::1, localhost) |
| ``flwr/config.toml`` | the Flower CLI connection ``fedsilo`` (``FLWR_HOME=DIR/flwr``) |
| ``coordinator.json`` | names, port, connection name: what the other commands read |
| ``state/superlink.db`` | the SuperLink's persistent database (created by the SuperLink) |
| ``sites.json`` | the site keys registered through this folder |
| ``superlink.pid`` | the running SuperLink's PID (``coordinator start`` keeps it, ``stop`` reads it) |
| ``runs/<timestamp>/`` | each run's outputs (``summary.json``: what ``coordinator status`` reads) |

Private keys are created with mode 0600 and never replaced unless ``--force``
(common/pki.py makes and writes them). Nothing here imports flwr: Flower is driven
through its own commands (common/flower_cli.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import tomli_w

from common.flower_cli import (
    FLWR_HOME_DIR,
    FlowerProcess,
    PidFile,
    executable,
    flower_env,
    killed_by,
    plain,
    process_args,
    read_pid,
    run_child,
    stop_process,
)
from common.messages import SITE_NAME
from common.outputs import RunOutputError, RunSummary, SiteSummary, read_summary
from common.pki import (
    CA_CERT,
    LOOPBACK_NAMES,
    DeployError,
    ca_fingerprint_text,
    check_private_mode,
    load_ca_certificate,
    load_node_public_key,
    make_ca,
    make_server_cert,
    pem_cert,
    pem_key,
    san_entries,
    write_private,
    write_public,
)
from common.privacy.errors import LedgerError
from common.privacy.identity import key_fingerprint, load_public_key

CA_KEY = "ca.key"
SERVER_KEY = "superlink.key"
SERVER_CERT = "superlink.crt"
SETTINGS_FILE = "coordinator.json"
REGISTRY_FILE = "sites.json"
STATE_DIR = "state"
DATABASE_FILE = "superlink.db"
SUPERLINK_PID = "superlink.pid"
RUNS_DIR = "runs"  # where the ServerApp writes runs without an out-dir (cwd: the folder)
CONNECTION = "fedsilo"
DEFAULT_PORT = 8000  # flower-superlink's own default: Fleet, Control and Runtime APIs


# ---- coordinator folder -----------------------------------------------------------


@dataclass(frozen=True)
class Coordinator:
    """What ``coordinator.json`` records: where the SuperLink listens and for whom."""

    directory: Path
    hosts: tuple[str, ...]
    port: int

    @property
    def flwr_home(self) -> Path:
        return self.directory / FLWR_HOME_DIR

    @property
    def site_address(self) -> str:
        host = self.hosts[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def control_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def load(cls, directory: Path) -> Coordinator:
        path = directory / SETTINGS_FILE
        try:
            raw = json.loads(path.read_text())
            return cls(directory.resolve(), tuple(raw["hosts"]), int(raw["port"]))
        except FileNotFoundError:
            raise DeployError(
                f"{directory}: not a coordinator folder (no {SETTINGS_FILE}; "
                "run `fedsilo coordinator init` first)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DeployError(f"{path}: unreadable coordinator settings ({err})") from None


def flwr_config_toml(coord: Coordinator) -> str:
    """``$FLWR_HOME/config.toml`` for the operator's Flower CLI: the connection named
    ``fedsilo`` (the default), over TLS checked against the federation CA."""
    connection = {
        "address": coord.control_address,
        "root-certificates": str(coord.directory / CA_CERT),
    }
    return (
        "# Flower CLI connection to this coordinator's SuperLink (written by fedsilo).\n"
        "# Use it with FLWR_HOME set to this folder.\n"
        + tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})
    )


def superlink_command(coord: Coordinator, *, host: str = "0.0.0.0") -> list[str]:
    """The exact SuperLink command: TLS, node authentication, persistent database,
    no dependency installation at run time (the image or venv already has them)."""
    d = coord.directory
    return [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(d / CA_CERT),
        "--ssl-certfile",
        str(d / SERVER_CERT),
        "--ssl-keyfile",
        str(d / SERVER_KEY),
        "--enable-supernode-auth",
        "--database",
        str(d / STATE_DIR / DATABASE_FILE),
        "--host",
        host,
        "--port",
        str(coord.port),
        "--disable-runtime-dependency-installation",
    ]


def init_coordinator(
    directory: Path,
    hosts: Sequence[str],
    *,
    port: int = DEFAULT_PORT,
    force: bool = False,
) -> Coordinator:
    """Create the CA, the SuperLink certificate and the Flower CLI connection."""
    if not hosts:
        raise DeployError("give at least one --host: the name or address sites will use")
    if not 0 < port < 65536:
        raise DeployError(f"--port {port}: not a TCP port")
    san_entries(hosts)  # validate every name before writing anything
    directory = directory.resolve()
    existing = [directory / n for n in (CA_KEY, SERVER_KEY) if (directory / n).exists()]
    if existing and not force:
        raise DeployError(
            f"{existing[0]} already exists; refusing to overwrite a private key "
            "(use --force to make a new CA: every site then needs the new ca.crt)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    (directory / STATE_DIR).mkdir(mode=0o700, exist_ok=True)
    ca_key, ca_cert = make_ca()
    key, cert = make_server_cert(ca_key, ca_cert, hosts)
    write_private(directory / CA_KEY, pem_key(ca_key), force=force)
    write_private(directory / SERVER_KEY, pem_key(key), force=force)
    write_public(directory / CA_CERT, pem_cert(ca_cert))
    write_public(directory / SERVER_CERT, pem_cert(cert))
    coord = Coordinator(directory, tuple(h.strip() for h in hosts), port)
    write_public(
        directory / SETTINGS_FILE,
        json.dumps({"hosts": list(coord.hosts), "port": port, "connection": CONNECTION}, indent=2)
        + "\n",
    )
    write_public(coord.flwr_home / "config.toml", flwr_config_toml(coord))
    return coord


def next_steps(coord: Coordinator) -> str:
    d = coord.directory
    cmd = shlex.join(superlink_command(coord))
    ca = ca_fingerprint_text(load_ca_certificate(d / CA_CERT))
    return f"""coordinator ready in {d}
  CA certificate   {d / CA_CERT}
                   {ca}
  SuperLink cert   {d / SERVER_CERT}  (names: {", ".join(dict.fromkeys([*coord.hosts, *LOOPBACK_NAMES]))})
  Flower CLI       FLWR_HOME={coord.flwr_home}  (connection '{CONNECTION}' -> {coord.control_address})

next steps
  1. start the SuperLink (TLS, node authentication, persistent database):
       fedsilo coordinator start {shlex.quote(str(d))}
     which runs, its PID in {d / SUPERLINK_PID} (`fedsilo coordinator stop` stops it):
       {cmd}
  2. hand every site {d / CA_CERT} and the address {coord.site_address}; tell them the CA's
     fingerprint above over another channel (a call): `fedsilo site init` and
     `fedsilo site check` print it in the same form, to compare
  3. register each site's node key (its node.pub) and ledger key (its state/identity.pub,
     which auditors compare), while the SuperLink runs:
       fedsilo coordinator register node.pub --name SITE --ledger-key identity.pub --dir {shlex.quote(str(d))}
  4. run the federation from the project folder (a rehearsal on public stand-in data
     first: it spends nothing) and watch it:
       export FLWR_HOME={shlex.quote(str(coord.flwr_home))} FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
       flwr run . {CONNECTION} --run-config "rehearsal=true num-server-rounds=1" --stream
       flwr run . {CONNECTION} --run-config "num-server-rounds=20" --stream
       flwr ls {CONNECTION}        flwr log RUN_ID {CONNECTION}
     and the sites (online, budget left): fedsilo coordinator status --dir {shlex.quote(str(d))}
  security: port {coord.port} serves the Fleet, Control and Runtime APIs together and the
  Control API has no authentication in Flower 1.42: let sites reach only /v1/fleet/
  (reverse proxy, see docker/), keep the rest on this machine; {CA_KEY} can go offline."""


def start_coordinator(directory: Path, *, bind: str = "0.0.0.0") -> list[str]:
    """Check the folder and return the full SuperLink command (``run_superlink`` runs it)."""
    coord = Coordinator.load(directory)
    d = coord.directory
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (d / name).is_file():
            raise DeployError(f"{d / name}: missing (run `fedsilo coordinator init` again)")
    load_ca_certificate(d / CA_CERT)
    check_private_mode(d / SERVER_KEY)
    (d / STATE_DIR).mkdir(mode=0o700, exist_ok=True)
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        raise DeployError(f"--bind {bind!r}: not an IP address") from None
    cmd = superlink_command(coord, host=bind)
    cmd[0] = executable(cmd[0])
    return cmd


# ---- registering sites ------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    name: str
    key_fingerprint: str
    node_id: int | None
    created: bool  # False: it was registered already (idempotent)
    ledger_key: str | None = None  # "sha256:..." of the site's ledger key, if recorded
    ledger_key_added: bool = False  # True: recorded now for an already registered site


def _ledger_key_fingerprint(path: Path) -> str:
    """``sha256:<hex>`` of a site's ledger key (its ``identity.pub``)."""
    try:
        return key_fingerprint(load_public_key(path))
    except LedgerError as err:
        raise DeployError(f"--ledger-key {err}") from None


def _read_registry(coord: Coordinator) -> dict[str, dict[str, Any]]:
    path = coord.directory / REGISTRY_FILE
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DeployError(f"{path}: unreadable site registry ({err})") from None
    if not isinstance(raw, dict):
        raise DeployError(f"{path}: unreadable site registry (not a JSON object)")
    return raw


def _flwr_register(coord: Coordinator, key_path: Path, name: str) -> tuple[int | None, str]:
    """``flwr supernode register``; returns (node id, None) or (None, Flower's error)."""
    cmd = [
        executable("flwr"),
        "supernode",
        "register",
        str(key_path),
        CONNECTION,
        "--name",
        name,
        "--format",
        "json",
    ]
    try:
        done = _flwr(coord, cmd)
    except subprocess.TimeoutExpired:
        raise DeployError(
            f"`flwr supernode register` got no answer from {coord.control_address} in 60 s"
        ) from None
    payload = json_object(done.stdout)
    if done.returncode == 0 and payload.get("success") and payload.get("node-id"):
        return int(payload["node-id"]), ""
    message = str(payload.get("error-message") or done.stderr or done.stdout).strip()
    return None, " ".join(message.split())


def register_site(
    directory: Path, public_key: Path, name: str, *, ledger_key: Path | None = None
) -> Registration:
    """Register a site's node key with the SuperLink, once, and with ``ledger_key`` (the
    site's ``identity.pub``) record the fingerprint of the key that signs its privacy
    ledger in ``sites.json`` (``fedsilo audit verify --sites`` checks ledgers against
    it). Registering the same values again is a no-op; a name, node key or ledger key
    already taken by another site, or another ledger key for a registered site, is
    refused."""
    if not SITE_NAME.fullmatch(name):
        raise DeployError(f"--name {name!r}: use 1-64 letters, digits, '.', '_', '-'")
    coord = Coordinator.load(directory)
    _, fp = load_node_public_key(public_key)
    ledger_fp = _ledger_key_fingerprint(ledger_key) if ledger_key is not None else None
    registry = _read_registry(coord)
    known = registry.get(name)
    if known is not None and known.get("key") != fp:
        raise DeployError(
            f"site {name!r} is already registered with another key "
            f"(SHA-256 {str(known.get('key'))[:16]}...); unregister node "
            f"{known.get('node_id')} with `flwr supernode unregister` first"
        )
    recorded = known.get("ledger_key") if known is not None else None
    if ledger_fp is not None and recorded is not None and recorded != ledger_fp:
        raise DeployError(
            f"site {name!r} is already registered with another ledger key "
            f"({str(recorded)[:23]}...); a site's ledger key is never replaced (a new key "
            "would start a new ledger, a fresh privacy budget)"
        )
    for other, entry in registry.items():
        if other != name and entry.get("key") == fp:
            raise DeployError(f"{public_key}: this key is already registered as site {other!r}")
        if other != name and ledger_fp is not None and entry.get("ledger_key") == ledger_fp:
            raise DeployError(
                f"{ledger_key}: this ledger key is already registered as site {other!r}"
            )
    if known is not None:
        # Registered through this folder with this key: if the SuperLink still holds the
        # node, registering again would only make it log an error ("already in use").
        nodes, _ = _flwr_node_list(coord)
        if nodes is not None and nodes.get(int(known.get("node_id") or 0)) in HELD_STATES:
            return _again(coord, registry, name, fp, known, ledger_fp, recorded)
    node_id, error = _flwr_register(coord, public_key.resolve(), name)
    if node_id is None:
        if "already in use" in error.lower():
            if known is None:  # held by the SuperLink, unknown to this folder's sites.json
                raise DeployError(
                    f"{public_key}: the SuperLink already holds this key, but {REGISTRY_FILE} "
                    f"does not name it; find its node with `flwr supernode list` and "
                    "unregister it first"
                )
            return _again(coord, registry, name, fp, known, ledger_fp, recorded)
        raise DeployError(f"registering {name!r} failed: {error or 'no reason given by flwr'}")
    record: dict[str, Any] = {"key": fp, "node_id": node_id}
    kept = ledger_fp or (str(recorded) if recorded is not None else None)
    if kept is not None:
        record["ledger_key"] = kept
    registry[name] = record
    _write_registry(coord, registry)
    return Registration(name, fp, node_id, True, ledger_key=kept)


# The states in which the SuperLink holds a registered node key.
HELD_STATES = ("registered", "online", "offline")


def _again(
    coord: Coordinator,
    registry: dict[str, dict[str, Any]],
    name: str,
    fp: str,
    known: dict[str, Any],
    ledger_fp: str | None,
    recorded: object,
) -> Registration:
    """Same key, same name: registering again changes nothing, but a ledger key given
    for the first time is recorded."""
    added = ledger_fp is not None and recorded is None
    if added:
        registry[name] = {**known, "ledger_key": ledger_fp}
        _write_registry(coord, registry)
    return Registration(
        name,
        fp,
        known.get("node_id"),
        False,
        ledger_key=ledger_fp or (str(recorded) if recorded is not None else None),
        ledger_key_added=added,
    )


def _write_registry(coord: Coordinator, registry: dict[str, dict[str, Any]]) -> None:
    write_public(coord.directory / REGISTRY_FILE, json.dumps(registry, indent=2) + "\n")


def json_object(text: str) -> dict[str, Any]:
    """The JSON object ``flwr ... --format json`` printed: the whole output, one line of
    it, or (Flower pretty-prints) an object that starts a line; {} when there is none."""
    with contextlib.suppress(ValueError):
        whole = json.loads(text)
        if isinstance(whole, dict):
            return whole
    lines = text.splitlines()
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            candidate = json.loads(line)
            if isinstance(candidate, dict):
                return candidate
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"(?m)^\s*\{", text)]
    for start in reversed(starts):
        with contextlib.suppress(ValueError):
            candidate, _ = decoder.raw_decode(text, text.index("{", start))
            if isinstance(candidate, dict):
                return candidate
    return {}


# ---- start / stop: the SuperLink as a child of `coordinator start` -----------------


def superlink_process(coord: Coordinator) -> FlowerProcess:
    """This folder's SuperLink: the only one started with its database."""
    return FlowerProcess("flower-superlink", str(coord.directory / STATE_DIR / DATABASE_FILE))


def claim_superlink(coord: Coordinator) -> PidFile:
    """``DIR/superlink.pid``, or a refusal that names the SuperLink already running."""
    return PidFile.claim(
        coord.directory / SUPERLINK_PID,
        superlink_process(coord),
        stop_hint=(f"stop it with `fedsilo coordinator stop {shlex.quote(str(coord.directory))}`"),
    )


def superlink_exit_cause(returncode: int, output: str, coord: Coordinator) -> str | None:
    """Why ``flower-superlink`` stopped, in words (Flower exits 1 for every failure);
    None when nothing went wrong: exit 0, or stopped by the signal we passed on."""
    if returncode == 0:
        return None
    if returncode < 0:
        name = killed_by(returncode)
        return None if name is None else f"flower-superlink was killed by {name}"
    text = plain(output)
    for line in reversed(text.splitlines()):
        if "address already in use" in line.lower():
            said = re.search(r"\[Errno \d+\].*", line)
            return (
                f"a port the SuperLink needs is taken ({(said.group(0) if said else line).strip()}): "
                "another SuperLink or program listens there (`ss -ltnp` names it); stop it "
                "first"
            )
    found = re.findall(r"Exit Code: (\d+)\s*\n(.*)", text)
    if found:
        code, first = found[-1]
        return (
            f"flower-superlink exited with status {returncode} (Flower exit code {code}: "
            f"{first.strip()}); its log is above"
        )
    return f"flower-superlink exited with status {returncode}; its log is above"


@dataclass(frozen=True)
class SuperlinkExit:
    returncode: int  # the SuperLink's (negative: the signal that ended it)
    cause: str | None


def run_superlink(
    coord: Coordinator,
    cmd: list[str],
    pid_file: PidFile,
    *,
    env: Mapping[str, str] | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> SuperlinkExit:
    """Run the SuperLink in the coordinator folder (runs land in ``DIR/runs/``) until it
    exits; its output passes through, SIGTERM/SIGINT are passed on."""
    done = run_child(
        cmd,
        flower_env(coord.flwr_home, env),
        pid_file=pid_file,
        cwd=coord.directory,
        stdout=stdout,
        stderr=stderr,
    )
    return SuperlinkExit(done.returncode, superlink_exit_cause(done.returncode, done.tail, coord))


def stop_coordinator(directory: Path, *, timeout: float = 30.0) -> str:
    """``fedsilo coordinator stop``: SIGTERM to the SuperLink ``superlink.pid`` names
    (only if it is this folder's flower-superlink), then wait until it is gone."""
    coord = Coordinator.load(directory)
    path = coord.directory / SUPERLINK_PID
    stopped = stop_process(
        path,
        superlink_process(coord),
        timeout=timeout,
        no_file_hint=" (one started another way is stopped that way)",
    )
    if stopped.stale:
        return f"flower-superlink (PID {stopped.pid}) was not running; removed the stale {path}"
    return f"stopped flower-superlink (PID {stopped.pid})"


# ---- status: the registered sites, online or not, and their budgets ----------------

# A node's status as `flwr supernode list` reports it (flwr/cli/supernode/ls.py), in
# the words `coordinator status` prints.
NODE_STATES = {
    "online": "online",
    "offline": "offline",
    "registered": "offline (never connected)",
    "unregistered": "unregistered at the SuperLink",
}


def flwr_reason(message: str) -> str:
    """flwr's error message in one line, without its chatter ("Using SuperLink: ...",
    "Listing all nodes...")."""
    text = " ".join(message.split())
    if "Connection to the SuperLink is unavailable" in text:
        return "nothing answers there"
    for chatter in ("Listing all nodes...",):
        text = text.split(chatter, 1)[-1].strip()
    return text or "flwr reported a failure"


def parse_node_list(stdout: str) -> dict[int, str]:
    """Node id -> status from ``flwr supernode list --format json``: ``{"success": true,
    "nodes": [{"node-id": "123", "status": "online", ...}]}`` (node ids as strings).
    Raises ValueError with flwr's own message when it failed."""
    payload = json_object(stdout)
    if not payload:
        raise ValueError("flwr printed no JSON")
    if payload.get("success") is not True:
        raise ValueError(flwr_reason(str(payload.get("error-message") or "")))
    nodes = payload.get("nodes")
    if not isinstance(nodes, list):
        raise ValueError("flwr's answer has no node list")
    out: dict[int, str] = {}
    for node in nodes:
        if isinstance(node, dict) and str(node.get("node-id", "")).isdigit():
            out[int(node["node-id"])] = str(node.get("status", "unknown"))
    return out


def latest_site_rows(
    summaries: Sequence[tuple[str, RunSummary]],
) -> dict[str, tuple[str, SiteSummary]]:
    """Per site, the run folder and its row in the newest summary that names it
    (``summaries`` newest first); a run still going (its summary is rewritten after
    every round) is named so."""
    rows: dict[str, tuple[str, SiteSummary]] = {}
    for folder, summary in summaries:
        label = folder if getattr(summary, "complete", True) else f"{folder} (in progress)"
        for row in summary.sites:
            rows.setdefault(row.site, (label, row))
    return rows


def budget_words(seen: tuple[str, SiteSummary] | None) -> str:
    """A site's budget as its last run reported it (the site's own declaration: its
    signed ledger is the proof)."""
    if seen is None:
        return "no run yet"
    folder, row = seen
    head = f", ledger head {row.ledger_head[:12]}" if row.ledger_head else ""
    if row.lifetime_epsilon is None or row.budget is None:
        return f"no budget reported in run {folder} (no DP, or an older fedsilo){head}"
    left = max(0.0, row.budget - row.lifetime_epsilon)
    return (
        f"spent {row.lifetime_epsilon:.3f} of {row.budget:g} (left {left:.3f}) as of run "
        f"{folder}{head}"
    )


def status_lines(
    coord: Coordinator,
    registry: Mapping[str, Mapping[str, Any]],
    nodes: dict[int, str] | None,
    nodes_error: str,
    rows: Mapping[str, tuple[str, SiteSummary]],
    *,
    running_pid: int | None = None,
    skipped: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """What ``coordinator status`` prints: the SuperLink, then every site registered in
    ``sites.json`` with its node id, online or not, and its budget."""
    d = coord.directory
    pid = f" (PID {running_pid})" if running_pid is not None else ""
    if nodes is None:
        lines = [
            f"SuperLink {coord.control_address}{pid}: not answering ({nodes_error}); "
            + (
                "is it stuck?"
                if running_pid is not None
                else f"start it with `fedsilo coordinator start {shlex.quote(str(d))}`"
            )
            + "; online status unknown"
        ]
    else:
        registered_ids = {e.get("node_id") for e in registry.values()}
        online = sum(1 for n in registered_ids if isinstance(n, int) and nodes.get(n) == "online")
        lines = [
            f"SuperLink {coord.control_address}{pid}: running; {online} of {len(registry)} "
            "registered sites online"
        ]
    if not registry:
        lines.append(
            f"no site registered in {d / REGISTRY_FILE} yet: `fedsilo coordinator register "
            f"node.pub --name SITE --dir {shlex.quote(str(d))}`"
        )
    width = max((len(name) for name in registry), default=0)
    ids = {name: str(entry.get("node_id", "?")) for name, entry in registry.items()}
    id_width = max((len(i) for i in ids.values()), default=0)
    for name in sorted(registry):
        node_id = registry[name].get("node_id")
        if nodes is None:
            state = "status unknown"
        elif not isinstance(node_id, int):
            state = "no node id in sites.json"
        else:
            status = nodes.get(node_id)
            state = (
                "not at the SuperLink (its database was replaced?)"
                if status is None
                else NODE_STATES.get(status, status)
            )
        lines.append(
            f"  {name:<{width}}  node {ids[name]:<{id_width}}  {state:<25}  "
            f"{budget_words(rows.get(name))}"
        )
    if nodes is not None:
        known = {e.get("node_id") for e in registry.values()}
        for node_id, status in sorted(nodes.items()):
            if node_id not in known and status != "unregistered":
                lines.append(
                    f"  node {node_id} is at the SuperLink ({NODE_STATES.get(status, status)}) "
                    f"but not in {REGISTRY_FILE}"
                )
    lines.extend(f"note: {path} skipped ({why})" for path, why in skipped)
    return lines


def _flwr(coord: Coordinator, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """A ``flwr`` command against this coordinator's SuperLink (its Flower CLI
    connection), with 60 s to answer (``TimeoutExpired`` beyond)."""
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=60,
        env=flower_env(coord.flwr_home),
        cwd=coord.directory,
    )


def _flwr_node_list(coord: Coordinator) -> tuple[dict[int, str] | None, str]:
    """``flwr supernode list``; (node id -> status, "") or (None, why not)."""
    cmd = [executable("flwr"), "supernode", "list", CONNECTION, "--format", "json"]
    try:
        done = _flwr(coord, cmd)
    except subprocess.TimeoutExpired:
        return None, "no answer in 60 s"
    try:
        return parse_node_list(done.stdout), ""
    except ValueError as err:
        reason = str(err) if str(err) else (done.stderr.strip() or "flwr failed")
        return None, " ".join(reason.split())


def _summaries(coord: Coordinator) -> tuple[list[tuple[str, RunSummary]], list[tuple[str, str]]]:
    """The runs' summaries, newest first, and those that could not be read."""
    found: list[tuple[float, str, Path]] = []
    for path in (coord.directory / RUNS_DIR).glob("*/summary.json"):
        with contextlib.suppress(OSError):
            found.append((path.stat().st_mtime, path.parent.name, path))
    read: list[tuple[str, RunSummary]] = []
    skipped: list[tuple[str, str]] = []
    for _, folder, path in sorted(found, reverse=True):
        try:
            read.append((folder, read_summary(path)))
        except RunOutputError as err:
            skipped.append((str(path), str(err).removeprefix(f"{path}: ")))
    return read, skipped


def coordinator_status(directory: Path) -> list[str]:
    """``fedsilo coordinator status``: the sites of ``sites.json``, online or not (from
    the running SuperLink), and their budgets (from the newest run that names each)."""
    coord = Coordinator.load(directory)
    registry = _read_registry(coord)
    pid = read_pid(coord.directory / SUPERLINK_PID)
    args = process_args(pid) if pid is not None else None
    running = pid if args is not None and superlink_process(coord).matches(args) else None
    nodes, error = _flwr_node_list(coord)
    summaries, skipped = _summaries(coord)
    return status_lines(
        coord,
        registry,
        nodes,
        error,
        latest_site_rows(summaries),
        running_pid=running,
        skipped=skipped,
    )
