"""The auditor: a clean ledger verifies, and every kind of tampering is found."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from common.privacy.accounting import compute_epsilon, filter_epsilon
from common.privacy.audit import (
    recompute_epsilon,
    recompute_filter_epsilon,
    verify_ledger,
)
from common.privacy.budget import PLAN_FIELDS
from common.privacy.errors import PrivacyError
from common.privacy.events import SubsampledGaussianEvent
from common.privacy.identity import SiteIdentity, load_or_create_identity
from common.privacy.ledger import Finding, Ledger, read_ledger
from tests.support.reference import reference_filter_epsilon
from tests.unit.common.privacy.ledgers import (
    DELTA,
    EVENT,
    append,
    append_v1,
    forge,
    kinds,
    lifetime_epsilon,
    lines,
    prv_epsilon,
    stamp,
    write_lines,
)


def test_clean_ledger_verifies_without_findings(ledger_path: Path, identity: SiteIdentity) -> None:
    # Execute
    entries, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert findings == []
    assert len(entries) == 5
    assert [e.schema for e in entries] == [2] * 5
    assert entries[-1].epsilon_lifetime == pytest.approx(lifetime_epsilon(5), rel=1e-12)


def test_without_a_key_signatures_are_reported_unchecked(ledger_path: Path) -> None:
    # Execute
    _, findings = verify_ledger(ledger_path)

    # Assert
    assert findings == [Finding(None, "no-key", findings[0].message)]


@pytest.mark.parametrize(
    ("field", "value"),
    [("epsilon_run", "0.5"), ("noise_multiplier", "3.0"), ("epsilon_lifetime", "0.5")],
)
def test_an_edited_number_is_caught(
    ledger_path: Path, identity: SiteIdentity, field: str, value: str
) -> None:
    # Prepare: edit one number in the file's text.
    content = lines(ledger_path)
    edited = re.sub(rf'"{field}":[^,}}]+', f'"{field}":{value}', content[1])
    assert edited != content[1]
    content[1] = edited
    write_lines(ledger_path, content)

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert Finding(2, "signature", "line 2: signature does not verify") in findings
    assert any(f.kind == "chain" and f.entry == 3 for f in findings)


def test_a_deleted_entry_breaks_the_chain(ledger_path: Path, identity: SiteIdentity) -> None:
    # Prepare
    content = lines(ledger_path)
    del content[2]
    write_lines(ledger_path, content)

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert [f.entry for f in findings if f.kind == "chain"] == [3]
    assert "signature" not in kinds(findings)


def test_swapped_entries_break_chain_and_order(ledger_path: Path, identity: SiteIdentity) -> None:
    # Prepare
    content = lines(ledger_path)
    content[1], content[2] = content[2], content[1]
    write_lines(ledger_path, content)

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert {"chain", "order"} <= kinds(findings)
    assert "signature" not in kinds(findings)


def test_a_truncated_file_is_a_parse_finding(ledger_path: Path, identity: SiteIdentity) -> None:
    # Prepare
    content = lines(ledger_path)
    last = content.pop()
    ledger_path.write_text("".join(line + "\n" for line in content) + last[: len(last) // 2])

    # Execute
    entries, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert len(entries) == 4
    assert [(f.entry, f.kind) for f in findings] == [(5, "parse")]
    assert "torn or incomplete" in findings[0].message


def test_an_entry_signed_by_another_key_is_caught(
    tmp_path: Path, ledger_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: an impostor continues the chain with its own key.
    impostor = load_or_create_identity(tmp_path / "impostor")
    append(Ledger(ledger_path, impostor), "run-b", 3)

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert [(f.entry, f.kind) for f in findings] == [(6, "signature")]


def test_a_rehashed_chain_without_the_key_is_caught(
    ledger_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: lower an epsilon and re-chain every later entry, keeping old signatures.
    entries = read_ledger(ledger_path)
    entries[1] = replace(entries[1], epsilon_run=entries[0].epsilon_run)
    for i in range(2, len(entries)):
        entries[i] = replace(entries[i], prev_hash=entries[i - 1].entry_hash())
    write_lines(ledger_path, [e.to_line() for e in entries])

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert "chain" not in kinds(findings)
    assert [f.entry for f in findings if f.kind == "signature"] == [2, 3, 4, 5]


def test_a_wrong_run_epsilon_correctly_signed_is_caught(
    ledger_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: the site itself understates its run's spend.
    append(Ledger(ledger_path, identity), "run-b", 3, epsilon_run=prv_epsilon(3) * 0.8)

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert [(f.entry, f.kind) for f in findings] == [(6, "epsilon-run")]
    assert "PLD" in findings[0].message


def test_an_understated_lifetime_epsilon_correctly_signed_is_caught(
    ledger_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: the site records its run's spend honestly but its lifetime spend as if
    # run-b were its only run (a fresh budget for every run).
    append(Ledger(ledger_path, identity), "run-b", 3, epsilon_lifetime=lifetime_epsilon(3))

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert [(f.entry, f.kind) for f in findings] == [(6, "epsilon-lifetime")]
    assert "RDP filter" in findings[0].message


def test_a_round_order_violation_is_caught(ledger_path: Path, identity: SiteIdentity) -> None:
    # Prepare: a validly signed, correctly chained entry that repeats a round.
    last = read_ledger(ledger_path)[-1]
    repeat = forge(
        last,
        identity,
        prev_hash=last.entry_hash(),
        time=stamp(6),
        epsilon_run=prv_epsilon(3),
        epsilon_lifetime=lifetime_epsilon(6),
    )
    write_lines(ledger_path, [*lines(ledger_path), repeat.to_line()])

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert any(f.kind == "order" and f.entry == 6 for f in findings)
    assert not {"signature", "chain", "parse", "schema", "epsilon-run"} & kinds(findings)


def test_another_site_and_a_backwards_clock_are_caught(
    ledger_path: Path, identity: SiteIdentity
) -> None:
    # Prepare
    last = read_ledger(ledger_path)[-1]
    other = forge(
        last, identity, site_id="site-2", run_id="run-c", prev_hash=last.entry_hash(), time=stamp(0)
    )
    write_lines(ledger_path, [*lines(ledger_path), other.to_line()])

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert {(f.entry, f.kind) for f in findings} >= {(6, "site"), (6, "order")}


def test_rdp_upper_bounds_above_64_pass_only_when_not_too_low(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: a run's epsilon far above 64, where compute_epsilon records the RDP bound.
    event = SubsampledGaussianEvent(1.0, 1.0, 200)
    bound = compute_epsilon([event], DELTA)
    honest, low = tmp_path / "honest.jsonl", tmp_path / "low.jsonl"
    for path, epsilon in ((honest, bound), (low, 0.9 * recompute_epsilon([event], DELTA))):
        append(Ledger(path, identity), "run-a", 1, event=event, epsilon_run=epsilon, budget=1000.0)

    # Execute
    _, honest_findings = verify_ledger(honest, identity.public_key)
    _, low_findings = verify_ledger(low, identity.public_key)

    # Assert
    assert bound > 64
    assert honest_findings == []
    assert kinds(low_findings) == {"epsilon-run"}


def test_a_spend_above_the_recorded_budget_is_an_overspend(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: honest epsilons, signed, but the site's budget was smaller than its spend.
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    for rnd in (1, 2):
        append(ledger, "run-a", rnd, budget=lifetime_epsilon(1) * 1.1)

    # Execute
    _, findings = verify_ledger(path, identity.public_key)

    # Assert: only the second entry overspends
    assert [(f.entry, f.kind) for f in findings] == [(2, "overspend")]


def test_an_overspend_hidden_within_the_epsilon_tolerance_is_caught(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: the site records exactly its budget as spent, 1% below the truth (within
    # the 2% an epsilon may be off); the budget has only numerical slack.
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    append(ledger, "run-a", 1)
    budget = lifetime_epsilon(2) / 1.01
    append(ledger, "run-a", 2, budget=budget, epsilon_lifetime=budget)

    # Execute
    _, findings = verify_ledger(path, identity.public_key)

    # Assert
    assert [(f.entry, f.kind) for f in findings] == [(2, "overspend")]
    assert "exceeds its budget" in findings[0].message


def test_a_disjoint_data_set_is_charged_with_its_own_and_every_site_wide_round(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: a site-wide round, a round on data set "a" (charged with both), a round on
    # data set "b" (charged with the site-wide one and itself only), a site-wide round
    # (charged with everything).
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    append(ledger, "run-s", 1)
    a = append(ledger, "run-a", 1, scope="data-set:a")
    b = append(ledger, "run-b", 1, scope="data-set:b")
    s = append(ledger, "run-s", 2)

    # Execute
    _, findings = verify_ledger(path, identity.public_key)

    # Assert
    assert findings == []
    assert a.epsilon_lifetime == pytest.approx(lifetime_epsilon(2), rel=1e-12)
    assert b.epsilon_lifetime == pytest.approx(lifetime_epsilon(2), rel=1e-12)
    assert s.epsilon_lifetime == pytest.approx(lifetime_epsilon(4), rel=1e-12)


def test_a_disjoint_data_set_that_ignores_site_wide_rounds_is_caught(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: the data set's entry leaves out the site-wide rounds before it.
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    for rnd in (1, 2, 3):
        append(ledger, "run-s", rnd)
    append(ledger, "run-a", 1, scope="data-set:a", epsilon_lifetime=lifetime_epsilon(1))

    # Execute
    _, findings = verify_ledger(path, identity.public_key)

    # Assert
    assert [(f.entry, f.kind) for f in findings] == [(4, "epsilon-lifetime")]


_CHANGED_PLAN: dict[str, object] = {
    "noise_multiplier": SubsampledGaussianEvent(1.6, 0.25, 4),
    "sample_rate": SubsampledGaussianEvent(1.5, 0.3, 4),
    "steps": SubsampledGaussianEvent(1.5, 0.25, 5),
    "rounds": 4,
    "clip_norm": 2.0,
    "epsilon_target": 5.0,
    "delta": 2e-5,
    "scope": "data-set:a",
    "public_size": 2000,
}


@pytest.mark.parametrize("name", PLAN_FIELDS)
def test_a_run_that_changes_its_frozen_plan_is_caught(
    tmp_path: Path, identity: SiteIdentity, name: str
) -> None:
    # Prepare: the run's second round, honestly accounted, changes one planned value.
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    append(ledger, "run-a", 1)
    change = _CHANGED_PLAN[name]
    kw = {"event": change} if isinstance(change, SubsampledGaussianEvent) else {name: change}
    append(ledger, "run-a", 2, **kw)

    # Execute
    _, findings = verify_ledger(path, identity.public_key)

    # Assert
    assert [(f.entry, f.kind) for f in findings] == [(2, "plan")]
    assert name in findings[0].message


def test_a_run_with_more_rounds_than_planned_is_caught(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: a run planned for two rounds records three (rounds 0, 1 and 2).
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    for rnd in (0, 1, 2):
        append(ledger, "run-a", rnd, rounds=2)

    # Execute
    _, findings = verify_ledger(path, identity.public_key)

    # Assert
    assert [(f.entry, f.kind) for f in findings] == [(3, "plan")]
    assert "planned 2 rounds" in findings[0].message


def test_schema_1_entries_keep_their_per_data_set_checks(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: an older ledger, then the same site's schema 2 rounds after it.
    honest, low = tmp_path / "honest.jsonl", tmp_path / "low.jsonl"
    for path in (honest, low):
        append_v1(path, identity, "run-old", 1)
    append_v1(honest, identity, "run-old", 2)
    append_v1(low, identity, "run-old", 2, epsilon_dataset=prv_epsilon(1))
    for path in (honest, low):
        append(Ledger(path, identity), "run-new", 1, time=stamp(9))

    # Execute
    _, honest_findings = verify_ledger(honest, identity.public_key)
    _, low_findings = verify_ledger(low, identity.public_key)

    # Assert: the schema 2 entry's lifetime composes the schema 1 rounds too.
    assert honest_findings == []
    assert read_ledger(honest)[-1].epsilon_lifetime == pytest.approx(lifetime_epsilon(3))
    assert [(f.entry, f.kind) for f in low_findings] == [(2, "epsilon-dataset")]


def test_a_schema_2_entry_that_leaves_out_schema_1_rounds_is_caught(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    append_v1(path, identity, "run-old", 1)
    append_v1(path, identity, "run-old", 2)
    append(Ledger(path, identity), "run-new", 1, epsilon_lifetime=lifetime_epsilon(1))

    # Execute
    _, findings = verify_ledger(path, identity.public_key)

    # Assert
    assert [(f.entry, f.kind) for f in findings] == [(3, "epsilon-lifetime")]


def test_a_schema_1_overspend_of_the_data_sets_budget_is_caught(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    append_v1(path, identity, "run-old", 1, budget=prv_epsilon(1) * 1.1)
    append_v1(path, identity, "run-old", 2, budget=prv_epsilon(1) * 1.1)

    # Execute
    _, findings = verify_ledger(path, identity.public_key)

    # Assert
    assert [(f.entry, f.kind) for f in findings] == [(2, "overspend")]
    assert "per-data-set budget" in findings[0].message


def _body(ledger_path: Path) -> dict[str, object]:
    return dict(read_ledger(ledger_path)[-1].body())


_HUGE = 10**400


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("noise_multiplier", _HUGE, "schema"),  # once an OverflowError in from_dict
        ("epsilon_lifetime", -_HUGE, "schema"),
        ("budget", _HUGE, "schema"),
        ("steps", _HUGE, "epsilon-run"),  # a valid entry no accountant can compose
        ("round", _HUGE, "schema"),
        ("rounds", _HUGE, "signature"),
        ("public_size", _HUGE, "signature"),
        ("schema", [2], "schema"),
        ("schema", _HUGE, "schema"),
        ("steps", "4", "schema"),
        ("steps", 4.0, "schema"),
        ("steps", True, "schema"),
        ("scope", 5, "schema"),
        ("scope", "data-set:../../x", "schema"),
        ("epsilon_lifetime", "0.5", "schema"),
        ("epsilon_lifetime", None, "schema"),
        ("epsilon_dataset", 1.0, "schema"),
        ("time", 12, "schema"),
        ("time", "yesterday", "schema"),
        ("site_id", {"a": 1}, "schema"),
        ("dataset", ["x"], "schema"),
        ("noise_multiplier", 1e-300, "epsilon-run"),
        ("noise_multiplier", 1e300, "epsilon-run"),
        ("sample_rate", 5e-324, "epsilon-run"),
        ("delta", 1e-300, "signature"),
        ("signature", 7, "schema"),
        ("signature", "not base64!", "signature"),
    ],
)
def test_malformed_values_are_findings_never_crashes(
    ledger_path: Path, identity: SiteIdentity, field: str, value: object, kind: str
) -> None:
    # Prepare: the last entry rewritten with one absurd value (its signature then fails
    # unless the value is re-signed, which the audit cannot tell from honesty).
    body = _body(ledger_path)
    body[field] = value
    content = lines(ledger_path)
    content[-1] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    write_lines(ledger_path, content)

    # Execute
    entries, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert kind in kinds(findings)
    assert len(entries) in (4, 5)


def test_a_huge_step_count_validly_signed_is_a_finding(
    ledger_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: a signed, chained entry whose numbers no accountant composes.
    last = read_ledger(ledger_path)[-1]
    huge = forge(
        last,
        identity,
        run_id="run-c",
        round=1,
        steps=_HUGE,
        prev_hash=last.entry_hash(),
        time=stamp(6),
    )
    write_lines(ledger_path, [*lines(ledger_path), huge.to_line()])

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert {(f.entry, f.kind) for f in findings} == {(6, "epsilon-run"), (6, "epsilon-lifetime")}
    assert all("cannot recompute" in f.message for f in findings)


def test_a_line_nested_too_deeply_is_a_finding(ledger_path: Path, identity: SiteIdentity) -> None:
    # Prepare
    write_lines(ledger_path, [*lines(ledger_path), "[" * 200_000 + "]" * 200_000])

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert "parse" in kinds(findings)


@pytest.mark.parametrize(
    "history",
    [
        [(1.5, 0.25, 4)],
        [(1.5, 0.25, 20)],
        [(0.9, 0.01, 3000)],
        [(5.0, 0.5, 3)],
        [(1.2, 0.05, 100), (2.0, 0.1, 40), (1.2, 0.05, 100)],
        [(20.0, 0.01, 10_000)],
    ],
)
def test_the_independent_filter_agrees_with_the_sites_filter(
    history: list[tuple[float, float, int]],
) -> None:
    # Prepare
    events = [SubsampledGaussianEvent(*h) for h in history]

    # Execute
    independent = recompute_filter_epsilon(events, DELTA)
    sites = filter_epsilon(events, DELTA)

    # Assert: Google's RDP accountant, used as the brief says, gives the site's number.
    assert independent == pytest.approx(reference_filter_epsilon(history, DELTA), rel=1e-12)
    assert independent == pytest.approx(sites, rel=1e-6)
    assert 0 < sites <= 16


def test_recompute_epsilon_matches_the_sites_prv_and_refuses_the_absurd() -> None:
    assert recompute_epsilon([], DELTA) == 0.0
    assert recompute_epsilon([EVENT] * 5, DELTA) == pytest.approx(prv_epsilon(5), rel=0.02)
    with pytest.raises(PrivacyError, match="beyond what the auditor recomputes"):
        recompute_epsilon([SubsampledGaussianEvent(0.5, 1.0, 10**6)], DELTA)
