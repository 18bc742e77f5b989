"""A site's tooling: init (keys kept on --force), the node config read back through
Flower into the ClientApp's settings, the SuperNode's flags, and site check."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from flwr.common.config import parse_config_args

from client.deploy import (
    Site,
    check_site,
    init_site,
    init_summary,
    node_config_toml,
    render_node_config,
    supernode_command,
)
from client.settings import SiteSettings
from common.config import RunConfig
from common.pki import (
    DeployError,
)
from server import deploy as coordinator
from server.deploy import superlink_command
from tests.support.deploy_folders import BIN, make_site_data, site_folder, with_roster

# ---- site init ---------------------------------------------------------------------


def test_site_init_again_refuses_and_force_keeps_the_keys(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = site_folder(tmp_path, coord)
    keys = {p: p.read_bytes() for p in (site.node_key, site.directory / "state" / "identity.key")}

    with pytest.raises(DeployError, match="already holds a site; use --force"):
        site_folder(tmp_path, coord)
    changed = site_folder(tmp_path, coord, epsilon=3.0, force=True)

    assert changed.node_config["epsilon"] == 3.0
    assert Site.load(site.directory).node_config["epsilon"] == 3.0
    assert {p: p.read_bytes() for p in keys} == keys


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
        data_size=1200,
        disjoint_data_set="notes-2025",
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
    assert (settings.declared_size, settings.disjoint_data_set) == (1200, "notes-2025")
    assert not settings.allow_no_dp


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"epsilon": 0.0}, "epsilon budget must be positive"),
        ({"epsilon": float("nan")}, "finite"),
        ({"delta": 1.0}, "delta must be in"),
        ({"site_id": "bad name"}, "site-id 'bad name'"),
        ({"text_column": "label"}, "must differ"),
        ({"data_size": 0}, "'data-size' must be a whole number"),
        ({"disjoint_data_set": "a b"}, "'disjoint-data-set'"),
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
        "data_size": 100,
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
        "data": make_site_data(tmp_path / "d.csv"),
        "ca": coord.directory / "ca.crt",
        "superlink": "h:1",
    }
    args.update(kw)
    with pytest.raises(DeployError, match=re.escape(match)):
        init_site(tmp_path / "site", **args)
    assert not (tmp_path / "site" / "node.key").exists()


def test_site_start_flags(tmp_path: Path, coord: coordinator.Coordinator) -> None:
    site = site_folder(tmp_path, coord)
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
    site = site_folder(tmp_path, coord)
    ours_node = {a for a in supernode_command(site, port=1) if a.startswith("--")}
    ours_link = {a for a in superlink_command(coord) if a.startswith("--")}
    assert ours_node <= _flags_of("flower-supernode")
    assert ours_link <= _flags_of("flower-superlink")


# ---- site check -------------------------------------------------------------------


def test_site_check_prints_counts_only(tmp_path: Path, coord: coordinator.Coordinator) -> None:
    site = site_folder(tmp_path, coord)
    with_roster(tmp_path, site)

    report = check_site(site.directory)

    assert report.problems == []
    text = "\n".join(report.lines)
    assert "20 rows, 0 rejected (rotten: 7, fresh: 13)" in text
    assert "0 entries" in text
    assert "ok    roster " in text
    assert "SECRET" not in text


def test_site_check_states_the_lifetime_spend_the_clientapp_enforces(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    # Entries on two different data files (and at another delta): the check composes
    # both under the adaptive filter at the site's delta, as the ClientApp does.
    from client.settings import SiteSettings
    from common.config import RunConfig
    from common.privacy.accounting import filter_epsilon
    from common.privacy.events import SubsampledGaussianEvent
    from common.privacy.identity import open_state
    from common.privacy.ledger import LEDGER_FILE, Ledger

    site = site_folder(tmp_path, coord)
    settings = SiteSettings.from_node_config(site.node_config, RunConfig())
    assert settings.state_dir is not None
    event = SubsampledGaussianEvent(1.0, 0.5, 10)
    ledger = Ledger(settings.state_dir / LEDGER_FILE, open_state(settings.state_dir).identity)
    for run, dataset in (("r1", "a" * 64), ("r2", "b" * 64)):
        ledger.append(
            site_id="site-a",
            dataset=dataset,
            run_id=run,
            round=1,
            event=event,
            clip_norm=1.0,
            delta=0.1,
            rounds=1,
            public_size=20,
            epsilon_target=1.0,
            epsilon_run=1.0,
            epsilon_lifetime=filter_epsilon([event] * 2, 0.1),
            budget=settings.epsilon,
            code_version="test",
        )

    text = "\n".join(check_site(site.directory).lines)

    enforced = filter_epsilon([event, event], settings.delta)
    assert f"lifetime epsilon spent {enforced:.3f} of 8 (site, adaptive filter)" in text


def test_init_declares_the_files_size_public_and_check_holds_the_file_to_it(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = site_folder(tmp_path, coord)  # 20 rows
    assert site.node_config["data-size"] == 20
    assert "public size   20 examples" in init_summary(site)
    small = site_folder(tmp_path, coord, name="site-b", data_size=10)
    problems = check_site(small.directory).problems
    assert any("more than the declared public size 10" in p for p in problems)


def test_site_check_names_bad_data_and_loose_keys(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    data = make_site_data(tmp_path / "d.csv")
    site = site_folder(tmp_path, coord, data=data)
    data.write_text(data.read_text() + ",fresh\n")  # an empty text on line 22
    site.node_key.chmod(0o644)

    report = check_site(site.directory)

    assert any("d.csv line 22: empty text" in p for p in report.problems)
    assert any("readable by others (mode 0644)" in p for p in report.problems)
    assert "SECRET" not in "\n".join(report.lines)


def test_site_check_refuses_a_delta_not_below_one_over_n(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = site_folder(tmp_path, coord, data=make_site_data(tmp_path / "d.csv", rows=5), delta=0.5)
    report = check_site(site.directory)
    assert any("delta 0.5 is not below 1/n" in p for p in report.problems)


def test_site_check_of_a_missing_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="run `fedsilo site init` first"):
        check_site(tmp_path / "nothing")


# ---- site init / coordinator init: one CA fingerprint, printed alike ----------------


def test_both_sides_print_the_cas_full_fingerprint_in_one_form_and_init_promises_no_check(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    from common.pki import fingerprint, load_ca_certificate
    from server.deploy import next_steps

    site = site_folder(tmp_path, coord)
    full = fingerprint(load_ca_certificate(coord.directory / "ca.crt"))
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", full)  # all 32 bytes, as openssl

    summary = init_summary(site)

    assert f"SHA-256 {full}" in next_steps(coord)
    assert f"(CA SHA-256 {full}); `fedsilo site check --connect` tries it" in summary
    assert "TLS will be checked against" in summary and "TLS checked against" not in summary
    assert f"SHA-256 {full}" in "\n".join(check_site(site.directory).lines)


# ---- site check --connect -------------------------------------------------------------


def _flower_answer(code: int) -> tuple[int, bytes]:
    """The HTTP status and body Flower's SuperLink sends for an API error code
    (flwr/supercore/error/http.py: the catalog's status and public message)."""
    import json

    from flwr.supercore.error import FlowerError
    from flwr.supercore.error.catalog import API_ERROR_MAP

    spec = API_ERROR_MAP[code]
    body = FlowerError(code, "internal").to_json(spec.public_message)
    return int(spec.http_status_code), json.dumps(body).encode()


class FleetStub:
    """A TLS server with a coordinator's SuperLink certificate whose one route answers
    a SuperNode's activation as Flower 1.42's own handler does: the request parsed,
    its signature verified and the answer given by Flower's code
    (``fleet_handlers.activate_node`` on an in-memory LinkState)."""

    def __init__(self, directory: Path, registered: list[bytes]) -> None:
        import ssl

        from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
        from flwr.server.superlink.linkstate import InMemoryLinkState
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.superlink.federation import NoOpFederationManager

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(directory / "superlink.crt", directory / "superlink.key")
        self.state = InMemoryLinkState(NoOpFederationManager(), ObjectStoreFactory().store())
        self.nodes = [
            self.state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, pem, 0) for pem in registered
        ]
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FleetStub:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.listener.close()

    def statuses(self) -> list[str]:
        return [str(n.status) for n in self.state.get_node_info(node_ids=self.nodes)]

    def _serve(self) -> None:
        import ssl

        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(5)
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    self._answer(conn)
            except (ssl.SSLError, OSError):
                continue  # a refused handshake: the client says why

    def _answer(self, conn: Any) -> None:
        import base64

        from flwr.proto.fleet_pb2 import ActivateNodeRequest
        from flwr.supercore.error import FlowerError
        from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
        from flwr.superlink.servicer.fleet.fleet_handlers import activate_node

        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += conn.recv(65536)
        self.seen.append((lines[0], headers, body))
        request = ActivateNodeRequest.FromString(body)
        public = base64.b64decode(headers["flwr-public-key"])
        signed = verify_signature(
            bytes_to_public_key(public),
            headers["flwr-timestamp"].encode("ascii"),
            base64.b64decode(headers["flwr-signature"]),
        )
        if not signed or request.public_key != public:
            status, payload = 401, b'{"detail":"Invalid SuperNode authentication"}'
        else:
            try:
                activate_node(request, self.state)
                status, payload = 200, b""
            except FlowerError as err:
                status, payload = _flower_answer(err.code)
        conn.sendall(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode()
            + payload
        )


