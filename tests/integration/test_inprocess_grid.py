"""Integration tests: real ServerApp + ClientApp over ``InProcessGrid``."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from tests.support.inprocess_grid import NODE_ID_OFFSET, InProcessGrid

# ---------------------------------------------------------------- ClientApp
client_app = ClientApp()


def _bump_counter(context: Context) -> int:
    """Increment and return the per-node counter kept in ``context.state``."""
    prev = 0
    if "counter" in context.state:
        prev = int(context.state.metric_records["counter"]["count"])  # type: ignore[arg-type]
    context.state["counter"] = MetricRecord({"count": prev + 1})
    return prev + 1


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Add 1 to the incoming arrays, then vandalise the incoming content."""
    count = _bump_counter(context)
    arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()
    incoming_sum = float(sum(a.sum() for a in arrays))
    updated = ArrayRecord([a + 1.0 for a in arrays])
    context.state["last"] = ArrayRecord([a + 1.0 for a in arrays])
    # Mutate everything we received: must not leak to server or other nodes.
    msg.content.array_records["arrays"]["0"] = Array(np.full(3, -99.0))
    msg.content.config_records["config"]["poisoned"] = True
    del msg.content["config"]
    metrics = MetricRecord(
        {
            "count": count,
            "incoming-sum": incoming_sum,
            "partition-id": int(context.node_config["partition-id"]),
        }
    )
    return Message(RecordDict({"arrays": updated, "metrics": metrics}), reply_to=msg)


@client_app.train("boom")
def boom(msg: Message, context: Context) -> Message:
    """Modify state, then fail: the state change must be rolled back."""
    _bump_counter(context)
    context.state["junk"] = ConfigRecord({"x": 1})
    raise RuntimeError("kaboom")


# ---------------------------------------------------------------- helpers
def _content() -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord([np.ones(3), np.zeros((2, 2))]),
            "config": ConfigRecord({"lr": 0.1}),
        }
    )


def _broadcast(
    grid: Grid, content: RecordDict, rnd: int, mtype: str = "train"
) -> tuple[list[Message], list[Message]]:
    msgs = [Message(content, nid, mtype, group_id=str(rnd)) for nid in grid.get_node_ids()]
    return msgs, list(grid.send_and_receive(msgs))


def _count(grid: InProcessGrid, nid: int) -> int:
    state = grid.context(nid).state
    if "counter" not in state:
        return 0
    return int(state.metric_records["counter"]["count"])  # type: ignore[arg-type]


def _metric(reply: Message, key: str) -> float:
    value = reply.content.metric_records["metrics"][key]
    assert isinstance(value, (int, float))
    return float(value)


@pytest.fixture
def grid() -> InProcessGrid:
    return InProcessGrid(client_app, 3, run_config={"num-rounds": 2})


# ---------------------------------------------------------------- tests
def test_serverapp_two_rounds(grid: InProcessGrid) -> None:
    """Real ServerApp main: all nodes reply, metadata is right, state persists."""
    log: list[tuple[list[Message], list[Message]]] = []
    server_app = ServerApp()

    @server_app.main()
    def main(g: Grid, context: Context) -> None:
        content = _content()
        for rnd in range(1, int(context.run_config["num-rounds"]) + 1):
            log.append(_broadcast(g, content, rnd))

    server_app(grid, grid.server_context())

    node_ids = grid.all_node_ids
    assert node_ids == [NODE_ID_OFFSET + i for i in range(3)]
    assert len(log) == 2
    for rnd, (sent, replies) in enumerate(log, start=1):
        assert {r.metadata.src_node_id for r in replies} == set(node_ids)
        by_id = {m.metadata.message_id: m for m in sent}
        assert len(by_id) == 3 and "" not in by_id
        for reply in replies:
            md = reply.metadata
            ins = by_id[md.reply_to_message_id]
            assert md.src_node_id == ins.metadata.dst_node_id
            assert md.dst_node_id == SUPERLINK_NODE_ID
            assert md.run_id == ins.metadata.run_id == grid.run.run_id
            assert md.group_id == str(rnd)
            assert md.message_type == "train"
            assert md.message_id not in ("", md.reply_to_message_id)
            assert not reply.has_error()
            metrics = reply.content.metric_records["metrics"]
            assert metrics["count"] == rnd  # state persisted across rounds
            assert metrics["partition-id"] == md.src_node_id - NODE_ID_OFFSET
            assert metrics["incoming-sum"] == 3.0
            out = reply.content.array_records["arrays"].to_numpy_ndarrays()
            np.testing.assert_array_equal(out[0], np.full(3, 2.0))
    assert all(_count(grid, nid) == 2 for nid in node_ids)


