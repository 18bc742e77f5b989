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

Private keys are created with mode 0600 and never replaced unless ``--force``.
Nothing here imports flwr: Flower is driven through its own commands.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import ConfigError
from common.messages import SITE_NAME

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "superlink.key"
SERVER_CERT = "superlink.crt"
FLWR_HOME_DIR = "flwr"
SETTINGS_FILE = "coordinator.json"
REGISTRY_FILE = "sites.json"
STATE_DIR = "state"
DATABASE_FILE = "superlink.db"
CONNECTION = "fedsilo"
DEFAULT_PORT = 8000  # flower-superlink's own default: Fleet, Control and Runtime APIs
LOOPBACK_NAMES: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")
CA_DAYS = 3650
SERVER_DAYS = 825
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CURVE = ec.SECP384R1()


class DeployError(ConfigError):
    """A deployment input or step that cannot be used; the message names it.

    A ConfigError, so the ``fedsilo`` command prints it as one ``error:`` line."""


# ---- files ------------------------------------------------------------------------


def write_private(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write a private key with mode 0600 from the start; refuse to replace one
    unless ``force`` (then the old file is removed first, never truncated in place)."""
    if path.exists() or path.is_symlink():
        if not force:
            raise DeployError(f"{path} already exists; refusing to overwrite a private key")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have narrowed it; never widen beyond 0600
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_public(path: Path, data: bytes | str) -> None:
    """A public file (certificate, public key, settings): replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---- certificates -----------------------------------------------------------------


def san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SubjectAltName entries for the given names plus the loopback names, in order,
    without duplicates. An IP literal becomes an IPAddress entry, anything else must
    be a DNS name."""
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    entry: x509.GeneralName
    for raw in [*hosts, *LOOPBACK_NAMES]:
        host = raw.strip()
        if not host:
            raise DeployError("--host: an empty name")
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            name = host.lower().rstrip(".")
            if len(name) > 253 or not all(_DNS_LABEL.fullmatch(p) for p in name.split(".")):
                raise DeployError(f"--host {raw!r}: not a DNS name or an IP address") from None
            key, entry = f"dns:{name}", x509.DNSName(name)
        else:
            key, entry = f"ip:{ip}", x509.IPAddress(ip)
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsilo"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(*, days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign server certificates only (path length 0).
    Extensions are those strict X.509 verification (Python >= 3.13) requires."""
    key = ec.generate_private_key(_CURVE)
    now = _now()
    name = _name("fedsilo federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    *,
    days: int = SERVER_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate, signed by the CA, valid for ``hosts`` and
    loopback (the SuperLink's own ServerApp process connects over 127.0.0.1)."""
    key = ec.generate_private_key(_CURVE)
    now = _now()
    sans = san_entries(hosts)
    first = sans[0].value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(str(first)))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_ca_certificate(path: Path) -> x509.Certificate:
    """A CA certificate that can verify the SuperLink: readable PEM, a CA, in date."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise DeployError(f"{path}: CA certificate not found") from None
    except (OSError, ValueError) as err:
        raise DeployError(f"{path}: not a readable PEM certificate ({err})") from None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise DeployError(f"{path}: not a CA certificate (no basic constraints)") from None
    if not constraints.ca:
        raise DeployError(f"{path}: not a CA certificate (it is an end-entity certificate)")
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise DeployError(
            f"{path}: CA certificate is not valid now "
            f"({cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    return cert


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":")


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


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's processes: our venv's commands first, Flower's files
    (installed apps, CLI config) in ``flwr_home``, no telemetry or run-time installs."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "PATH": with_flower_path(env.get("PATH", "")),
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
    )
    return env


def with_flower_path(path: str) -> str:
    """PATH with this interpreter's bin folder first: the SuperLink and SuperNode start
    ``flower-superexec`` by name, which must be the same installation."""
    bindir = str(Path(sys.executable).parent)
    parts = [p for p in path.split(os.pathsep) if p and p != bindir]
    return os.pathsep.join([bindir, *parts])


def executable(name: str) -> str:
    """A Flower command: the one beside this interpreter (the venv) first, then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` not found (is flwr installed in this environment?)")
    return found


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
    write_private(directory / CA_KEY, _pem_key(ca_key), force=force)
    write_private(directory / SERVER_KEY, _pem_key(key), force=force)
    write_public(directory / CA_CERT, _pem_cert(ca_cert))
    write_public(directory / SERVER_CERT, _pem_cert(cert))
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
    return f"""coordinator ready in {d}
  CA certificate   {d / CA_CERT}  (SHA-256 {fingerprint(load_ca_certificate(d / CA_CERT))[:23]}...)
  SuperLink cert   {d / SERVER_CERT}  (names: {", ".join([*coord.hosts, *LOOPBACK_NAMES])})
  Flower CLI       FLWR_HOME={coord.flwr_home}  (connection '{CONNECTION}' -> {coord.control_address})

next steps
  1. start the SuperLink (TLS, node authentication, persistent database):
       fedsilo coordinator start {shlex.quote(str(d))}
     which runs:
       {cmd}
  2. hand every site {d / CA_CERT} and the address {coord.site_address}
  3. register each site's node key (its node.pub), while the SuperLink runs:
       fedsilo coordinator register node.pub --name SITE --dir {shlex.quote(str(d))}
  4. run the federation from the project folder and watch it:
       export FLWR_HOME={shlex.quote(str(coord.flwr_home))} FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
       flwr run . {CONNECTION} --run-config "num-server-rounds=20" --stream
       flwr ls {CONNECTION}        flwr log RUN_ID {CONNECTION}
  security: port {coord.port} serves the Fleet, Control and Runtime APIs together and the
  Control API has no authentication in Flower 1.42: let sites reach only /v1/fleet/
  (reverse proxy, see docker/), keep the rest on this machine; {CA_KEY} can go offline."""


def start_coordinator(directory: Path, *, bind: str = "0.0.0.0") -> list[str]:
    """Check the folder and return the full SuperLink command (the caller execs it)."""
    coord = Coordinator.load(directory)
    d = coord.directory
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (d / name).is_file():
            raise DeployError(f"{d / name}: missing (run `fedsilo coordinator init` again)")
    load_ca_certificate(d / CA_CERT)
    _check_private_mode(d / SERVER_KEY)
    (d / STATE_DIR).mkdir(mode=0o700, exist_ok=True)
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        raise DeployError(f"--bind {bind!r}: not an IP address") from None
    cmd = superlink_command(coord, host=bind)
    cmd[0] = executable(cmd[0])
    return cmd


def private_mode_problem(path: Path) -> str | None:
    """What is wrong with a private key file's permissions, if anything."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return f"{path}: private key is readable by others (mode {mode:04o}); chmod 600 it"
    return None


def _check_private_mode(path: Path) -> None:
    problem = private_mode_problem(path)
    if problem:
        raise DeployError(problem)


# ---- registering sites ------------------------------------------------------------


def load_node_public_key(path: Path) -> tuple[ec.EllipticCurvePublicKey, str]:
    """A site's node key as Flower's ``supernode register`` takes it: one OpenSSH line,
    a NIST elliptic curve. Returns the key and its SHA-256 fingerprint."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DeployError(f"{path}: public key file not found") from None
    except OSError as err:
        raise DeployError(f"{path}: cannot read the public key ({err.strerror})") from None
    if b"PRIVATE KEY" in data:
        raise DeployError(f"{path}: this is a private key; hand over node.pub, never node.key")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise DeployError(
            f"{path}: not an OpenSSH public key line (expected the site's node.pub)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise DeployError(f"{path}: not a NIST elliptic-curve key (Flower node keys are EC)")
    raw = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Registration:
    name: str
    key_fingerprint: str
    node_id: int | None
    created: bool  # False: it was registered already (idempotent)


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
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=60,
            env=flower_env(coord.flwr_home),
            cwd=coord.directory,
        )
    except subprocess.TimeoutExpired:
        raise DeployError(
            f"`flwr supernode register` got no answer from {coord.control_address} in 60 s"
        ) from None
    payload: dict[str, Any] = {}
    for line in reversed(done.stdout.splitlines()):
        with contextlib.suppress(ValueError):
            candidate = json.loads(line)
            if isinstance(candidate, dict):
                payload = candidate
                break
    if not payload:
        with contextlib.suppress(ValueError):
            candidate = json.loads(done.stdout)
            if isinstance(candidate, dict):
                payload = candidate
    if done.returncode == 0 and payload.get("success") and payload.get("node-id"):
        return int(payload["node-id"]), ""
    message = str(payload.get("error-message") or done.stderr or done.stdout).strip()
    return None, " ".join(message.split())


def register_site(directory: Path, public_key: Path, name: str) -> Registration:
    """Register a site's node key with the SuperLink, once. Registering the same key
    under the same name again is a no-op; a name or key already taken by another
    site is refused."""
    if not SITE_NAME.fullmatch(name):
        raise DeployError(f"--name {name!r}: use 1-64 letters, digits, '.', '_', '-'")
    coord = Coordinator.load(directory)
    _, fp = load_node_public_key(public_key)
    registry = _read_registry(coord)
    known = registry.get(name)
    if known is not None and known.get("key") != fp:
        raise DeployError(
            f"site {name!r} is already registered with another key "
            f"(SHA-256 {str(known.get('key'))[:16]}...); unregister node "
            f"{known.get('node_id')} with `flwr supernode unregister` first"
        )
    for other, entry in registry.items():
        if other != name and entry.get("key") == fp:
            raise DeployError(f"{public_key}: this key is already registered as site {other!r}")
    node_id, error = _flwr_register(coord, public_key.resolve(), name)
    if node_id is None:
        if "already in use" in error.lower():
            if known is None:  # held by the SuperLink, unknown to this folder's sites.json
                raise DeployError(
                    f"{public_key}: the SuperLink already holds this key, but {REGISTRY_FILE} "
                    f"does not name it; find its node with `flwr supernode list` and "
                    "unregister it first"
                )
            # Same key, same name: registering again changes nothing.
            return Registration(name, fp, known.get("node_id"), False)
        raise DeployError(f"registering {name!r} failed: {error or 'no reason given by flwr'}")
    registry[name] = {"key": fp, "node_id": node_id}
    write_public(coord.directory / REGISTRY_FILE, json.dumps(registry, indent=2) + "\n")
    return Registration(name, fp, node_id, True)