def _node_pem(site: Site) -> bytes:
    from cryptography.hazmat.primitives import serialization

    from common.pki import load_node_key

    return (
        load_node_key(site.node_key)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _site_at(
    tmp_path: Path, ca: Path, address: str, name: str = "site-a", *, force: bool = False
) -> Site:
    return init_site(
        tmp_path / name,
        site_id=name,
        data=make_site_data(tmp_path / f"{name}.csv"),
        ca=ca,
        superlink=address,
        force=force,
    )


def test_connect_verifies_the_superlink_against_the_ca_and_finds_the_key_registered(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    from client.deploy import CheckReport, check_connection
    from common.pki import ca_fingerprint_text, load_ca_certificate

    site = _site_at(tmp_path, coord.directory / "ca.crt", "127.0.0.1:1")
    with FleetStub(coord.directory, registered=[_node_pem(site)]) as link:
        # The same keys (a re-init keeps them), the stub's address.
        site = _site_at(tmp_path, coord.directory / "ca.crt", f"127.0.0.1:{link.port}", force=True)
        report = CheckReport()

        check_connection(report, site, timeout=5)

        ca = ca_fingerprint_text(load_ca_certificate(coord.directory / "ca.crt"))
        assert report.problems == []
        assert report.lines[0] == (
            f"ok    TLS handshake with 127.0.0.1:{link.port}: certificate verified against "
            f"the CA, CA fingerprint {ca}"
        )
        assert report.lines[1].startswith("ok    node key registered at the coordinator")
        # One signed request, refused before activation: the node is as it was.
        assert [s[0] for s in link.seen] == ["POST /v1/fleet/activate-node HTTP/1.1"]
        assert link.statuses() == ["registered"]


def test_connect_says_an_unregistered_key_is_not_registered(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    from client.deploy import CheckReport, check_connection

    with FleetStub(coord.directory, registered=[b"another node's key"]) as link:
        site = _site_at(tmp_path, coord.directory / "ca.crt", f"localhost:{link.port}")
        report = CheckReport()

        check_connection(report, site, timeout=5)

        assert report.problems == [
            "this node's key is not registered at the coordinator (hand "
            f"{site.directory / 'node.pub'} to the coordinator: `fedsilo coordinator register "
            "node.pub --name site-a --ledger-key identity.pub`)"
        ]
        assert link.statuses() == ["registered"]


def test_connect_with_another_coordinators_ca_fails_naming_the_sites_ca(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    from client.deploy import CheckReport, check_connection
    from common.pki import ca_fingerprint_text, load_ca_certificate
    from server.deploy import init_coordinator

    other = init_coordinator(tmp_path / "other", ["localhost"], port=8123)
    with FleetStub(coord.directory, registered=[]) as link:
        site = _site_at(tmp_path, other.directory / "ca.crt", f"127.0.0.1:{link.port}")
        report = CheckReport()

        check_connection(report, site, timeout=5)

        theirs = ca_fingerprint_text(load_ca_certificate(other.directory / "ca.crt"))
        assert report.lines == [
            f"FAIL  the SuperLink's certificate is not signed by this site's CA "
            f"({site.directory / 'ca.crt'}, {theirs}): get the coordinator's ca.crt again "
            "and compare its fingerprint with the one the coordinator printed"
        ]
        assert link.seen == []  # nothing is sent over an unverified connection


def test_connect_says_nothing_listens_and_names_silence(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    from client.deploy import CheckReport, check_connection, free_port

    port = free_port()
    site = _site_at(tmp_path, coord.directory / "ca.crt", f"127.0.0.1:{port}")
    report = CheckReport()
    check_connection(report, site, timeout=5)
    assert report.problems == [
        f"nothing listens at 127.0.0.1:{port}: is the SuperLink started (`fedsilo "
        "coordinator start`), and is this its address and port?"
    ]

    # A port that accepts but never speaks TLS: the handshake times out.
    with socket.create_server(("127.0.0.1", 0)) as mute:
        address = f"127.0.0.1:{mute.getsockname()[1]}"
        silent = _site_at(tmp_path, coord.directory / "ca.crt", address, "site-b")
        report = CheckReport()
        check_connection(report, silent, timeout=0.5)
    assert report.problems == [
        f"no answer from {address} within 0.5 s: a firewall drops the connection, or the "
        "address is wrong"
    ]


def test_connect_failure_words_for_an_unresolved_name_and_a_name_the_certificate_lacks(
    tmp_path: Path,
) -> None:
    import ssl

    from client.deploy import connect_failure

    ca = tmp_path / "ca.crt"
    unresolved = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert connect_failure(unresolved, "coord.invalid:8000", ca, "SHA-256 AB", timeout=10) == (
        "the name 'coord.invalid' does not resolve (Name or service not known): check the "
        "SuperLink's address in site.toml and this machine's DNS"
    )
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_message = "IP address mismatch, certificate is not valid for '10.9.9.9'."
    words = connect_failure(mismatch, "10.9.9.9:8000", ca, "SHA-256 AB", timeout=10)
    assert words.startswith("the SuperLink's certificate does not name '10.9.9.9'")


def test_the_probe_is_a_signed_activation_flower_reads_and_refuses_before_activating(
    coord: coordinator.Coordinator,
) -> None:
    import base64
    import datetime as dt

    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL, TIMESTAMP_HEADER
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_public_key,
        public_key_to_bytes,
        verify_signature,
    )
    from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE

    from client.deploy import activation_probe

    key = ec.generate_private_key(ec.SECP384R1())
    body, headers = activation_probe(key, dt.datetime.now(dt.UTC))

    request = ActivateNodeRequest.FromString(body)
    assert request.public_key == public_key_to_bytes(key.public_key())  # Flower's encoding
    assert request.heartbeat_interval < HEARTBEAT_MIN_INTERVAL
    assert headers["content-type"] == PROTOBUF_MEDIA_TYPE
    assert base64.b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER]) == request.public_key
    assert verify_signature(
        bytes_to_public_key(request.public_key),
        headers[TIMESTAMP_HEADER].encode("ascii"),
        base64.b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER]),
    )
    assert dt.datetime.fromisoformat(headers[TIMESTAMP_HEADER]).tzinfo is not None


