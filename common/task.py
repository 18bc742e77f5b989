"""A task: what every site and the coordinator agree to train, declared in a small TOML
file, all of it public: a name, the label names (their order fixes the model's
outputs), the text and label columns of a site's file, the token length, the model
preset and, optionally, a public test file for the coordinator.

Labels come from the task, never from private data. The bundled data sets are bundled
task files (``common/data/tasks/``): one path, not two. A task's ``digest`` is what a
site pins when it agrees to a task, so it can refuse a plan whose task differs.

    name = "news-topics"
    labels = ["earn", "acq", "crude"]
    text-column = "text"
    label-column = "label"
    max-length = 128
    model-preset = "tiny"
    test-file = "public-test.csv"   # optional, relative to the task file
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, get_args

from common.config import ConfigError, Preset, RunConfig

TASKS_DIR = Path(__file__).parent / "data" / "tasks"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEYS = {
    "name": "name",
    "labels": "labels",
    "text-column": "text_column",
    "label-column": "label_column",
    "max-length": "max_length",
    "model-preset": "model_preset",
    "test-file": "test_file",
}
MAX_LABELS = 1000
MAX_LABEL_CHARS = 200
MIN_LENGTH, MAX_LENGTH = 4, 512


class TaskError(ConfigError):
    """A task file or value is unusable; the text names the file and the key."""


@dataclass(frozen=True)
class Task:
    """One declared text classification task."""

    name: str
    labels: tuple[str, ...]
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 48
    model_preset: str = "tiny"
    test_file: str | None = None  # a public test file for the coordinator, if any

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise TaskError(f"task name {self.name!r}: use 1-64 letters, digits, '.', '_', '-'")
        labels = self.labels
        if not isinstance(labels, tuple) or not 2 <= len(labels) <= MAX_LABELS:
            raise TaskError(f"task {self.name}: 'labels' must list 2 to {MAX_LABELS} label names")
        for label in labels:
            if (
                not isinstance(label, str)
                or not label
                or label != label.strip()
                or len(label) > MAX_LABEL_CHARS
                or not label.isprintable()
            ):
                raise TaskError(
                    f"task {self.name}: label {label!r} must be a printable name of 1-"
                    f"{MAX_LABEL_CHARS} characters without surrounding spaces"
                )
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise TaskError(f"task {self.name}: labels listed twice: {repeated}")
        for key, column in (("text-column", self.text_column), ("label-column", self.label_column)):
            if not isinstance(column, str) or not column.strip():
                raise TaskError(f"task {self.name}: '{key}' must name a column")
        if self.text_column == self.label_column:
            raise TaskError(f"task {self.name}: text and label columns must differ")
        length = self.max_length
        if isinstance(length, bool) or not isinstance(length, int):
            raise TaskError(f"task {self.name}: 'max-length' must be a whole number")
        if not MIN_LENGTH <= length <= MAX_LENGTH:
            raise TaskError(
                f"task {self.name}: 'max-length' {length} is outside {MIN_LENGTH}..{MAX_LENGTH}"
            )
        presets = get_args(Preset)
        if self.model_preset not in presets:
            raise TaskError(
                f"task {self.name}: 'model-preset' {self.model_preset!r} is not one of {presets}"
            )
        if self.test_file is not None and (
            not isinstance(self.test_file, str) or not self.test_file.strip()
        ):
            raise TaskError(f"task {self.name}: 'test-file' must be a path")

    def canonical(self) -> str:
        """The task as canonical JSON: what its digest covers (comments and key order in
        the file do not matter; every field does)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """``sha256:`` of the canonical task: what a site pins when it agrees to it."""
        return "sha256:" + hashlib.sha256(self.canonical().encode()).hexdigest()

    @classmethod
    def from_canonical(cls, text: str) -> Task:
        """The task a plan carries (``canonical``), validated like a file."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, TypeError) as err:
            raise TaskError(f"the plan's task is not JSON: {err}") from None
        if not isinstance(raw, dict) or set(raw) != set(_KEYS.values()):
            raise TaskError(
                f"the plan's task must have exactly the fields {sorted(_KEYS.values())}"
            )
        if not isinstance(raw["labels"], list):
            raise TaskError("the plan's task: 'labels' must be a list")
        task = cls(**{**raw, "labels": tuple(raw["labels"])})
        if task.canonical() != text:
            raise TaskError("the plan's task is not in canonical form")
        return task

    def with_overrides(self, *, max_length: int = 0, model_preset: str = "") -> Task:
        """The task with a run's model overrides (0 and "" keep the task's)."""
        return replace(
            self,
            max_length=max_length or self.max_length,
            model_preset=model_preset or self.model_preset,
        )

    def to_toml(self) -> str:
        """The task as a task file (what ``fedsilo simulate`` writes for a run)."""
        lines = [f"name = {json.dumps(self.name)}", "labels = ["]
        lines += [f"  {json.dumps(label, ensure_ascii=False)}," for label in self.labels]
        lines += [
            "]",
            f"text-column = {json.dumps(self.text_column)}",
            f"label-column = {json.dumps(self.label_column)}",
            f"max-length = {self.max_length}",
            f"model-preset = {json.dumps(self.model_preset)}",
        ]
        if self.test_file is not None:
            lines.append(f"test-file = {json.dumps(self.test_file)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], source: str) -> Task:
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise TaskError(f"{source}: unknown keys {unknown}; a task has {sorted(_KEYS)}")
        missing = [k for k in ("name", "labels") if k not in raw]
        if missing:
            raise TaskError(f"{source}: missing {missing}")
        values = {_KEYS[k]: v for k, v in raw.items()}
        if not isinstance(values["labels"], list):
            raise TaskError(f"{source}: 'labels' must be a list of label names")
        values["labels"] = tuple(values["labels"])
        try:
            return cls(**values)
        except TaskError as err:
            raise TaskError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: Path) -> Task:
        """A task file, with an error naming the file and the problem."""
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TaskError(f"task file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise TaskError(f"task file {path} is unreadable: {err}") from None
        except tomllib.TOMLDecodeError as err:
            raise TaskError(f"task file {path} is not valid TOML: {err}") from None
        return cls.from_mapping(raw, f"task file {path}")


def bundled_tasks() -> tuple[str, ...]:
    """The names of the bundled task files."""
    return tuple(sorted(p.stem for p in TASKS_DIR.glob("*.toml")))


@cache
def bundled_task(name: str) -> Task:
    """A bundled task by name (``rotten-tomatoes``, ``20newsgroups``); read once, as
    every load of a bundled data set asks for its labels."""
    path = TASKS_DIR / f"{name}.toml"
    if not _NAME.fullmatch(name) or not path.is_file():
        raise TaskError(f"no bundled task {name!r}; bundled: {list(bundled_tasks())}")
    task = Task.load(path)
    if task.name != name:
        raise TaskError(f"bundled task file {path} declares the name {task.name!r}")
    return task


def resolve_task(name_or_path: str) -> Task:
    """A bundled task by name, or a task file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return Task.load(path)
    return bundled_task(name_or_path)


def run_task(cfg: RunConfig) -> Task:
    """The task a run trains, as its plan carries it: the run's task file or bundled
    task (``task``), else the bundled data set's own, with the run's model overrides."""
    if cfg.task:
        task = resolve_task(cfg.task)
    elif cfg.bundled:
        task = bundled_task(cfg.dataset)
    else:
        raise TaskError(
            f"data set {cfg.dataset}: data of your own needs a task ('task' names a task "
            "file; `fedsilo simulate --data` writes one from the data when none is given)"
        )
    if cfg.bundled and task.labels != bundled_task(cfg.dataset).labels:
        raise TaskError(
            f"task {task.name} declares the labels {list(task.labels)}, but the bundled data "
            f"set {cfg.dataset} carries {list(bundled_task(cfg.dataset).labels)}"
        )
    return task.with_overrides(max_length=cfg.max_length, model_preset=cfg.model_preset)


def test_file_path(cfg: RunConfig, task: Task) -> Path | None:
    """The task's public test file, relative to the run's task file (None: it has none)."""
    if task.test_file is None:
        return None
    path = Path(task.test_file)
    if not path.is_absolute() and cfg.task and Path(cfg.task).suffix == ".toml":
        path = Path(cfg.task).parent / path
    return path
