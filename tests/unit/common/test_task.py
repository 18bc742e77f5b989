"""Tasks (issue 14, first step): task files parse strictly with named errors, the
bundled data sets are bundled task files whose labels their data carries, and a
task's digest covers every field and nothing else."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import cli
from common.data import builtin_label_names, load_builtin
from common.task import Task, TaskError, bundled_task, bundled_tasks, resolve_task

NEWS = """
# a task of our own, not bundled
name = "news-topics"
labels = ["earn", "acq", "crude", "trade"]
text-column = "body"
label-column = "topic"
max-length = 128
model-preset = "small"
test-file = "public-test.csv"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "task.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_task_file_of_our_own_loads_with_every_field(tmp_path: Path) -> None:
    task = Task.load(_write(tmp_path, NEWS))

    assert task == Task(
        name="news-topics",
        labels=("earn", "acq", "crude", "trade"),
        text_column="body",
        label_column="topic",
        max_length=128,
        model_preset="small",
        test_file="public-test.csv",
    )
    assert resolve_task(str(tmp_path / "task.toml")) == task


def test_the_bundled_data_sets_are_bundled_tasks_whose_labels_their_data_carries() -> None:
    assert bundled_tasks() == ("20newsgroups", "rotten-tomatoes")
    for name in bundled_tasks():
        task = bundled_task(name)
        assert task.name == name and resolve_task(name) == task
        assert builtin_label_names(name) == task.labels
        for split in ("train", "test"):
            data = load_builtin(name, split)
            assert data.label_names == task.labels
            assert {data.label_names[i] for i in set(data.labels.tolist())} == set(task.labels)
    assert bundled_task("rotten-tomatoes").labels == ("rotten", "fresh")


def test_the_digest_covers_every_field_and_not_the_files_layout(tmp_path: Path) -> None:
    task = Task.load(_write(tmp_path, NEWS))
    reordered = "\n".join(reversed([line for line in NEWS.splitlines() if "=" in line]))
    assert Task.load(_write(tmp_path, "# other comment\n" + reordered)).digest() == task.digest()
    changed = [
        dataclasses.replace(task, labels=("acq", "earn", "crude", "trade")),  # order matters
        dataclasses.replace(task, text_column="text"),
        dataclasses.replace(task, label_column="label"),
        dataclasses.replace(task, max_length=127),
        dataclasses.replace(task, model_preset="tiny"),
        dataclasses.replace(task, test_file=None),
        dataclasses.replace(task, name="news"),
    ]
    digests = {t.digest() for t in changed}
    assert len(digests) == len(changed) and task.digest() not in digests
    assert task.digest().startswith("sha256:") and len(task.digest()) == 7 + 64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('colour = "red"', r"unknown keys \['colour'\]"),
        ("", None),  # the valid baseline
    ],
)
def test_unknown_keys_are_refused_by_name(tmp_path: Path, change: str, message: str | None) -> None:
    path = _write(tmp_path, NEWS + change + "\n")
    if message is None:
        assert Task.load(path).name == "news-topics"
    else:
        with pytest.raises(TaskError, match=message):
            Task.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('labels = ["a", "b"]', r"missing \['name'\]"),
        ('name = "x"', r"missing \['labels'\]"),
        ('name = "x"\nlabels = "a,b"', "'labels' must be a list"),
        ('name = "x"\nlabels = ["only"]', "must list 2 to"),
        ('name = "x"\nlabels = ["a", "b", "a"]', r"labels listed twice: \['a'\]"),
        ('name = "x"\nlabels = ["a", " b"]', "without surrounding spaces"),
        ('name = "x"\nlabels = ["a", ""]', "without surrounding spaces"),
        ('name = "x"\nlabels = ["a", 2]', "printable name"),
        ('name = "x y"\nlabels = ["a", "b"]', "task name 'x y'"),
        ('name = "x"\nlabels = ["a", "b"]\ntext-column = "c"\nlabel-column = "c"', "must differ"),
        ('name = "x"\nlabels = ["a", "b"]\ntext-column = " "', "'text-column' must name"),
        ('name = "x"\nlabels = ["a", "b"]\nmax-length = 3', r"outside 4\.\.512"),
        ('name = "x"\nlabels = ["a", "b"]\nmax-length = "48"', "whole number"),
        ('name = "x"\nlabels = ["a", "b"]\nmax-length = true', "whole number"),
        ('name = "x"\nlabels = ["a", "b"]\nmodel-preset = "huge"', "'model-preset' 'huge'"),
        ('name = "x"\nlabels = ["a", "b"]\ntest-file = ""', "'test-file' must be a path"),
        ('name = "x"\nlabels = ["a", "b"', "not valid TOML"),
    ],
)
def test_a_bad_task_file_is_refused_naming_the_file_and_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(TaskError, match=message) as caught:
        Task.load(path)
    assert str(path) in str(caught.value)


def test_a_missing_or_undecodable_task_file_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="does not exist"):
        Task.load(tmp_path / "absent.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(TaskError, match="unreadable"):
        Task.load(bad)
    with pytest.raises(TaskError, match=r"no bundled task 'nope'; bundled: \['20newsgroups'"):
        resolve_task("nope")


def test_fedsilo_task_show_prints_the_labels_and_the_digest(tmp_path: Path) -> None:
    path = _write(tmp_path, NEWS)
    shown = CliRunner().invoke(cli, ["task", "show", str(path)])
    assert shown.exit_code == 0, shown.output
    digest = Task.load(path).digest()
    assert f"task news-topics: 4 labels, digest {digest}" in shown.output
    assert "earn, acq, crude, trade" in shown.output
    assert "public-test.csv" in shown.output


def test_check_data_validates_a_file_against_a_task_of_our_own(tmp_path: Path) -> None:
    # A news-topic file of our own (not bundled), with the task's columns.
    task = _write(tmp_path, NEWS)
    good = tmp_path / "site.csv"
    good.write_text("body,topic\nprofits rose,earn\nmerger agreed,acq\noil fell,crude\nq4,earn\n")
    shown = CliRunner().invoke(cli, ["check-data", str(good), "--task", str(task)])
    assert shown.exit_code == 0, shown.output
    assert "4 rows ok (earn: 2, acq: 1, crude: 1, trade: 0)" in shown.output

    # A label the task does not declare is refused by name, with its line.
    bad = tmp_path / "bad.csv"
    bad.write_text("body,topic\nprofits rose,earn\nwheat harvest,grain\n")
    refused = CliRunner().invoke(cli, ["check-data", str(bad), "--task", str(task)])
    assert refused.exit_code != 0
    assert "grain" in str(refused.exception) and "line 3" in str(refused.exception)