@pytest.mark.parametrize(
    ("code", "registered"),
    [(2003, True), (2004, False), (2001, None)],  # 2001: registration via Fleet disabled
)
def test_the_probe_answer_is_read_from_flowers_own_error_payload(
    code: int, registered: bool | None
) -> None:
    from client.deploy import read_probe_answer

    status, body = _flower_answer(code)
    answer = read_probe_answer(status, body)
    assert answer.registered is registered and answer.status == status
    # FastAPI's answer to a bad signature (flwr/superlink/routers/fleet/node_auth.py).
    refused = read_probe_answer(401, b'{"detail":"Invalid SuperNode authentication"}')
    assert (refused.registered, refused.detail) == (None, "Invalid SuperNode authentication")


# ---- site start: why the SuperNode stopped ----------------------------------------------

# The end of flower-supernode 1.42's log (stderr, colours included) in each failure, as
# captured from real runs: an unregistered key and a node the SuperLink still held as
# online (identical), another coordinator's CA, a SuperLink address its certificate does
# not name, and (with --max-retries 0; by default it retries without end) nothing
# listening and an unknown name.
_TAIL = (
    "\n\nThe SuperNode could not establish a connection to the SuperLink.\n\n"
    "For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>\n"
    "\x1b[92mINFO \x1b[0m:      FastAPI lifespan: shutdown\n"
)
_EXIT = "\x1b[91mERROR \x1b[0m:     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
FLOWER_LOGS = {
    "refused": _EXIT + "[code: 2004] Failed to activate SuperNode." + _TAIL,
    "foreign-ca": "\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.\n" + _EXIT
    + "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local "
    "issuer certificate (_ssl.c:1006)" + _TAIL,
    "name": _EXIT + "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address "
    "mismatch, certificate is not valid for '127.0.0.2'. (_ssl.c:1006)" + _TAIL,
    "refused-port": _EXIT + "[Errno 111] Connection refused" + _TAIL,
    "dns": _EXIT + "[Errno -2] Name or service not known" + _TAIL,
    "key": _EXIT.replace("305", "302").replace("Failed to initialize the connection to the SuperLink.", "Error while loading the private key")
    + "\nNode authentication requires elliptic curve private key.\n",
}  # fmt: skip


