"""P7: what a real deployment adds to a round, side by side in one run.

The same workload twice, one after the other in this one invocation:

* deployed: a SuperLink and ``--sites`` SuperNodes as processes on loopback, set up
  with fedsilo's own tooling (TLS, node authentication, the e2e test's 300 Rotten
  Tomatoes rows per site), the run started with ``flwr run``. Flower's Deployment
  Engine starts a fresh ``flwr-clientapp`` process for every message a site receives,
  so every secure-aggregation stage pays a process start;
* in-process: the same ServerApp and ClientApp, the same site files, node configs and
  run config, on the Ray-free in-process grid (tests/support/inprocess_grid.py): no
  processes, no network, no polling.

Printed: per round the time from sampling to the mean update (``aggregate_seconds``)
and the whole round, for both, and P7 = deployed / in-process (median over rounds
2.., round 1 pays for each site's one-off noise calibration and the first imports).
Also the seconds each stage exchange took in the deployed run, and the process start
of a stage message at a site: a fresh interpreter importing Flower's ``flwr-clientapp``
command and fedsilo's ClientApp, against Flower's command alone (median of 5).

    .venv/bin/python benchmarks/deploy.py --sites 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import deployment  # noqa: E402


def _run_config(rounds: int, sites: int, out: Path) -> dict[str, Any]:
    return {
        "num-server-rounds": rounds,
        "min-sites": sites,
        "round-timeout": 300.0,
        "out-dir": str(out),
    }


def deployed(root: Path, names: list[str], data: dict[str, Path], rounds: int) -> dict[str, Any]:
    with deployment.federation(root) as fed:
        sites = {n: fed.site(n, data[n]) for n in names}
        fed.roster(list(sites.values()))  # `fedsilo roster make`, `site roster` at each
        node_ids = {n: fed.register(sites[n], n) for n in names}
        for n in names:
            fed.start_site(sites[n])
        deployment.wait(
            "every site online",
            lambda: fed.online_nodes() == set(node_ids.values()),
            180,
            every=1,
        )
        out = root / "deployed-run"
        config = _run_config(rounds, len(names), out)
        started = time.monotonic()
        run = fed.flwr(
            "run",
            str(ROOT),
            "fedsilo",
            "--format",
            "json",
            "--run-config",
            " ".join(f"{k}={json.dumps(v)}" for k, v in config.items()),
            timeout=120,
        )
        if run.returncode != 0:
            raise RuntimeError(run.stdout + run.stderr)
        deployment.wait("the run's summary", lambda: deployment.finished(out), 60 * 20, every=1)
        wall = time.monotonic() - started
        summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
        summary["wall"] = wall
        return summary


def in_process(root: Path, names: list[str], data: dict[str, Path], rounds: int) -> dict[str, Any]:
    import tomllib

    from client.app import app as client_app
    from client.roster import install_roster, make_roster
    from common.privacy.identity import PUBLIC_KEY_FILE, init_state
    from server.app import app as server_app
    from tests.support.inprocess_grid import InProcessGrid

    # The deployed sites' own node configs, each with a fresh state folder as `site
    # init` makes it (keys, marker) and their roster installed in it.
    states = {n: root / "in-process-sites" / n for n in names}
    for n, state in states.items():
        init_state(state, site_id=n)
    roster = make_roster([f"{n}={state / PUBLIC_KEY_FILE}" for n, state in states.items()])
    node_configs = []
    for n in names:
        install_roster(states[n], roster)
        config = tomllib.loads((root / n / "node-config.toml").read_text())
        config["state-dir"] = str(states[n])
        node_configs.append(config)
    out = root / "in-process-run"
    grid = InProcessGrid(
        client_app,
        num_nodes=len(names),
        node_configs=node_configs,
        run_config=_run_config(rounds, len(names), out),
    )
    started = time.monotonic()
    server_app(grid, grid.server_context())
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    summary["wall"] = time.monotonic() - started
    return summary


def process_start(repeats: int = 5) -> tuple[float, float]:
    """Median seconds for a fresh interpreter to import what a stage message's process
    imports (Flower's ``flwr-clientapp`` command and the ClientApp), and Flower's alone."""
    flower = "import flwr.supernode.cli.flwr_clientapp"
    times: dict[str, list[float]] = {"app": [], "flower": []}
    for _ in range(repeats):
        for name, code in (("app", f"{flower}; import client.app"), ("flower", flower)):
            started = time.monotonic()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
            times[name].append(time.monotonic() - started)
    return statistics.median(times["app"]), statistics.median(times["flower"])


def _check(summary: dict[str, Any], sites: int, what: str) -> None:
    rows = summary["rounds"]
    if any(r["status"] != "ok" or r["trained"] != sites for r in rows):
        raise RuntimeError(f"{what}: not every site trained in every round: {rows}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is left out of the ratio)")
    if args.sites < 3:
        parser.error("--sites must be at least 3 (a site's default secagg-min-sites)")
    names = [f"site-{chr(ord('a') + i)}" for i in range(args.sites)]
    print(f"cores: {os.cpu_count()}; {args.sites} sites x {deployment.ROWS_PER_SITE} rows")
    app_start, flower_start = process_start()
    print(
        f"P7 process start of a stage message at a site: {app_start:.2f} s "
        f"(Flower's flwr-clientapp alone {flower_start:.2f} s; load {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="fedsilo-p7-") as tmp:
        root = Path(tmp)
        data = deployment.write_sites_data(root, names)
        load_before = os.getloadavg()[0]
        dep = deployed(root, names, data, args.rounds)
        _check(dep, args.sites, "deployed")
        load_mid = os.getloadavg()[0]
        local = in_process(root, names, data, args.rounds)
        _check(local, args.sites, "in-process")
        load_after = os.getloadavg()[0]
    print(f"{'round':>5} | {'deployed agg':>12} {'round':>7} | {'in-process agg':>14} {'round':>7}")
    for d, p in zip(dep["rounds"], local["rounds"], strict=True):
        print(
            f"{d['round']:>5} | {d['aggregate_seconds']:11.2f}s {d['seconds']:6.2f}s | "
            f"{p['aggregate_seconds']:13.2f}s {p['seconds']:6.2f}s"
        )
    for d in dep["rounds"]:
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in d["stage_seconds"].items())
        print(f"deployed round {d['round']} exchanges: {stages}")
    later = slice(1, None)
    dep_agg = statistics.median(r["aggregate_seconds"] for r in dep["rounds"][later])
    loc_agg = statistics.median(r["aggregate_seconds"] for r in local["rounds"][later])
    dep_round = statistics.median(r["seconds"] for r in dep["rounds"][later])
    loc_round = statistics.median(r["seconds"] for r in local["rounds"][later])
    print(
        f"P7 deployed round / in-process round (median of rounds 2..{args.rounds}): "
        f"{dep_agg:.2f}s / {loc_agg:.2f}s = {dep_agg / loc_agg:.2f}x from sampling to the mean; "
        f"whole round {dep_round:.2f}s / {loc_round:.2f}s = {dep_round / loc_round:.2f}x "
        f"(load {load_before:.1f} {load_mid:.1f} {load_after:.1f})"
    )


if __name__ == "__main__":
    main()
