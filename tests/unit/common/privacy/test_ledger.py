"""The privacy ledger: durable signed appends, strict reading, the data-set fingerprint."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest

from common.privacy.audit import recompute_epsilon
from common.privacy.errors import LedgerError
from common.privacy.identity import SiteIdentity
from common.privacy.ledger import (
    ZERO_HASH,
    Ledger,
    dataset_fingerprint,
    file_digest,
    read_ledger,
    row_digest,
    spent_events,
)
from tests.unit.common.privacy.ledgers import (
    DATASET,
    DELTA,
    EVENT,
    PLAN,
    append,
    lifetime_epsilon,
    lines,
    prv_epsilon,
    write_lines,
)


def test_append_and_read_round_trip(ledger_path: Path, identity: SiteIdentity) -> None:
    # Execute
    entries = read_ledger(ledger_path)

    # Assert
    assert [(e.run_id, e.round) for e in entries] == PLAN
    assert [e.to_line() for e in entries] == lines(ledger_path)
    assert entries[0].prev_hash == ZERO_HASH
    assert [e.prev_hash for e in entries[1:]] == [e.entry_hash() for e in entries[:-1]]
    assert entries[0].event == EVENT
    assert entries[4].epsilon_lifetime == lifetime_epsilon(5)
    assert entries[4].schema == 2 and entries[4].scope == "site"
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


def test_fingerprint_is_order_independent_and_keyed() -> None:
    # Prepare
    texts, labels = ["a", "b", "c", "b"], [0, 1, 1, 1]
    key, other_key = bytes(range(32)), bytes(range(1, 33))

    # Execute
    digest = row_digest(texts, labels)
    fingerprint = dataset_fingerprint(key, digest)

    # Assert: order-independent content, keyed by the site's secret
    assert row_digest(texts[::-1], labels[::-1]) == digest
    assert row_digest(texts, [0, 1, 1, 0]) != digest
    assert row_digest(texts[:3], labels[:3]) != digest  # duplicates count
    assert len(fingerprint) == 64
    assert dataset_fingerprint(other_key, digest) != fingerprint
    assert fingerprint not in (digest.hex(), hashlib.sha256(digest).hexdigest())
    with pytest.raises(LedgerError, match="32 bytes"):
        dataset_fingerprint(b"short", digest)


def test_a_file_is_fingerprinted_by_its_bytes_without_parsing(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_bytes(b"text,label\n\xff not even utf-8,fresh\n")
    assert file_digest(path) == hashlib.sha256(b"fedsilo-file-v1\n" + path.read_bytes()).digest()


def test_a_line_nested_too_deeply_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(LedgerError, match="nested too deeply"):
        read_ledger(path)
