"""The privacy ledger: durable signed appends, and every kind of tampering found."""

from __future__ import annotations

import base64
import os
import re
import stat
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest

from common.privacy.accounting import SubsampledGaussianEvent, compute_epsilon
from common.privacy.ledger import (
    ZERO_HASH,
    Finding,
    Ledger,
    LedgerEntry,
    LedgerError,
    SiteIdentity,
    dataset_fingerprint,
    load_or_create_identity,
    load_public_key,
    read_ledger,
    recompute_epsilon,
    spent_events,
    verify_ledger,
)

DELTA = 1e-5
EVENT = SubsampledGaussianEvent(1.5, 0.25, 4)
DATASET = dataset_fingerprint(["good film", "bad film"], [1, 0])
SITE = "site-1"
# (run_id, round) of the clean ledger: two runs on one data set.
PLAN = [("run-a", 1), ("run-a", 2), ("run-a", 3), ("run-b", 1), ("run-b", 2)]


@cache
def prv_epsilon(rounds: int) -> float:
    """Opacus PRV, as a site computes it, for ``rounds`` rounds of EVENT."""
    return compute_epsilon([EVENT] * rounds, DELTA)


def stamp(second: int) -> str:
    return f"2025-01-01T00:00:{second:02d}.000000+00:00"


def append(ledger: Ledger, run_id: str, rnd: int, *, dataset_rounds: int, **kw: object) -> None:
    run_rounds = sum(1 for e in ledger.entries() if e.run_id == run_id) + 1
    values: dict[str, object] = {
        "site_id": SITE,
        "dataset": DATASET,
        "run_id": run_id,
        "round": rnd,
        "event": EVENT,
        "clip_norm": 1.0,
        "delta": DELTA,
        "epsilon_run": prv_epsilon(run_rounds),
        "epsilon_dataset": prv_epsilon(dataset_rounds),
        "budget": 8.0,
        "code_version": "test",
        "time": stamp(dataset_rounds),
    }
    values.update(kw)
    ledger.append(**values)  # type: ignore[arg-type]


@pytest.fixture
def identity(tmp_path: Path) -> SiteIdentity:
    return load_or_create_identity(tmp_path / "keys")


@pytest.fixture
def ledger_path(tmp_path: Path, identity: SiteIdentity) -> Path:
    """A clean ledger of five realistic entries."""
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, identity)
    for i, (run_id, rnd) in enumerate(PLAN, start=1):
        append(ledger, run_id, rnd, dataset_rounds=i)
    return path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write_lines(path: Path, content: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in content))


def forge(entry: LedgerEntry, signer: SiteIdentity, **changes: object) -> LedgerEntry:
    """An entry changed and then validly signed by ``signer``."""
    changed = replace(entry, **changes)  # type: ignore[arg-type]
    signature = base64.b64encode(signer.sign(changed.signed_bytes())).decode()
    return replace(changed, signature=signature)


def kinds(findings: list[Finding]) -> set[str]:
    return {f.kind for f in findings}


# ---- identity ---------------------------------------------------------------------


def test_identity_is_created_once_with_private_permissions(tmp_path: Path) -> None:
    # Prepare
    directory = tmp_path / "keys"

    # Execute
    identity = load_or_create_identity(directory)

    # Assert
    key, pub = directory / "identity.key", directory / "identity.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert b"BEGIN PRIVATE KEY" in key.read_bytes()
    assert pub.read_bytes() == identity.public_key_pem()
    assert sorted(p.name for p in directory.iterdir()) == ["identity.key", "identity.pub"]
    load_public_key(pub).verify(identity.sign(b"round 1"), b"round 1")


def test_identity_reloads_and_never_overwrites_the_key(tmp_path: Path) -> None:
    # Prepare
    first = load_or_create_identity(tmp_path)
    key_bytes = (tmp_path / "identity.key").read_bytes()

    # Execute
    second = load_or_create_identity(tmp_path)

    # Assert
    assert second.public_key_pem() == first.public_key_pem()
    assert (tmp_path / "identity.key").read_bytes() == key_bytes


def test_corrupt_key_is_refused_by_name_and_left_alone(tmp_path: Path) -> None:
    # Prepare
    key = tmp_path / "identity.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")

    # Execute
    with pytest.raises(LedgerError, match=r"identity\.key") as caught:
        load_or_create_identity(tmp_path)

    # Assert
    assert "corrupt" in str(caught.value)
    assert key.read_bytes() == b"-----BEGIN PRIVATE KEY-----\ngarbage\n"