@pytest.mark.parametrize(
    ("log", "registered", "expected"),
    [
        ("refused", False, "this node's key is not registered at the coordinator (hand {d}/node.pub to the coordinator: `fedsilo coordinator register node.pub --name site-a --ledger-key identity.pub`)"),
        ("refused", True, "the coordinator still holds this node as online (it stopped without saying goodbye); wait about a minute and start again"),
        ("refused", None, "either its key is not registered at the coordinator (hand {d}/node.pub"),
        ("foreign-ca", None, "the SuperLink's certificate is not signed by this site's CA ({d}/ca.crt, SHA-256 AB:CD): get the coordinator's ca.crt again and compare its fingerprint with the one the coordinator printed"),
        ("name", None, "the SuperLink's certificate does not name '127.0.0.2'"),
        ("refused-port", None, "nothing listens at 127.0.0.2:8123: is the SuperLink started"),
        ("dns", None, "the name '127.0.0.2' does not resolve"),
        ("key", None, "flower-supernode exited with status 1 (Flower exit code 302: Error while loading the private key); its log is above"),
    ],
)  # fmt: skip
def test_the_supernodes_exit_is_said_in_words(
    tmp_path: Path,
    coord: coordinator.Coordinator,
    log: str,
    registered: bool | None,
    expected: str,
) -> None:
    from client.deploy import activation_refused, supernode_exit_cause

    site = _site_at(tmp_path, coord.directory / "ca.crt", "127.0.0.2:8123")
    older = "\x1b[91mERROR \x1b[0m:     ClientApp raised: Connection refused by peer\n"

    cause = supernode_exit_cause(
        1, older + FLOWER_LOGS[log], site, ca_fingerprint="SHA-256 AB:CD", registered=registered
    )

    assert cause is not None and expected.format(d=site.directory) in cause
    assert activation_refused(FLOWER_LOGS[log]) == (log == "refused")


