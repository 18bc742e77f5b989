"""The coordinator as adversary, with the run-config knobs added for day-to-day running:
``rehearsal``, the pre-flight, the site's ``epsilon-reserve`` and ``resume`` (with
``resumes-run`` / ``resume-round``). Each test is one attack; the docstring of each
says what the site must do."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

import client.round as round_module
from client.reply import train_round
from client.round import SiteState, preflight, run_round
from client.settings import SiteSettings
from common.codec import decode_train, encode_train
from common.config import RunConfig
from common.messages import REHEARSAL_NOTE, RoundPlan, SiteReport, TrainRequest, WireError
from common.model import build_model, model_spec
from common.privacy.audit import verify_ledger
from common.privacy.identity import init_state
from common.privacy.ledger import LEDGER_FILE, read_ledger
from common.secure_random import SecureRandom
from common.task import run_task
from tests.support.reference import reference_filter_epsilon, reference_history_epsilon

SIM = {"partition-id": 3, "num-partitions": 20, "epsilon": 20.0}


@pytest.fixture
def cfg(tmp_path: Path) -> RunConfig:
    return RunConfig(
        num_server_rounds=3,
        max_length=16,
        batch_size=64,
        epsilon=4.0,
        clip_norm=1.0,
        learning_rate=0.5,
        sites_dir=str(tmp_path / "sites"),
    )


def _arrays(cfg: RunConfig) -> dict[str, torch.Tensor]:
    return build_model(model_spec(run_task(cfg)), seed=0).trainable_state()


def _round(
    rnd: int, cfg: RunConfig, node: dict[str, Any], run_id: str
) -> tuple[SiteReport, dict[str, torch.Tensor] | None]:
    return run_round(
        RoundPlan(rnd, cfg),
        _arrays(cfg),
        SiteSettings.from_node_config(node, cfg),
        SiteState(),
        run_id=run_id,
        rng=SecureRandom(bytes([rnd]) * 32),
    )


def _site_file(path: Path, rows: int, secret: str = "") -> Path:
    path.write_text(
        "text,label\n"
        + "".join(f"review {secret}{i},{'fresh' if i % 2 else 'rotten'}\n" for i in range(rows))
    )
    return path


def _deployed(folder: Path, rows: int, **extra: Any) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    state = folder / "state"
    init_state(state, site_id="bank-a")
    return {
        "data-path": str(_site_file(folder / "site.csv", rows, secret=folder.name)),
        "site-id": "bank-a",
        "epsilon": 8.0,
        "data-size": 400,
        "state-dir": str(state),
        **extra,
    }


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _no_data(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way the round module reaches a site's rows or its held-out pin, made to
    record the call and raise."""
    touched: list[str] = []

    def trap(name: str) -> Any:
        def _raise(*_: Any, **__: Any) -> Any:
            touched.append(name)
            raise AssertionError(f"{name} called")

        return _raise

    for name in ("load_site_data", "site_holdout", "file_digest"):
        monkeypatch.setattr(round_module, name, trap(name))
    return touched


def _public(report: SiteReport) -> dict[str, Any]:
    return {k: v for k, v in vars(report).items() if k not in ("identity",)}


# ---- pre-flight ----------------------------------------------------------------------