def test_bad_public_key_file_is_named(tmp_path: Path) -> None:
    # Prepare
    pub = tmp_path / "site.pub"
    pub.write_text("not a key")

    # Execute / Assert
    with pytest.raises(LedgerError, match=r"site\.pub"):
        load_public_key(pub)
    with pytest.raises(LedgerError, match=r"missing\.pub"):
        load_public_key(tmp_path / "missing.pub")


# ---- appending and reading ----------------------------------------------------------


def test_append_and_read_round_trip(ledger_path: Path, identity: SiteIdentity) -> None:
    # Execute
    entries = read_ledger(ledger_path)

    # Assert
    assert [(e.run_id, e.round) for e in entries] == PLAN
    assert [e.to_line() for e in entries] == lines(ledger_path)
    assert entries[0].prev_hash == ZERO_HASH
    assert [e.prev_hash for e in entries[1:]] == [e.entry_hash() for e in entries[:-1]]
    assert entries[0].event == EVENT
    assert entries[4].epsilon_dataset == prv_epsilon(5)
    assert Ledger(ledger_path, identity).entries() == entries
    for e in entries:
        identity.public_key.verify(base64.b64decode(e.signature), e.signed_bytes())


def test_append_fsyncs_the_line_before_returning(
    tmp_path: Path, identity: SiteIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record what the file held at each fsync.
    path = tmp_path / "ledger.jsonl"
    seen: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        seen.append(path.read_text() if path.exists() else "")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)

    # Execute
    append(Ledger(path, identity), "run-a", 1, dataset_rounds=1)

    # Assert: the flushed line was on its way to disk before append returned.
    assert any(text.endswith("\n") and text.count("\n") == 1 for text in seen)


def test_append_refuses_after_a_torn_last_line(ledger_path: Path, identity: SiteIdentity) -> None:
    # Prepare
    text = ledger_path.read_text()
    torn = text[: len(text) - len(lines(ledger_path)[-1]) // 2]
    ledger_path.write_text(torn)

    # Execute
    with pytest.raises(LedgerError, match="torn or incomplete") as caught:
        append(Ledger(ledger_path, identity), "run-b", 3, dataset_rounds=6)

    # Assert: nothing repaired, nothing dropped.
    assert "line 5" in str(caught.value)
    assert ledger_path.read_text() == torn


def test_append_refuses_a_round_that_does_not_advance(
    ledger_path: Path, identity: SiteIdentity
) -> None:
    # Prepare
    before = ledger_path.read_bytes()

    # Execute
    with pytest.raises(LedgerError, match="round 2"):
        append(Ledger(ledger_path, identity), "run-a", 2, dataset_rounds=6)

    # Assert
    assert ledger_path.read_bytes() == before


def test_read_ledger_is_strict(tmp_path: Path, ledger_path: Path) -> None:
    # Prepare
    content = lines(ledger_path)
    content[1] = content[1].replace('"accountant":', '"extra":1,"accountant":')
    content[2] = content[2].replace('"clip_norm":1.0,', "")
    bad = tmp_path / "bad.jsonl"

    # Execute / Assert
    write_lines(bad, content)
    with pytest.raises(LedgerError, match=r"line 2: unknown fields \['extra'\]"):
        read_ledger(bad)
    write_lines(bad, [content[0], content[2]])
    with pytest.raises(LedgerError, match=r"line 2: missing fields \['clip_norm'\]"):
        read_ledger(bad)
    write_lines(bad, [content[0], "{not json", content[3]])
    with pytest.raises(LedgerError, match="line 2: not valid JSON"):
        read_ledger(bad)
    with pytest.raises(LedgerError, match="no ledger file"):
        read_ledger(tmp_path / "absent.jsonl")
    assert read_ledger(tmp_path / "absent.jsonl", missing_ok=True) == []


def test_spent_events_rebuild_a_data_sets_spend(ledger_path: Path) -> None:
    # Execute
    events = spent_events(read_ledger(ledger_path), DATASET)

    # Assert
    assert events == [EVENT] * 5
    assert spent_events(read_ledger(ledger_path), "f" * 64) == []
    assert recompute_epsilon([], DELTA) == 0.0
    assert recompute_epsilon(events, DELTA) == pytest.approx(prv_epsilon(5), rel=0.02)


def test_fingerprint_is_order_independent() -> None:
    # Prepare
    texts, labels = ["a", "b", "c", "b"], [0, 1, 1, 1]

    # Execute
    fingerprint = dataset_fingerprint(texts, labels)
    shuffled = dataset_fingerprint(texts[::-1], labels[::-1])

    # Assert
    assert fingerprint == shuffled
    assert len(fingerprint) == 64
    assert dataset_fingerprint(texts, [0, 1, 1, 0]) != fingerprint
    assert dataset_fingerprint(texts[:3], labels[:3]) != fingerprint  # duplicates count


# ---- auditing ---------------------------------------------------------------------


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
