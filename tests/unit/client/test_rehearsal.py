"""A rehearsal's stand-in rows (client/rehearsal.py): public by construction (the
bundled data set's own rows, or synthetic rows of a task's declared labels), one
draw per site, never the site's own file."""

from __future__ import annotations

from client.rehearsal import STANDIN_ROWS, standin_rows
from common.data import load_builtin
from common.task import Task, bundled_task

TICKETS = Task(
    name="tickets",
    labels=("billing", "access", "outage"),
    text_column="ticket",
    label_column="kind",
    max_length=16,
)


def test_a_task_of_its_own_gets_synthetic_rows_of_its_declared_labels() -> None:
    rows = standin_rows(TICKETS, "desk-a", STANDIN_ROWS)
    assert len(rows) == STANDIN_ROWS and rows.label_names == TICKETS.labels
    assert set(rows.labels.tolist()) == {0, 1, 2}
    # Each row names its label: a model can learn it, so the rehearsal's numbers move.
    assert all(
        t.split()[0] == TICKETS.labels[k] for t, k in zip(rows.texts, rows.labels, strict=True)
    )
    assert standin_rows(TICKETS, "desk-a", STANDIN_ROWS).texts == rows.texts
    assert standin_rows(TICKETS, "desk-b", STANDIN_ROWS).texts != rows.texts


def test_a_bundled_task_gets_rows_of_its_public_data_set() -> None:
    task = bundled_task("rotten-tomatoes")
    rows = standin_rows(task, "site-a", 50)
    public = set(load_builtin("rotten-tomatoes", "train", seed=0).texts)
    assert len(rows) == 50 and set(rows.texts) <= public
    held = standin_rows(task, "site-a", 20, held_out=True)
    assert set(held.texts) <= set(load_builtin("rotten-tomatoes", "test", seed=0).texts)
    assert standin_rows(task, "site-a", 50).texts == rows.texts
    assert standin_rows(task, "site-b", 50).texts != rows.texts