def test_a_supernode_stopped_on_request_is_no_error_and_one_killed_is_named(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    import signal

    from client.deploy import supernode_exit_cause

    site = _site_at(tmp_path, coord.directory / "ca.crt", "127.0.0.1:8123")
    for quiet in (0, -signal.SIGTERM, -signal.SIGINT):
        assert supernode_exit_cause(quiet, "", site, ca_fingerprint="x") is None
    assert supernode_exit_cause(-signal.SIGKILL, "", site, ca_fingerprint="x") == (
        "flower-supernode was killed by SIGKILL: the coordinator holds the node as online "
        "for about a minute more; wait before starting it again"
    )


def test_flowers_own_exit_message_for_a_refused_activation_is_recognised() -> None:
    # Composed as flwr/supernode/fleet_http_connection.py does, by Flower's flwr_exit.
    import sys

    script = (
        "from flwr.supercore.error import FlowerError\n"
        "from flwr.supercore.exit import ExitCode, flwr_exit\n"
        f"err = FlowerError.from_json({_flower_answer(2004)[1].decode()!r})\n"
        "flwr_exit(ExitCode.SUPERNODE_CONNECTION_ERROR, 'Failed to initialize the connection "
        "to the SuperLink.\\n' + f'[code: {err.code}] {err.message}', emit_telemetry=False)\n"
    )
    from client.deploy import activation_refused

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1  # Flower's exit status for every failure
    assert activation_refused(done.stdout + done.stderr)


def test_a_site_keeps_the_reserve_it_declares_at_init(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    site = init_site(
        tmp_path / "site",
        site_id="site-r",
        data=make_site_data(tmp_path / "r.csv"),
        ca=coord.directory / "ca.crt",
        superlink="localhost:9092",
        epsilon=8.0,
        reserve=2.0,
    )
    settings = SiteSettings.from_node_config(site.node_config, RunConfig())
    assert settings.reserve == 2.0
    text = "\n".join(check_site(site.directory).lines)
    assert "lifetime epsilon spent 0.000 of 8 (site, adaptive filter); 6.000 left for runs " in text
    assert "above the reserve of 2" in text
    with pytest.raises(DeployError, match=r"'epsilon-reserve' must be at least 0 and below"):
        init_site(
            tmp_path / "other",
            site_id="site-s",
            data=make_site_data(tmp_path / "s.csv"),
            ca=coord.directory / "ca.crt",
            superlink="localhost:9092",
            epsilon=2.0,
            reserve=2.0,
        )