def test_a_preflight_at_a_deployed_site_writes_nothing_and_reads_no_data(
    cfg: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: use the pre-flight as a free probe. The site must not load, hash or pin
    anything of its data, must not write its state folder, and two sites with the same
    declared size but different files must answer the same."""
    a, b = _deployed(tmp_path / "a", 300), _deployed(tmp_path / "b", 390)
    before = {k: _snapshot(Path(n["state-dir"])) for k, n in (("a", a), ("b", b))}
    touched = _no_data(monkeypatch)
    plan = RoundPlan(1, cfg, preflight=True)
    reports = [
        preflight(plan, _arrays(cfg), SiteSettings.from_node_config(n, cfg), run_id="r1")
        for n in (a, b)
    ]
    assert touched == []
    assert all(r.status == "ok" for r in reports), [r.reason for r in reports]
    assert _public(reports[0]) == _public(reports[1])
    assert {k: _snapshot(Path(n["state-dir"])) for k, n in (("a", a), ("b", b))} == before


def test_a_plan_both_preflight_and_evaluation_is_refused_on_the_wire(cfg: RunConfig) -> None:
    """Attack: a pre-flight that is also an evaluation, to get counts without a charge.
    Neither side can build it, and the codec refuses one built by hand."""
    with pytest.raises(ValueError, match="not both"):
        RoundPlan(1, cfg, evaluate=True, preflight=True)
    content = encode_train(TrainRequest(RoundPlan(1, cfg, evaluate=True), _arrays(cfg)))
    content.config_records["plan"]["plan-preflight"] = True
    with pytest.raises(WireError, match="both an evaluation and one"):
        decode_train(content)


def test_a_preflight_for_a_no_dp_plan_at_a_dp_only_site_says_refused(
    cfg: RunConfig, tmp_path: Path
) -> None:
    """The pre-flight should say what the round will do: a site that requires DP will
    refuse a no-DP plan, so its pre-flight answer should not be 'ok'."""
    node = _deployed(tmp_path / "a", 300)
    no_dp = cfg.with_overrides({"dp": False})
    report = preflight(
        RoundPlan(1, no_dp, preflight=True),
        _arrays(cfg),
        SiteSettings.from_node_config(node, no_dp),
        run_id="r1",
    )
    assert report.status == "refused", report


# ---- rehearsal -----------------------------------------------------------------------


def test_rehearsal_rounds_mixed_into_a_real_run_touch_no_data_and_the_real_ones_are_charged(
    cfg: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: one run id, rehearsal on round 1, off on round 2, on again on round 3,
    hoping that a rehearsal round reads the data uncharged, or that the real round
    escapes the plan or the ledger."""
    a, b = _deployed(tmp_path / "a", 300), _deployed(tmp_path / "b", 390)
    rehearse = cfg.with_overrides({"rehearsal": True})
    real_load = round_module.load_site_data
    touched = _no_data(monkeypatch)
    r1 = [_round(1, rehearse, n, "mix")[0] for n in (a, b)]
    assert touched == []
    assert all(r.status == "ok" and r.reason == REHEARSAL_NOTE and r.epsilon == 0 for r in r1)
    assert _public(r1[0]) == _public(r1[1])  # nothing of either file in the reply
    assert not (Path(a["state-dir"]) / LEDGER_FILE).exists()
    monkeypatch.undo()
    monkeypatch.setattr(round_module, "load_site_data", real_load)
    r2, _ = _round(2, cfg, a, "mix")
    assert r2.status == "ok" and r2.epsilon > 0
    r3, _ = _round(3, rehearse, a, "mix")
    assert r3.epsilon == 0
    entries = read_ledger(Path(a["state-dir"]) / LEDGER_FILE)
    assert [(e.run_id, e.round) for e in entries] == [("mix", 2)]
    _, findings = verify_ledger(Path(a["state-dir"]) / LEDGER_FILE)
    assert [f.kind for f in findings] == ["no-key"]


def test_a_rehearsal_never_opens_the_sites_data_even_without_dp(
    cfg: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: ``rehearsal = true`` with ``dp = false`` at a site that allows no-DP runs
    (its labelled baseline). The coordinator's outputs say REHEARSAL ('public stand-in
    data, no result says anything about the sites' data'); the site must then not
    train on its own rows."""
    node = _deployed(tmp_path / "a", 300, **{"allow-no-dp": True})
    try:
        plan = cfg.with_overrides({"rehearsal": True, "dp": False})
    except ValueError:
        return  # such a plan does not parse: the site refuses it on the wire
    touched = _no_data(monkeypatch)
    try:
        report, _ = _round(1, plan, node, "r1")
    except AssertionError:
        report = None
    assert touched == [], f"the rehearsal read the site's data: {touched}"
    assert report is not None and report.reason == REHEARSAL_NOTE


# ---- resume --------------------------------------------------------------------------


def _events(entries: list[Any]) -> list[tuple[float, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]


def _resumed(cfg: RunConfig, runs: str, after: int) -> RunConfig:
    return cfg.with_overrides({"resumes-run": runs, "resume-round": after})


def test_lying_about_resume_round_buys_no_epsilon(cfg: RunConfig) -> None:
    """Attack: run A dies after 2 charged rounds; the coordinator 'resumes' it claiming
    only 1 round finished (so 2 more are planned). The continued runs' entries count as
    spent whatever it claims: A and B together stay within the target (Google's PLD),
    and the lifetime filter within the budget."""
    for rnd in (1, 2):
        assert _round(rnd, cfg, SIM, "A")[0].status == "ok"
    b = _resumed(cfg, "A", 1)
    reports = [_round(rnd, b, SIM, "B")[0] for rnd in (2, 3)]
    assert all(r.status == "ok" for r in reports)
    assert _round(4, b.with_overrides({"num-server-rounds": 4}), SIM, "B")[0].status == "refused"
    entries = read_ledger(Path(cfg.sites_dir) / "site-3" / LEDGER_FILE)
    assert [(e.run_id, e.round) for e in entries] == [("A", 1), ("A", 2), ("B", 1), ("B", 2)]
    assert reference_history_epsilon(_events(entries)) <= cfg.epsilon * 1.02
    assert reference_filter_epsilon(_events(entries)) <= entries[-1].budget


def test_a_resumed_round_at_or_before_the_resume_point_is_refused_uncharged(
    cfg: RunConfig,
) -> None:
    """Attack: plan.round <= resume-round (ledger round 0 or below)."""
    b = _resumed(cfg, "A", 2)
    for rnd in (1, 2):
        report, update = _round(rnd, b, SIM, "B")
        assert report.status == "refused" and update is None
    assert not (Path(cfg.sites_dir) / "site-3" / LEDGER_FILE).exists()


def test_shifting_resume_round_within_a_run_cannot_repeat_a_ledger_round(cfg: RunConfig) -> None:
    """Attack: keep num-server-rounds - resume-round (the frozen planned rounds) equal
    while moving resume-round, so that a later round maps to ledger round 1 again."""
    assert _round(1, cfg, SIM, "R")[0].status == "ok"
    shifted = cfg.with_overrides({"num-server-rounds": 4, "resumes-run": "X", "resume-round": 1})
    report, update = _round(2, shifted, SIM, "R")  # ledger round 2 - 1 = 1 again
    assert report.status == "refused" and update is None
    assert "rounds must increase" in report.reason
    entries = read_ledger(Path(cfg.sites_dir) / "site-3" / LEDGER_FILE)
    assert [(e.run_id, e.round) for e in entries] == [("R", 1)]


def test_a_resumed_run_reports_the_epsilon_of_what_it_continues(cfg: RunConfig) -> None:
    """The model a resumed run ends with was trained by the dead run's rounds and its
    own. Its pre-flight reports the two together (PRV after the continued run's
    entries); its rounds, its ledger entries and therefore its summary and model card
    report only its own part. The published run epsilon of a resumed run should be the
    continued chain's (what the plan's target bounds), as the pre-flight says."""
    for rnd in (1, 2):  # A charged 2 rounds; its checkpoint is after round 1
        assert _round(rnd, cfg, SIM, "A")[0].status == "ok"
    b = _resumed(cfg, "A", 1)
    settings = SiteSettings.from_node_config(SIM, b)
    told = preflight(RoundPlan(2, b, preflight=True), _arrays(cfg), settings, run_id="B")
    last = [_round(rnd, b, SIM, "B")[0] for rnd in (2, 3)][-1]
    entries = read_ledger(Path(cfg.sites_dir) / "site-3" / LEDGER_FILE)
    chain = reference_history_epsilon(_events(entries))
    assert told.epsilon == pytest.approx(chain, rel=0.02)  # the pre-flight: the chain
    assert last.epsilon == pytest.approx(told.epsilon, rel=0.02), (
        f"pre-flight said {told.epsilon:.3f} for the run, its last round reports "
        f"{last.epsilon:.3f}; A and B together spent {chain:.3f}"
    )


def test_a_refusal_reason_names_no_path_or_data(cfg: RunConfig, tmp_path: Path) -> None:
    """A pre-flight refusal travels in words: they must be the site's own accounting
    text, not its file's path or content."""
    node = _deployed(tmp_path / "a", 300, epsilon=2.0, **{"eval-epsilon": 0.5})
    report = preflight(
        RoundPlan(1, cfg, preflight=True),
        _arrays(cfg),
        SiteSettings.from_node_config(node, cfg),
        run_id="r1",
    )
    assert report.status == "refused" and report.reason.startswith("budget spent: ")
    assert str(tmp_path) not in report.reason and "review" not in report.reason
    assert hashlib.sha256(report.reason.encode()).hexdigest()  # plain text


# ---- evaluation: rehearsal and resume ---------------------------------------------------


def _evaluate(cfg: RunConfig, node: dict[str, Any], rnd: int, run_id: str) -> Any:
    from client.evaluation import evaluate_round

    return evaluate_round(
        RoundPlan(rnd, cfg, evaluate=True),
        _arrays(cfg),
        SiteSettings.from_node_config(node, cfg),
        run_id=run_id,
        rng=SecureRandom.fresh(),
    )


def test_a_rehearsal_evaluation_reads_no_held_out_row_and_pins_nothing(
    cfg: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: an evaluation round in a rehearsal, hoping for exact or cheap counts of
    the held-out share: the counts must be the stand-in's, the state folder untouched."""
    import client.evaluation as evaluation_module

    plan = cfg.with_overrides({"evaluation": "federated", "rehearsal": True})
    a, b = _deployed(tmp_path / "a", 300), _deployed(tmp_path / "b", 390)
    before = _snapshot(Path(a["state-dir"]))
    for name in ("load_site_data", "site_holdout", "file_digest"):
        monkeypatch.setattr(evaluation_module, name, lambda *_, n=name, **__: pytest.fail(n))
    (ra, ca), (rb, _) = _evaluate(plan, a, 3, "r"), _evaluate(plan, b, 3, "r")
    assert ra.status == rb.status == "ok" and ra.epsilon == 0 and ca is not None
    assert _public(ra) == _public(rb)
    assert _snapshot(Path(a["state-dir"])) == before


def test_a_resumed_run_may_not_release_evaluations_of_rounds_before_its_resume_point(
    cfg: RunConfig, tmp_path: Path
) -> None:
    """Attack: run A released the evaluation after round 1, then 'died'; B resumes it
    after round 1 and asks for the evaluation of round 1 again (and every later one).
    Training refuses rounds at or before resume-round; evaluation does not, and B's
    evaluation noise ignores A's releases, so A and B together release 4 evaluations of
    a 3-evaluation plan, past the plan's evaluation target (only the site's eval cap,
    a lifetime bound, still holds)."""
    node = _deployed(tmp_path / "a", 300, **{"eval-epsilon": 8.0})
    plan = cfg.with_overrides({"evaluation": "federated", "eval-every": 1, "eval-epsilon": 1.0})
    assert _evaluate(plan, node, 1, "A")[0].status == "ok"
    b = _resumed(plan, "A", 1)
    report, counts = _evaluate(b, node, 1, "B")
    assert report.status == "refused" and counts is None, (
        f"round 1 released again after resume-round 1 (epsilon {report.epsilon:.3f})"
    )
    assert all(_evaluate(b, node, rnd, "B")[0].status == "ok" for rnd in (2, 3))
    entries = read_ledger(Path(node["state-dir"]) / LEDGER_FILE)
    assert [e.run_id for e in entries] == ["A/eval", "B/eval", "B/eval"]
    assert reference_history_epsilon(_events(entries)) <= 1.0 * 1.02


def test_a_preflight_carrying_a_secure_setup_is_answered_as_a_preflight_only(
    cfg: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: a pre-flight that also carries a secure-aggregation setup (and the
    site's pending session), hoping the site trains, masks or charges. The site answers
    the pre-flight and nothing else, and ends the pending session."""
    node = _deployed(tmp_path / "a", 300)
    touched = _no_data(monkeypatch)
    before = _snapshot(Path(node["state-dir"]))
    request = TrainRequest(RoundPlan(1, cfg, preflight=True), _arrays(cfg), setup=object())  # type: ignore[arg-type]
    reply, pending = train_round(
        request,
        SiteSettings.from_node_config(node, cfg),
        SiteState(),
        run_id="r1",
        pending=object(),  # type: ignore[arg-type]
    )
    assert reply.preflight and reply.update is None and reply.masked is None
    assert reply.report.status == "ok" and pending is None and touched == []
    assert _snapshot(Path(node["state-dir"])) == before
