"""Run outputs, typed: summaries round-trip, old runs stay readable, newer or damaged
files are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.outputs import (
    SUMMARY_VERSION,
    RunOutputError,
    read_model,
    read_summary,
    write_summary,
)
from tests.support import summaries

FIXTURES = Path(__file__).parent / "fixtures"
# A run made by fedsilo's first version (commit 9f9b7ec): no ledger heads, uploads,
# stage times or secure-aggregation keys yet.
OLD_RUN = FIXTURES / "run-v1-9f9b7ec"


def test_a_summary_reads_back_as_written(tmp_path: Path) -> None:
    sites = (summaries.site("site-0", 3.9), summaries.site("site-1", 4.0))
    for summary in (
        summaries.federated(0.7, sites=sites, rounds=3),
        summaries.federated(0.6, dp=False, sites=(summaries.site("site-0", None),)),
        summaries.central(0.8),
    ):
        write_summary(tmp_path, summary)
        assert read_summary(tmp_path) == summary
        assert read_summary(tmp_path / "summary.json").to_json() == summary.to_json()


def test_the_first_versions_summary_still_reads() -> None:
    # Execute
    summary = read_summary(OLD_RUN)

    # Assert: what the old run did not record is absent, never a made-up default.
    raw = json.loads((OLD_RUN / "summary.json").read_text())
    assert summary.version == 1 and summary.final.rounds_completed == 1
    assert summary.recorded("secure-aggregation") is None
    assert summary.recorded("max-length") == 16
    assert summary.run_config.max_length == 16
    assert summary.rounds[0].ledger_heads == {} and summary.rounds[0].upload_bytes == {}
    assert summary.ledger_heads() == {}
    assert [s.ledger_head for s in summary.sites] == [None, None]
    # Written again, it keeps every key and value it had.
    again = json.loads(summary.to_json())
    for key, value in raw.items():
        if key != "rounds" and key != "sites":
            assert again[key] == value, key
    for old, new in zip(
        raw["rounds"] + raw["sites"], again["rounds"] + again["sites"], strict=True
    ):
        assert {k: new[k] for k in old} == old


def test_a_newer_version_is_refused_by_name(tmp_path: Path) -> None:
    data = json.loads(summaries.federated(0.7).to_json())
    data["version"] = SUMMARY_VERSION + 1
    (tmp_path / "summary.json").write_text(json.dumps(data))
    with pytest.raises(RunOutputError, match=r"summary\.json: field 'version': .*newer fedsilo"):
        read_summary(tmp_path)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: d["rounds"][0].pop("accuracy"), "field 'rounds.0.accuracy'"),
        (lambda d: d["sites"].append({"site": "x", "stolen": 1}), "field 'sites.0.stolen'"),
        (lambda d: d["config"].update({"evil-key": 1}), "unknown config key 'evil-key'"),
        (lambda d: d["config"].update({"epsilon": -1}), "config key 'epsilon'"),
        (lambda d: d.update({"mode": "magic"}), "field 'mode'"),
        (lambda d: d["final"].update({"accuracy": "high"}), "field 'final.accuracy'"),
    ],
)
def test_a_damaged_summary_is_refused_naming_the_field(
    tmp_path: Path, change: object, named: str
) -> None:
    data = json.loads(summaries.federated(0.7).to_json())
    change(data)  # type: ignore[operator]
    (tmp_path / "summary.json").write_text(json.dumps(data))
    with pytest.raises(RunOutputError, match=rf"summary\.json: .*{named}"):
        read_summary(tmp_path)


def test_unreadable_summaries_are_named(tmp_path: Path) -> None:
    with pytest.raises(RunOutputError, match=r"summary\.json: missing"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text('{"version": NaN}')
    with pytest.raises(RunOutputError, match="not readable JSON"):
        read_summary(tmp_path)


def test_derived_numbers_are_recomputed_not_read(tmp_path: Path) -> None:
    data = json.loads(summaries.federated(0.7).to_json())
    data["rounds"][0].update(
        {
            "epsilon_per_site": {"a": 1.0, "b": 2.5},
            "upload_bytes": {"a": 1024, "b": 3072},
            "epsilon_max": 0.1,  # a lie
            "upload_kib": 99.0,
        }
    )
    (tmp_path / "summary.json").write_text(json.dumps(data))
    row = read_summary(tmp_path).rounds[0]
    assert row.epsilon_max == 2.5 and row.upload_kib == 2.0
    assert "train_loss" not in row.model_dump()  # a federated round has none


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: d["rounds"][0].update({"accuracy": "INF"}), "field 'rounds.0.accuracy'"),
        (lambda d: d["final"].update({"loss": "-Infinity"}), "field 'final.loss'"),
        (lambda d: d.update({"version": True}), "field 'version'"),
        (lambda d: d["rounds"][0].update({"round": "7"}), "field 'rounds.0.round'"),
        (lambda d: d["rounds"][0].update({"round": 0}), "field 'rounds.0.round'"),
        (lambda d: d["rounds"][0].update({"trained": -1}), "field 'rounds.0.trained'"),
        (
            lambda d: d["rounds"][0].update(
                {"ledger_heads": {"s": {"hash": "not hex", "signature": "", "epsilon": 1.0}}}
            ),
            "field 'rounds.0.ledger_heads.s.hash'",
        ),
        (
            lambda d: d["rounds"][0].update({"epsilon_per_site": {"\x1b[2Jall OK": 1.0}}),
            r"field 'rounds\.0\.epsilon_per_site\.\\x1b\[2Jall OK\.\[key\]'",
        ),
    ],
)
def test_numbers_names_and_hashes_are_what_fedsilo_writes(
    tmp_path: Path, change: object, named: str
) -> None:
    # Prepare: a summary a hostile coordinator could hand an auditor.
    data = json.loads(summaries.federated(0.7).to_json())
    change(data)  # type: ignore[operator]
    (tmp_path / "summary.json").write_text(json.dumps(data))

    # Execute / Assert: refused by name; control characters are not echoed raw.
    with pytest.raises(RunOutputError, match=named) as refused:
        read_summary(tmp_path)
    assert "\x1b" not in str(refused.value)


def test_a_file_nested_too_deeply_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RunOutputError, match="not readable JSON"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text('{"version": 1e999}')
    with pytest.raises(RunOutputError, match="field 'version'"):
        read_summary(tmp_path)


def test_model_files_read_back_and_damage_is_named(tmp_path: Path) -> None:
    model = read_model(OLD_RUN / "model" / "model.safetensors")
    assert model.label_names == ("rotten", "fresh") and model.round == 1
    assert model.spec.num_classes == 2 and model.spec.max_length == 16
    broken = tmp_path / "model.safetensors"
    shutil.copy(OLD_RUN / "model" / "model.safetensors", broken)
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(RunOutputError, match=r"model\.safetensors: not a readable safetensors"):
        read_model(broken)
    with pytest.raises(RunOutputError, match="missing"):
        read_model(tmp_path / "none.safetensors")


def test_a_non_finite_number_is_never_written_as_null() -> None:
    summary = summaries.federated(0.7)
    diverged = summary.model_copy(
        update={"rounds": (summary.rounds[0].model_copy(update={"loss": float("inf")}),)}
    )
    with pytest.raises(ValueError, match="Out of range float values"):
        diverged.to_json()
