"""A run that dies resumes (server/resume.py), with the real ServerApp and ClientApp on
the in-process grid: the coordinator dies in round 2 after the sites trained (they
were charged); a new run takes over from the checkpoint of round 1, runs round 2 again
from scratch and round 3; every ledger holds the dead run's entries, then the new
run's, none twice, within the lifetime budget, and both runs pass the audit."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Message

from client.app import app as client_app
from common.outputs import read_summary
from common.privacy.audit import audit_against_summary, verify
from common.privacy.ledger import LEDGER_FILE, read_ledger
from server.app import app as server_app
from server.resume import STATE_FILE
from tests.support.inprocess_grid import InProcessGrid
from tests.support.reference import reference_filter_epsilon, reference_history_epsilon
from tests.support.runs import SMALL_RUN, fedsilo


class CoordinatorDied(Exception):
    """The coordinator's process ends here (a crash, a reboot)."""


class DyingGrid(InProcessGrid):
    """Dies when it is about to push a message of ``group``: what was delivered before
    happened, nothing after."""

    def __init__(self, *args: object, die_at: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.die_at = die_at

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        if any(m.metadata.group_id == self.die_at for m in messages):
            raise CoordinatorDied(self.die_at)
        return super().push_messages(messages)


def test_a_run_killed_in_round_2_resumes_and_finishes_its_rounds(tmp_path: Path) -> None:
    # Prepare: three simulated sites, a 3-round plan; the coordinator dies in round 2
    # after the sites trained and sent their masked inputs (before the consistency round).
    dead_dir, new_dir = tmp_path / "dead", tmp_path / "resumed"
    run = {**SMALL_RUN, "num-server-rounds": 3, "out-dir": str(dead_dir)}
    dying = DyingGrid(client_app, num_nodes=3, run_config=run, run_id=7001, die_at="2/consistency")

    # Execute: the first run dies; a new run resumes it.
    with pytest.raises(CoordinatorDied):
        server_app(dying, dying.server_context())
    partial = read_summary(dead_dir)
    resumed = InProcessGrid(
        client_app,
        num_nodes=3,
        run_config={"resume": str(dead_dir), "out-dir": str(new_dir)},
        run_id=7002,
    )
    server_app(resumed, resumed.server_context())
    summary = json.loads((new_dir / "summary.json").read_text())

    # Assert: the dead run left round 1 (its summary says it is not complete) and its
    # state; the new run adopted its plan and trained rounds 2 and 3.
    assert not partial.complete and [r.round for r in partial.rounds] == [1]
    assert (dead_dir / STATE_FILE).is_file()
    assert summary["complete"] and summary["config"]["num-server-rounds"] == 3
    assert summary["config"]["resumes-run"] == "7001" and summary["config"]["resume-round"] == 1
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert all(r["status"] == "ok" and r["trained"] == 3 for r in summary["rounds"])
    sites_dir = Path(summary["config"]["sites-dir"])
    assert sites_dir == (dead_dir / "sites").resolve()
    for i in range(3):
        path = sites_dir / f"site-{i}" / LEDGER_FILE
        entries = read_ledger(path)
        # The dead run's two rounds (round 2 was charged before it died), then the new
        # run's two, numbered within the new run; no entry twice.
        assert [(e.run_id, e.round) for e in entries] == [
            ("7001", 1), ("7001", 2), ("7002", 1), ("7002", 2)
        ]  # fmt: skip
        assert len({e.entry_hash() for e in entries}) == 4
        assert entries[-1].rounds == 2 and entries[-1].spent <= entries[-1].budget
        # The new run's noise counts the dead run's rounds as spent: together they
        # reach the plan's target (an independent accountant), not twice the target.
        events = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
        assert entries[2].noise_multiplier > entries[0].noise_multiplier
        assert reference_history_epsilon(events) <= 4.0 * 1.02
        assert reference_filter_epsilon(events) <= entries[-1].budget * 1.0001
        assert verify(path).ok, [f.message for f in verify(path).findings]
    # The resumed run publishes the epsilon of the model it ends with: the dead run's
    # charged rounds and its own together (what its pre-flight said, and what summary.json
    # and the model card quote), not the new run's part alone.
    preflight = {p["site"]: p for p in summary["preflight"]}
    for site in summary["sites"]:
        entries = read_ledger(sites_dir / site["site"] / LEDGER_FILE)
        chain = reference_history_epsilon(
            [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
        )
        assert preflight[site["site"]]["epsilon"] == pytest.approx(chain, rel=0.02)
        assert site["epsilon"] == pytest.approx(chain, rel=0.02), site
    assert summary["final"]["epsilon_max"] == max(s["epsilon"] for s in summary["sites"])
    ledgers = [sites_dir / f"site-{i}" / LEDGER_FILE for i in range(3)]
    for run_dir in (dead_dir, new_dir):
        audit = audit_against_summary(ledgers, read_summary(run_dir))
        assert audit.ok, [f.message for a in audit.ledgers for f in a.findings] + [
            f.message for f in audit.findings
        ]
    # And as an auditor runs it: `fedsilo audit verify --summary` on both runs.
    for run_dir in (dead_dir, new_dir):
        done = fedsilo(
            "audit", "verify", *map(str, ledgers), "--summary", str(run_dir / "summary.json")
        )
        assert done.returncode == 0, done.stdout + done.stderr
