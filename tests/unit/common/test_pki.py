"""Certificates and key files both sides use: SANs, chains, strict TLS, 0600 private
keys never silently replaced, node keys Flower loads, bad keys named."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from common.pki import (
    DeployError,
    load_ca_certificate,
    load_node_public_key,
    write_private,
)
from server import deploy as coordinator
from server.deploy import init_coordinator
from tests.support.deploy_folders import mode, site_folder

# ---- certificates -----------------------------------------------------------------


def test_server_certificate_names_the_hosts_and_loopback_and_chains_to_the_ca(
    coord: coordinator.Coordinator,
) -> None:
    d = coord.directory
    ca = load_ca_certificate(d / "ca.crt")
    cert = x509.load_pem_x509_certificate((d / "superlink.crt").read_bytes())

    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    cert.verify_directly_issued_by(ca)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).critical


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("localhost", True),
        ("coord.example.org", True),
        ("127.0.0.1", True),
        ("other.example.org", False),
    ],
)
def test_tls_handshake_under_strict_verification(
    coord: coordinator.Coordinator, name: str, ok: bool
) -> None:
    # Python >= 3.13 verifies strictly by default (flwr's clients use ssl defaults).
    d = coord.directory
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(d / "superlink.crt", d / "superlink.key")
    client_ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            if ok:
                with client_ctx.wrap_socket(raw, server_hostname=name) as tls:
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
            else:
                with pytest.raises(ssl.SSLCertVerificationError):
                    client_ctx.wrap_socket(raw, server_hostname=name)
        thread.join(timeout=10)


@pytest.mark.parametrize("host", ["exa mple.org", "", "-bad.example.org", "a..b"])
def test_bad_host_names_are_refused_by_name(tmp_path: Path, host: str) -> None:
    with pytest.raises(DeployError, match="--host"):
        init_coordinator(tmp_path / "c", [host])
    assert not (tmp_path / "c").exists()


def test_ca_checks_name_the_problem(tmp_path: Path, coord: coordinator.Coordinator) -> None:
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(DeployError, match=r"junk\.crt: not a readable PEM certificate"):
        load_ca_certificate(tmp_path / "junk.crt")
    with pytest.raises(DeployError, match="not a CA certificate"):
        load_ca_certificate(coord.directory / "superlink.crt")
    with pytest.raises(DeployError, match=r"missing\.crt: CA certificate not found"):
        load_ca_certificate(tmp_path / "missing.crt")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old")])
    old = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2021, 1, 1, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "old.crt").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(DeployError, match="not valid now"):
        load_ca_certificate(tmp_path / "old.crt")


# ---- key files --------------------------------------------------------------------


def test_private_keys_are_0600_and_never_silently_replaced(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = site_folder(tmp_path, coord)
    private = [
        coord.directory / "ca.key",
        coord.directory / "superlink.key",
        site.directory / "node.key",
        site.directory / "state" / "identity.key",
    ]
    assert [mode(p) for p in private] == [0o600] * 4
    assert mode(coord.directory) == 0o700 and mode(site.directory) == 0o700
    ca_before = (coord.directory / "ca.key").read_bytes()

    with pytest.raises(DeployError, match=r"ca\.key already exists"):
        init_coordinator(coord.directory, ["x.example.org"])
    assert (coord.directory / "ca.key").read_bytes() == ca_before
    with pytest.raises(DeployError, match="refusing to overwrite"):
        write_private(site.directory / "node.key", b"x")

    again = init_coordinator(coord.directory, ["x.example.org"], force=True)
    assert (again.directory / "ca.key").read_bytes() != ca_before
    assert mode(again.directory / "ca.key") == 0o600


def test_write_private_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private(tmp_path / "k", b"secret")
    finally:
        os.umask(old)
    assert mode(tmp_path / "k") == 0o600


def test_node_key_is_what_flwr_loads_and_registers(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = site_folder(tmp_path, coord)
    key = serialization.load_ssh_private_key(site.node_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    pub, fingerprint = load_node_public_key(site.directory / "node.pub")
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)


def test_bad_public_keys_are_named(tmp_path: Path, coord: coordinator.Coordinator) -> None:
    site = site_folder(tmp_path, coord)
    with pytest.raises(DeployError, match="this is a private key"):
        load_node_public_key(site.node_key)
    rsa_pub = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    (tmp_path / "rsa.pub").write_bytes(rsa_pub)
    with pytest.raises(DeployError, match="not a NIST elliptic-curve key"):
        load_node_public_key(tmp_path / "rsa.pub")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(DeployError, match="not an OpenSSH public key"):
        load_node_public_key(tmp_path / "junk.pub")
    with pytest.raises(DeployError, match="not found"):
        load_node_public_key(tmp_path / "none.pub")