def test_content_isolation(grid: InProcessGrid) -> None:
    """Client-side mutation never reaches the server's objects or other nodes."""
    content = _content()
    _, replies = _broadcast(grid, content, 1)
    assert len(replies) == 3
    # Every node saw the pristine content (no node saw another's vandalism).
    assert [_metric(r, "incoming-sum") for r in replies] == [3.0] * 3
    # The server's record is untouched.
    assert set(content.keys()) == {"arrays", "config"}
    assert "poisoned" not in content.config_records["config"]
    np.testing.assert_array_equal(content.array_records["arrays"]["0"].numpy(), np.ones(3))
    # Mutating a reply does not touch the node's stored state.
    replies[0].content.array_records["arrays"]["0"] = Array(np.zeros(3))
    nid = replies[0].metadata.src_node_id
    last = grid.context(nid).state.array_records["last"]["0"].numpy()
    np.testing.assert_array_equal(last, np.full(3, 2.0))


def test_error_reply_and_state_rollback(grid: InProcessGrid) -> None:
    """ClientApp exception -> error reply; that call's state changes discarded."""
    _broadcast(grid, _content(), 1)
    sent, replies = _broadcast(grid, _content(), 2, mtype="train.boom")
    assert len(replies) == 3
    ids = {m.metadata.message_id: m for m in sent}
    for reply in replies:
        assert reply.has_error() and not reply.has_content()
        assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert "kaboom" in str(reply.error.reason)
        md = reply.metadata
        assert md.dst_node_id == SUPERLINK_NODE_ID
        assert md.message_type == "train.boom" and md.group_id == "2"
        assert ids[md.reply_to_message_id].metadata.dst_node_id == md.src_node_id
    for nid in grid.all_node_ids:
        assert _count(grid, nid) == 1
        assert "junk" not in grid.context(nid).state
    # Unregistered action: ClientApp raises ValueError -> error reply too.
    _, replies = _broadcast(grid, _content(), 3, mtype="train.nope")
    assert all(r.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION for r in replies)
    # Node still works afterwards, with its committed state.
    _, replies = _broadcast(grid, _content(), 4)
    assert [_metric(r, "count") for r in replies] == [2, 2, 2]


def test_dropped_nodes_do_not_reply(grid: InProcessGrid) -> None:
    """Dropped nodes are unlisted, never reply, and keep their state."""
    dropped = grid.all_node_ids[1]
    grid.drop_node(dropped)
    assert dropped not in list(grid.get_node_ids())
    assert dropped not in [n.node_id for n in grid.get_nodes()]
    assert grid.dropped_node_ids == {dropped}
    # Address every node, including the dropped one: only 2 replies, no hang.
    msgs = [Message(_content(), nid, "train") for nid in grid.all_node_ids]
    msg_ids = list(grid.push_messages(msgs))
    assert len(msg_ids) == 3  # accepted like a real SuperLink would
    replies = list(grid.pull_messages(msg_ids))
    assert dropped not in {r.metadata.src_node_id for r in replies}
    assert len(replies) == 2
    assert list(grid.pull_messages(msg_ids)) == []  # pulled replies are removed
    replies = list(grid.send_and_receive(msgs[1:2], timeout=None))
    assert replies == []
    assert _count(grid, dropped) == 0
    grid.restore_node(dropped)
    _, replies = _broadcast(grid, _content(), 2)
    assert {r.metadata.src_node_id for r in replies} == set(grid.all_node_ids)


def test_configs_run_and_rejections() -> None:
    """node_configs override; set_run; unknown destination is rejected."""
    g = InProcessGrid(client_app, 2, node_configs=[{"partition-id": 7}, {"partition-id": 8}])
    assert [g.context(n).node_config for n in g.all_node_ids] == [
        {"partition-id": 7},
        {"partition-id": 8},
    ]
    _, replies = _broadcast(g, _content(), 1)
    assert sorted(_metric(r, "partition-id") for r in replies) == [7, 8]
    assert list(g.push_messages([Message(_content(), 999, "train")])) == []
    # Same run id keeps state; a new run starts with fresh contexts.
    g.set_run(g.run)
    assert _count(g, g.all_node_ids[0]) == 1
    g.set_run(Run.create_empty(run_id=77))
    assert g.run.run_id == 77 and _count(g, g.all_node_ids[0]) == 0
    _, replies = _broadcast(g, _content(), 1)
    assert {r.metadata.run_id for r in replies} == {77}
    msg = g.create_message(_content(), "train", g.all_node_ids[0], "9")
    (reply,) = g.send_and_receive([msg])
    assert reply.metadata.group_id == "9"
