"""Flower's Deployment Engine on loopback, set up with fedsilo's own tooling: a
SuperLink and SuperNodes as real processes with TLS and node authentication, a
`flwr run` of the fedsilo app, and the fault cases of a deployment.

One SuperLink serves the module (its start costs seconds); tests/support/deployment.py
starts and stops every process (benchmarks/deploy.py uses it too). Everything lives
under pytest's tmp dir.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.privacy.audit import verify
from tests.support import deployment
from tests.support.deployment import Federation

pytestmark = pytest.mark.e2e

GENERIC_DATA_FAILURE = "site data failed validation (details in the site's log)"
SECRET = "SECRET-PATIENT-4711"
CLIENTAPP_STARTS = "Start `flwr-clientapp`"  # a SuperNode's log line for each message


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    with deployment.federation(tmp_path_factory.mktemp("deploy")) as fed:
        yield fed


# ---- tests ------------------------------------------------------------------------


def test_sites_with_an_unregistered_key_or_the_wrong_ca_are_refused(
    federation: Federation,
) -> None:
    # Prepare: a site whose key was never registered; a site that trusts another CA.
    fed = federation
    data = deployment.write_sites_data(fed.root, ["refused"])["refused"]
    other_ca = fed.root / "other-coordinator"
    deployment.fedsilo("coordinator", "init", str(other_ca), "--host", "localhost")
    unregistered = fed.site("unregistered", data, min_sites=2)
    wrong_ca = fed.site("wrong-ca", data, ca=other_ca / "ca.crt", min_sites=2)
    fed.roster([unregistered, wrong_ca], "roster-refused.json")  # else `site start` refuses

    # Execute: `site check --connect` meets the SuperLink; then each starts a SuperNode.
    checks = {
        name: deployment.fedsilo_result("site", "check", "--connect", str(site))
        for name, site in (("unregistered", unregistered), ("wrong-ca", wrong_ca))
    }
    procs = [fed.start_site(unregistered), fed.start_site(wrong_ca)]
    codes = [p.wait_exit(timeout=120) for p in procs]

    # Assert: the check finds each problem before `site start`, in words, and prints the
    # CA fingerprint to compare; each SuperNode gives up on its own and `site start`
    # says why in one line.
    ours = deployment.ca_fingerprint(fed.coord / "ca.crt")
    theirs = deployment.ca_fingerprint(other_ca / "ca.crt")
    check = checks["unregistered"]
    assert check.returncode != 0, check.stdout
    assert f"certificate verified against the CA, CA fingerprint {ours}" in check.stdout
    assert "this node's key is not registered at the coordinator" in check.stdout
    check = checks["wrong-ca"]
    assert check.returncode != 0 and "ok    TLS handshake" not in check.stdout
    assert "not signed by this site's CA" in check.stdout and theirs in check.stdout
    assert codes[0] != 0 and "Failed to activate SuperNode" in procs[0].text()
    assert "error: this node's key is not registered at the coordinator" in procs[0].text()
    assert codes[1] != 0 and "CERTIFICATE_VERIFY_FAILED" in procs[1].text()
    assert "error: the SuperLink's certificate is not signed by this site's CA" in procs[1].text()
    assert fed.superlink.popen.poll() is None
    assert fed.online_nodes() == set()


def test_a_run_survives_a_stopped_site_and_a_corrupt_one(federation: Federation) -> None:
    # Prepare: four sites with their own data, keys registered with the coordinator.
    fed = federation
    names = ["site-a", "site-b", "site-c", "site-d"]
    data = deployment.write_sites_data(fed.root, names)
    sites = {n: fed.site(n, data[n]) for n in names}
    # The sites' operators agree on one roster of their identity keys, out of band; each
    # installs it, and its check shows the fingerprint they compared.
    fingerprint = fed.roster(list(sites.values()))
    check = deployment.fedsilo("site", "check", str(sites["site-a"]))
    roster_line = next(line for line in check.splitlines() if line.startswith("ok    roster "))
    assert f"4 sites, fingerprint {fingerprint}; site-a listed with its own" in roster_line
    node_ids = {}
    for n in names:
        out = deployment.fedsilo(
            "coordinator",
            "register",
            str(sites[n] / "node.pub"),
            "--name",
            n,
            "--dir",
            str(fed.coord),
        )
        assert f"registered site {n} as node" in out
        node_ids[n] = out.split(" as node ")[1].split()[0]
    again = deployment.fedsilo(
        "coordinator",
        "register",
        str(sites["site-a"] / "node.pub"),
        "--name",
        "site-a",
        "--dir",
        str(fed.coord),
    )
    assert "already registered" in again and node_ids["site-a"] in again
    procs = {n: fed.start_site(sites[n]) for n in names}
    deployment.wait(
        "four sites online", lambda: fed.online_nodes() == set(node_ids.values()), 120, every=2
    )
    # A rehearsal first: the whole path (TLS, node auth, secure aggregation, the
    # coordinator's outputs) on public stand-in data, nothing spent.
    rehearsal_dir = fed.root / "rehearsal"
    rehearsal = fed.flwr(
        "run", ".", "fedsilo", "--format", "json", "--run-config",
        f"rehearsal=true num-server-rounds=1 min-sites=2 round-timeout=120.0 "
        f"out-dir='{rehearsal_dir}'",
        timeout=120,
    )  # fmt: skip
    assert rehearsal.returncode == 0, rehearsal.stdout + rehearsal.stderr
    deployment.wait("the rehearsal", lambda: deployment.finished(rehearsal_dir), 300, every=1)
    rehearsed = json.loads((rehearsal_dir / "summary.json").read_text())
    assert rehearsed["rehearsal"] is True and rehearsed["rounds"][0]["trained"] == 4
    assert rehearsed["rounds"][0]["ledger_heads"] == {}
    for n in names:  # ledgers untouched
        ledger = sites[n] / "state" / "ledger.jsonl"
        assert not ledger.exists() or ledger.read_text() == "", n
    shown = _run_log(fed, json.loads(rehearsal.stdout)["run-id"], "final accuracy")
    assert "REHEARSAL: every site trains on public stand-in data" in shown
    assert "REHEARSAL (public stand-in data, nothing spent): final accuracy" in shown
    out_dir = fed.root / "run"
    marks: dict[str, float] = {}

    # Execute: a two-round run. site-c is stopped (SIGTERM) as round 1 reaches it and
    # restarted once the SuperLink has seen it go; site-d's data file goes bad after
    # round 1 (a broken nightly export), so round 2 reaches a corrupt file.
    started_apps = procs["site-c"].text().count(CLIENTAPP_STARTS)  # the rehearsal's
    started = time.monotonic()
    run = fed.flwr(
        "run",
        ".",
        "fedsilo",
        "--format",
        "json",
        "--run-config",
        f"num-server-rounds=2 min-sites=2 round-timeout=120.0 out-dir='{out_dir}'",
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    run_id = str(json.loads(run.stdout)["run-id"])
    site_c = procs["site-c"]
    # The run's pre-flight starts one ClientApp at site-c, its round 1 the next.
    deployment.wait(
        "round 1 at site-c",
        lambda: site_c.text().count(CLIENTAPP_STARTS) >= started_apps + 2,
        180,
        every=0.2,
    )
    site_c.stop()
    deployment.wait(
        "the SuperLink to mark site-c offline",
        lambda: node_ids["site-c"] not in fed.online_nodes(),
        60,
        every=1,
    )
    time.sleep(4)  # > a SuperNode's 3 s idle poll: round 1 has seen site-c go
    marks["site-c restarting"] = time.monotonic() - started
    restarted = fed.start_site(sites["site-c"], tag="-restarted")
    deployment.wait(
        "site-c back online", lambda: node_ids["site-c"] in fed.online_nodes(), 120, every=1
    )
    marks["site-c online"] = time.monotonic() - started
    checkpoint = out_dir / "checkpoints" / "round-001.safetensors"
    deployment.wait("round 1 to end", checkpoint.exists, 300, every=0.2)
    marks["round 1 done"] = time.monotonic() - started
    with data["site-d"].open("a", newline="") as handle:
        csv.writer(handle).writerow([f"notes of {SECRET}", SECRET])
    deployment.wait("the run's summary", lambda: deployment.finished(out_dir), 300, every=1)
    marks["run done"] = time.monotonic() - started
    logs = _run_log(fed, run_id, "final accuracy")
    print("deployment run, seconds from `flwr run`:", {k: round(v) for k, v in marks.items()})

    # Assert: per round, which sites trained (their signed ledger heads reached the
    # coordinator), why the others did not, and that the model learned.
    summary = json.loads((out_dir / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2], rounds
    assert all(r["status"] == "ok" for r in rounds), rounds
    assert [r["trained"] for r in rounds] == [3, 3], rounds
    assert set(rounds[0]["ledger_heads"]) == {"site-a", "site-b", "site-d"}, rounds[0]
    assert set(rounds[1]["ledger_heads"]) == {"site-a", "site-b", "site-c"}, rounds[1]
    stopped = {n["site"] for n in rounds[0]["notes"] if n["status"] == "failed"}
    # No report from it this round; its name is its pre-flight answer's.
    assert stopped == {"site-c"}, rounds[0]["notes"]
    assert rounds[1]["notes"] == [
        {"site": "site-d", "status": "failed", "reason": GENERIC_DATA_FAILURE}
    ]
    assert summary["final"]["rounds_completed"] == 2
    # The decoded sums moved the model: its zero-initialised head is no longer zero after
    # round 1 and changed again in round 2. Two DP rounds over 3,000 examples do not
    # reliably beat the zero head's loss of ln 2 (0.6922 was seen), so the loss
    # is only checked to be that of a sane model, not of a garbage sum. Learning is
    # shown by tests/unit/common/test_training.py, the sum's exactness by
    # tests/integration/test_secure_aggregation.py.
    ckpt = [load_file(str(out_dir / "checkpoints" / f"round-00{r}.safetensors")) for r in (1, 2)]
    assert float(ckpt[0]["head.weight"].abs().max()) > 0
    assert any(not torch.equal(ckpt[0][k], ckpt[1][k]) for k in ckpt[0])
    assert summary["final"]["loss"] < math.log(2) + 0.05
    assert 0 < summary["final"]["epsilon_max"] <= 8.0 + 1e-6
    # The corrupt row's content stayed at site-d: only its own log names the line.
    assert SECRET not in (out_dir / "summary.json").read_text()
    assert SECRET not in logs and SECRET not in fed.superlink.text()
    site_log = procs["site-d"].text()
    assert "DataValidationError" in site_log and f"{data['site-d'].name} line" in site_log
    assert "final accuracy" in logs
    assert restarted.popen.poll() is None
    # The pre-flight said what the run would cost each site before anything was spent,
    # and the console showed the secure-aggregation stages as they happened.
    preflight = {row["site"]: row for row in summary["preflight"]}
    assert set(preflight) == set(names), summary["preflight"]
    for n in names:
        row = preflight[n]
        assert row["status"] == "ok" and row["spent"] == 0.0 and row["budget"] == 8.0
        assert 0 < row["epsilon"] <= 8.0 + 1e-6 and row["after"] <= 8.0
        assert f"{n}: run epsilon {row['epsilon']:.3f}" in logs
    assert "pre-flight: what this run will cost each site" in logs
    assert "round 1 advertise: " in logs and "round 2 unmask: " in logs

    # Execute: a third run of the same plan would overspend every site.
    again_dir = fed.root / "again"
    third = fed.flwr(
        "run", ".", "fedsilo", "--format", "json", "--run-config",
        f"num-server-rounds=2 min-sites=2 round-timeout=120.0 out-dir='{again_dir}'",
        timeout=120,
    )  # fmt: skip
    assert third.returncode == 0, third.stdout + third.stderr
    deployment.wait("the refused run", lambda: deployment.finished(again_dir), 300, every=1)
    refused = json.loads((again_dir / "summary.json").read_text())
    shown = _run_log(fed, json.loads(third.stdout)["run-id"], "outputs in")

    # Assert: each site refused at the pre-flight, naming its spent budget, and the run
    # stopped before its first round.
    assert refused["rounds"] == []
    for row in refused["preflight"]:
        assert row["status"] == "refused", row
        assert row["reason"].startswith(f"budget spent: {row['spent']:.3f} of 8.000 on this site")
        assert f"{row['site']} REFUSED: budget spent: {row['spent']:.3f} of 8.000" in shown
    assert "the run stops before its first round; nothing was spent" in shown
    assert "budget spent" in procs["site-a"].text()  # the site's own log says it too


def _run_log(fed: Federation, run_id: object, last: str) -> str:
    """A run's ServerApp output, once ``last`` has reached the SuperLink's log (it
    arrives a moment after the run's files), with narrow-console line breaks undone."""
    text = ""

    def logged() -> bool:
        nonlocal text
        text = " ".join(fed.flwr("log", str(run_id), "fedsilo", "--show").stdout.split())
        return last in text

    deployment.wait(f"{last!r} in the run's log", logged, 60, every=2)
    return text


TICKETS = {
    "billing": "invoice payment refund charge card",
    "access": "password login locked account reset",
    "outage": "down offline error timeout server",
}


def test_a_task_of_our_own_trains_and_evaluates_privately_at_three_sites(
    federation: Federation, tmp_path: Path
) -> None:
    # Prepare: a task the project does not bundle (custom labels and columns, no public
    # test file); three sites agree to it at `site init --task`, each with its own file.
    fed = federation
    # Another federation's sites (earlier tests) leave the SuperLink first: a coordinator
    # samples every connected site, and those refuse this task at the first exchange.
    deployment.stop_all(fed.procs)
    fed.procs.clear()
    deployment.wait("the earlier sites offline", lambda: not fed.online_nodes(), 90, every=2)
    task = tmp_path / "tickets.toml"
    task.write_text(
        'name = "tickets"\nlabels = ["billing", "access", "outage"]\n'
        'text-column = "ticket"\nlabel-column = "kind"\nmax-length = 16\n'
    )
    rng = np.random.default_rng(0)
    names = ["desk-a", "desk-b", "desk-c"]
    sites = {}
    for n in names:
        path = tmp_path / f"{n}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["kind", "ticket"])
            for i in range(300):
                kind = str(rng.choice(list(TICKETS)))
                words = rng.choice(TICKETS[kind].split(), 5)
                writer.writerow([kind, " ".join(words) + f" {n} {i}"])
        sites[n] = fed.site(n, path, extra=("--task", str(task)))
    fed.roster(list(sites.values()), "roster-tickets.json")
    ids = {fed.register(sites[n], n) for n in names}
    for n in names:
        fed.start_site(sites[n])
    deployment.wait("the desks online", lambda: ids <= fed.online_nodes(), 120, every=2)
    out_dir = tmp_path / "run"

    # Execute: the coordinator holds the task file; the sites hold all the data.
    run = fed.flwr(
        "run", ".", "fedsilo", "--format", "json", "--run-config",
        f"dataset='sites' task='{task}' num-server-rounds=1 min-sites=3 "
        f"round-timeout=120.0 out-dir='{out_dir}'",
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    deployment.wait("the run's summary", lambda: deployment.finished(out_dir), 300, every=1)

    # Assert: the three desks trained in the secure sum and evaluated privately.
    summary = json.loads((out_dir / "summary.json").read_text())
    [rnd] = summary["rounds"]
    assert summary["task"]["labels"] == ["billing", "access", "outage"]
    assert rnd["trained"] == 3 and sorted(rnd["trained_sites"]) == names, rnd
    assert rnd["accuracy"] is None and summary["final"]["source"] == "federated"
    private = rnd["private_eval"]
    assert sorted(private["sites"]) == names and private["noise"] is True
    assert [c["label"] for c in private["classes"]] == ["billing", "access", "outage"]
    assert rnd["notes"] == [] and private["notes"] == []
    for n in names:
        ledger = sites[n] / "state" / "ledger.jsonl"
        scopes = [json.loads(line)["scope"] for line in ledger.read_text().splitlines()]
        assert scopes == ["site", "eval"]
        audit = verify(ledger)  # against Google's PLD accountant
        assert audit.ok, [f.message for f in audit.findings]
