"""``fedsilo export`` / ``predict`` as functions, on a run folder built from a fresh model."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.data import load_builtin
from common.export import (
    CARD_JSON,
    CARD_MD,
    FP32_FILE,
    INT8_FILE,
    MODEL_JSON,
    ExportError,
    export_run,
    load_exported,
    predict,
)
from common.model import ModelSpec, build_model, projected_embedding
from common.model_card import ModelCard
from common.outputs import RunSummary, save_model, write_summary
from common.text import encode
from common.training import Batchable, evaluate
from tests.support import summaries

SPEC = ModelSpec.preset("tiny", num_classes=2, max_length=16)
LABELS = ("rotten", "fresh")


def _summary(accuracy: float, dp: bool = True) -> RunSummary:
    """What the coordinator writes for a 3-round run of two sites on SPEC's model."""
    sites = (summaries.site("site-0", 3.9), summaries.site("site-1", 4.0))
    return summaries.federated(
        accuracy,
        dp=dp,
        sites=sites if dp else tuple(summaries.site(s.site, None) for s in sites),
        rounds=3,
        **{"max-length": SPEC.max_length, "secure-aggregation": True},
    )


def _accuracy(model: torch.nn.Module) -> float:
    """The model's accuracy on the split the coordinator evaluates on."""
    test = load_builtin("rotten-tomatoes", "test", seed=0)
    data = Batchable.from_encoded(encode(test.texts, SPEC.max_length), test.labels)
    return evaluate(model, data, device=torch.device("cpu")).accuracy


def make_run(run_dir: Path) -> float:
    """A run folder as the coordinator writes it, with a model whose predictions vary;
    returns the accuracy its summary reports."""
    model = build_model(SPEC, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        model.head.weight.copy_(3.0 * torch.randn(model.head.weight.shape, generator=gen))
    state = {k: v.clone() for k, v in model.trainable_state().items()}
    save_model(run_dir / "model" / "model.safetensors", state, SPEC, LABELS, 3)
    accuracy = _accuracy(model.eval())
    write_summary(run_dir, _summary(accuracy))
    return accuracy


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard]:
    run = tmp_path_factory.mktemp("run")
    make_run(run)
    card = export_run(run, latency_repeats=3)
    return run / "export", card


def test_export_writes_models_and_card(exported: tuple[Path, ModelCard]) -> None:
    out, card = exported
    for name in (FP32_FILE, INT8_FILE, MODEL_JSON, CARD_MD, CARD_JSON):
        assert (out / name).is_file(), name
    meta = json.loads((out / MODEL_JSON).read_text())
    assert meta["label_names"] == list(LABELS) and meta["max_length"] == 16
    assert meta["dataset"] == "rotten-tomatoes"
    on_disk = json.loads((out / CARD_JSON).read_text())
    assert on_disk == json.loads(json.dumps(card.to_json()))
    assert card.num_sites == 2 and card.dp and card.secure_aggregation
    assert card.epsilon_max == 4.0 and card.delta_max == 1e-5
    assert card.test_split["examples"] == len(load_builtin("rotten-tomatoes", "test", seed=0))
    assert 0.0 <= card.accuracy["int8"] <= 1.0 and 0.0 <= card.accuracy["fp32"] <= 1.0
    lat = card.latency_ms
    assert lat["threads"] == 1 and lat["batch_size"] == 64 and lat["cpu_cores"] >= 1
    assert all(lat[k] > 0 for k in ("fp32_batch", "int8_batch", "fp32_single", "int8_single"))
    text = (out / CARD_MD).read_text()
    for needle in ("site-0", "site-1", "epsilon", "int8", "post-processing", "Limitations"):
        assert needle in text, needle
    assert "NO DIFFERENTIAL PRIVACY" not in text


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_fp32_file_is_the_whole_model_and_int8_is_small(exported: tuple[Path, ModelCard]) -> None:
    out, card = exported
    state = load_file(str(out / FP32_FILE))
    assert torch.equal(state["embed.weight"], projected_embedding(SPEC.d_model))
    size32, size8 = (out / FP32_FILE).stat().st_size, (out / INT8_FILE).stat().st_size
    assert card.size_bytes["fp32"] == size32 and card.size_bytes["int8"] == size8
    assert size8 <= 0.4 * size32, size8 / size32
    # The int8 file reads back without unpickling code.
    int8_state = torch.load(out / INT8_FILE, weights_only=True)
    assert any("embed" in k for k in int8_state)


def test_int8_and_fp32_predictions_agree(exported: tuple[Path, ModelCard]) -> None:
    out, card = exported
    texts = list(load_builtin("rotten-tomatoes", "test", seed=0).texts[:300])
    fp32 = predict(out, texts, int8=False)
    int8 = predict(out, texts, int8=True)
    assert len(fp32) == len(int8) == len(texts)
    labels = [label for label, _ in fp32]
    assert len(set(labels)) == 2  # the planted model does not predict one class only
    agree = sum(a[0] == b[0] for a, b in zip(fp32, int8, strict=True)) / len(texts)
    assert agree >= 0.95, agree
    assert abs(card.accuracy["fp32"] - card.accuracy["int8"]) <= 0.02
    for label, probs in fp32 + int8:
        assert set(probs) == set(LABELS)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert label == max(probs, key=probs.__getitem__)


