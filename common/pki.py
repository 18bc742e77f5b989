"""Keys and certificates that both sides' tooling uses, and the files that hold them.

The federation's CA (``fedsilo coordinator init`` makes it; every site checks the
SuperLink's TLS certificate against it), the SuperLink's certificate, the node keys
sites authenticate with (EC, OpenSSH: what Flower's ``supernode`` commands take), and
how private and public files are written. Neither the coordinator's nor the site's
tooling owns this module: a site never imports the coordinator's code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import ConfigError

CA_CERT = "ca.crt"
LOOPBACK_NAMES: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")
CA_DAYS = 3650
SERVER_DAYS = 825
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
CURVE = ec.SECP384R1()  # the curve Flower's `supernode register` documents


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


def private_mode_problem(path: Path) -> str | None:
    """What is wrong with a private key file's permissions, if anything."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return f"{path}: private key is readable by others (mode {mode:04o}); chmod 600 it"
    return None


def check_private_mode(path: Path) -> None:
    problem = private_mode_problem(path)
    if problem:
        raise DeployError(problem)


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
    key = ec.generate_private_key(CURVE)
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
    key = ec.generate_private_key(CURVE)
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


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_cert(cert: x509.Certificate) -> bytes:
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
    """The certificate's SHA-256 fingerprint, all 32 bytes, as ``AB:CD:...``: what
    ``openssl x509 -noout -fingerprint -sha256`` prints. The coordinator and every site
    print the CA's in this one form, so a person can compare the two."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def ca_fingerprint_text(cert: x509.Certificate) -> str:
    """``SHA-256 AB:CD:...``: how both sides name the federation CA."""
    return f"SHA-256 {fingerprint(cert)}"


# ---- node keys ----------------------------------------------------------------------


def openssh_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def new_node_key() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return private, openssh_public(key)


def load_node_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The SuperNode's key as ``flower-supernode`` loads it (OpenSSH, EC)."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise DeployError(f"{path}: node key not found (run `fedsilo site init`)") from None
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise DeployError(f"{path}: not a readable OpenSSH private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"{path}: not an elliptic-curve key (Flower node keys are EC)")
    return key


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
