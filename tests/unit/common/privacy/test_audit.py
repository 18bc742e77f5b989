"""The auditor: a clean ledger verifies, and every kind of tampering is found."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from common.privacy.accounting import compute_epsilon
from common.privacy.audit import recompute_epsilon, verify_ledger
from common.privacy.events import SubsampledGaussianEvent
from common.privacy.identity import SiteIdentity, load_or_create_identity
from common.privacy.ledger import Finding, Ledger, read_ledger
from tests.unit.common.privacy.ledgers import (
    DATASET,
    DELTA,
    SITE,
    append,
    forge,
    kinds,
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


def test_without_a_key_signatures_are_reported_unchecked(ledger_path: Path) -> None:
    # Execute
    _, findings = verify_ledger(ledger_path)

    # Assert
    assert findings == [Finding(None, "no-key", findings[0].message)]


@pytest.mark.parametrize(("field", "value"), [("epsilon_run", "0.5"), ("noise_multiplier", "3.0")])
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
    append(Ledger(ledger_path, impostor), "run-b", 3, dataset_rounds=6)

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


def test_a_wrong_epsilon_correctly_signed_is_caught(
    ledger_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: the site itself understates its run's spend.
    append(
        Ledger(ledger_path, identity),
        "run-b",
        3,
        dataset_rounds=6,
        epsilon_run=prv_epsilon(3) * 0.8,
    )

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert [(f.entry, f.kind) for f in findings] == [(6, "epsilon-run")]


def test_a_round_order_violation_is_caught(ledger_path: Path, identity: SiteIdentity) -> None:
    # Prepare: a validly signed, correctly chained entry that repeats a round.
    last = read_ledger(ledger_path)[-1]
    repeat = forge(last, identity, prev_hash=last.entry_hash(), time=stamp(6))
    write_lines(ledger_path, [*lines(ledger_path), repeat.to_line()])

    # Execute
    _, findings = verify_ledger(ledger_path, identity.public_key)

    # Assert
    assert any(f.kind == "order" and f.entry == 6 for f in findings)
    assert not {"signature", "chain", "parse", "schema"} & kinds(findings)


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
    # Prepare: epsilon far above 64, where compute_epsilon records the RDP upper bound.
    event = SubsampledGaussianEvent(1.0, 1.0, 200)
    bound = compute_epsilon([event], DELTA)
    honest, low = tmp_path / "honest.jsonl", tmp_path / "low.jsonl"
    for path, epsilon in ((honest, bound), (low, 0.9 * recompute_epsilon([event], DELTA))):
        Ledger(path, identity).append(
            site_id=SITE,
            dataset=DATASET,
            run_id="run-a",
            round=1,
            event=event,
            clip_norm=1.0,
            delta=DELTA,
            epsilon_run=epsilon,
            epsilon_dataset=epsilon,
            budget=1000.0,
            code_version="test",
        )

    # Execute
    _, honest_findings = verify_ledger(honest, identity.public_key)
    _, low_findings = verify_ledger(low, identity.public_key)

    # Assert
    assert bound > 64
    assert honest_findings == []
    assert kinds(low_findings) == {"epsilon-run", "epsilon-dataset"}


def test_a_spend_above_the_recorded_budget_is_an_overspend(
    tmp_path: Path, identity: SiteIdentity
) -> None:
    # Prepare: honest epsilons, signed, but the site's budget was smaller than its spend.
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    for rnd in (1, 2):
        append(ledger, "run-a", rnd, dataset_rounds=rnd, budget=prv_epsilon(1) * 1.1)

    # Execute
    _, findings = verify_ledger(path, identity.public_key)

    # Assert: only the second entry overspends
    assert [(f.entry, f.kind) for f in findings] == [(2, "overspend")]