def test_predict_accepts_the_run_folder_too(exported: tuple[Path, ModelCard]) -> None:
    out, _ = exported
    assert predict(out.parent, ["fine"], int8=True) == predict(out, ["fine"], int8=True)


def test_a_no_dp_card_says_so(exported: tuple[Path, ModelCard]) -> None:
    _, card = exported
    sites = [{"site": "site-0", "epsilon": None, "delta": None, "budget": None}]
    text = dataclasses.replace(
        card, dp=False, sites=sites, epsilon_max=None, delta_max=None
    ).to_markdown()
    assert text.splitlines()[2].startswith("> **NO DIFFERENTIAL PRIVACY.**")
    assert "differential privacy: **NO**" in text and "No differential privacy" in text


def test_a_central_run_claims_no_sites_and_no_secure_aggregation(
    exported: tuple[Path, ModelCard], tmp_path: Path
) -> None:
    # A central run's config keeps the federated defaults (secure-aggregation true).
    accuracy = make_run(tmp_path)
    write_summary(tmp_path, summaries.central(accuracy, **{"max-length": SPEC.max_length}))
    card = export_run(tmp_path, latency_repeats=1)
    text = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert card.secure_aggregation is False and card.partition.startswith("none (central")
    assert "secure aggregation: off" in text and "Secure aggregation hid" not in text
    federated_text = (exported[0] / "MODEL_CARD.md").read_text()
    assert "Secure aggregation hid" in federated_text


# ---- bad input: one ExportError naming the file ------------------------------------


def _break(run: Path, how: str) -> str:
    """Damage a good run folder; return the file name the error must mention."""
    summary, weights = run / "summary.json", run / "model" / "model.safetensors"
    if how == "no-summary":
        summary.unlink()
        return "summary.json"
    if how == "bad-json":
        summary.write_text("{not json")
        return "summary.json"
    if how == "no-config":
        summary.write_text(json.dumps({"dp": True, "sites": []}))
        return "summary.json"
    if how == "no-weights":
        weights.unlink()
        return "model.safetensors"
    if how == "corrupt-weights":
        weights.write_bytes(b"\x00" * 64)
        return "model.safetensors"
    if how == "wrong-arrays":
        state = load_file(str(weights))
        state.pop("head.bias")
        save_model(weights, state, SPEC, LABELS, 3)
        return "model.safetensors"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["no-summary", "bad-json", "no-config", "no-weights", "corrupt-weights", "wrong-arrays"]
)
def test_a_bad_run_folder_is_named(tmp_path: Path, how: str) -> None:
    make_run(tmp_path)
    name = _break(tmp_path, how)
    with pytest.raises(ExportError, match=name):
        export_run(tmp_path, tmp_path / "out", latency_repeats=1)
    assert not (tmp_path / "out" / FP32_FILE).exists()


def test_weights_that_miss_the_reported_accuracy_are_refused(tmp_path: Path) -> None:
    # What a run trained with another frozen embedding (older model code) looks like.
    make_run(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary["final"]["accuracy"] = 0.99
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ExportError, match=r"model\.safetensors: .*summary\.json reports 0\.9900"):
        export_run(tmp_path, tmp_path / "out", latency_repeats=1)
    assert not (tmp_path / "out").exists()


def test_a_missing_run_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="nowhere"):
        export_run(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("damage", "int8", "name"),
    [
        (lambda d: (d / MODEL_JSON).unlink(), True, MODEL_JSON),
        (lambda d: (d / MODEL_JSON).write_text("[]"), True, MODEL_JSON),
        (lambda d: (d / INT8_FILE).unlink(), True, INT8_FILE),
        (lambda d: (d / INT8_FILE).write_bytes(b"junk"), True, INT8_FILE),
        (lambda d: (d / FP32_FILE).write_bytes(b"junk"), False, FP32_FILE),
    ],
)
def test_a_bad_export_folder_is_named(
    tmp_path: Path, exported: tuple[Path, ModelCard], damage, int8: bool, name: str
) -> None:
    copy = tmp_path / "export"
    shutil.copytree(exported[0], copy)
    damage(copy)
    with pytest.raises(ExportError, match=name.replace(".", r"\.")):
        load_exported(copy, int8=int8)


def test_a_run_of_the_first_version_still_exports(tmp_path: Path) -> None:
    # Prepare: a run folder written by fedsilo's first version (before ledgers, secure
    # aggregation and the typed summary).
    run = tmp_path / "old-run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "run-v1-9f9b7ec", run)

    # Execute
    card = export_run(run, latency_repeats=1)

    # Assert: what the old run did not record is "unknown", not today's default.
    assert card.secure_aggregation is None and card.rounds_planned == 1
    assert card.accuracy["fp32"] == pytest.approx(card.accuracy["coordinator"], abs=0.005)
    assert "secure aggregation: unknown" in (run / "export" / CARD_MD).read_text()
