"""Ray-free, in-process ``Grid`` that drives a real ``ClientApp`` synchronously.

``InProcessGrid`` lets integration tests run real ServerApp + ClientApp code
without Ray or a SuperLink. It mirrors the observable behaviour of Flower's
in-memory grid / simulation engine:

* every pushed message gets a fresh ``message_id`` (set on the caller's object);
* each destination receives its own serialized copy (protobuf round trip, the
  same encoding the real transport uses), so nobody shares record objects;
* each node keeps one ``Context`` per run, whose ``state`` persists across
  calls; the ClientApp works on a copy which is committed only on success, so
  an exception discards that call's state changes (like the real engines);
* a ClientApp exception becomes an error reply with
  ``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``;
* replies are serialized copies with ``src_node_id`` = node, ``dst_node_id`` =
  ``SUPERLINK_NODE_ID`` and ``reply_to_message_id`` = the instruction's id.

Dropped nodes (``drop_node``) are not listed by ``get_node_ids`` and never
reply; messages pushed to them are accepted but silently discarded. ``vanish_at``
drops a node the moment a message of a given group (e.g. ``"1/unmask"``) reaches it:
a site that disappears in the middle of a multi-stage round.

Note: Flower's ``Message`` constructor reads ``TaskIdentity`` (run id, node id);
this grid sets it to the ServerApp identity on construction and ``set_run``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.server.utils.validator import validate_message
from flwr.serverapp import Grid
from flwr.supercore.constant import NodeStatus
from flwr.supercore.date import now
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["DEFAULT_RUN_ID", "NODE_ID_OFFSET", "InProcessGrid"]

log = logging.getLogger(__name__)

DEFAULT_RUN_ID = 4242
NODE_ID_OFFSET = 1000


def _copy_message(message: Message) -> Message:
    """Return an independent copy of ``message`` (protobuf round trip)."""
    return message_from_proto(message_to_proto(message))


def _copy_context(context: Context) -> Context:
    """Return an independent copy of ``context`` (protobuf round trip)."""
    return context_from_proto(context_to_proto(context))


class InProcessGrid(Grid):
    """Synchronous in-process ``Grid`` delivering messages to a real ClientApp.

    Parameters
    ----------
    client_app : ClientApp
        The ClientApp every node runs.
    num_nodes : int
        Number of SuperNodes; node ids are ``NODE_ID_OFFSET + i``.
    run_config : UserConfig | None
        ``run_config`` of every node's (and the server's) ``Context``.
    node_configs : Sequence[UserConfig] | None
        Per-node ``node_config``; defaults to
        ``{"partition-id": i, "num-partitions": num_nodes}``.
    run_id : int
        Run id of the default ``Run``.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_config: UserConfig | None = None,
        node_configs: Sequence[UserConfig] | None = None,
        run_id: int = DEFAULT_RUN_ID,
    ) -> None:
        if num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
        if node_configs is not None and len(node_configs) != num_nodes:
            raise ValueError("node_configs must have exactly num_nodes entries")
        self._client_app = client_app
        self._run_config: UserConfig = dict(run_config or {})
        self._node_ids: list[int] = [NODE_ID_OFFSET + i for i in range(num_nodes)]
        self._node_configs: dict[int, UserConfig] = {
            nid: (
                dict(node_configs[i])
                if node_configs is not None
                else {PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_nodes}
            )
            for i, nid in enumerate(self._node_ids)
        }
        self._dropped: set[int] = set()
        self._vanish: dict[int, str] = {}
        self._contexts: dict[int, Context] = {}
        self._replies: dict[str, Message] = {}  # instruction msg id -> reply
        self._run = Run.create_empty(run_id=run_id)
        self._run.override_config = dict(self._run_config)
        self._init_run_state()

    # ------------------------------------------------------------------ run
    def _init_run_state(self) -> None:
        """(Re)create fresh per-node contexts and set the ServerApp identity."""
        run_id = self._run.run_id
        self._contexts = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config=dict(self._node_configs[nid]),
                state=RecordDict(),
                run_config=dict(self._run_config),
            )
            for nid in self._node_ids
        }
        self._replies.clear()
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        """Set the run; a different ``run_id`` starts with fresh node contexts."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run)}")
        changed = run.run_id != self._run.run_id
        self._run = run
        if changed:
            self._init_run_state()
        else:
            TaskIdentity.run_id = run.run_id
            TaskIdentity.node_id = SUPERLINK_NODE_ID

    @property
    def run(self) -> Run:
        """Run information (a copy)."""
        return Run(**vars(self._run))

    # ------------------------------------------------------------ test API
    @property
    def all_node_ids(self) -> list[int]:
        """All node ids, including dropped ones."""
        return list(self._node_ids)

    @property
    def dropped_node_ids(self) -> set[int]:
        """Currently dropped node ids."""
        return set(self._dropped)

    def context(self, node_id: int) -> Context:
        """Return the stored (committed) ``Context`` of ``node_id``."""
        return self._contexts[node_id]

    def server_context(self) -> Context:
        """Return a fresh ServerApp ``Context`` for this grid's run."""
        return Context(
            run_id=self._run.run_id,
            node_id=SUPERLINK_NODE_ID,
            node_config={},
            state=RecordDict(),
            run_config=dict(self._run_config),
        )

    def drop_node(self, node_id: int) -> None:
        """Take ``node_id`` offline: unlisted, and its messages are discarded."""
        self._check_known(node_id)
        self._dropped.add(node_id)

    def vanish_at(self, node_id: int, group_id: str) -> None:
        """Drop ``node_id`` when a message with ``group_id`` is pushed to it."""
        self._check_known(node_id)
        self._vanish[node_id] = group_id

    def restore_node(self, node_id: int) -> None:
        """Bring ``node_id`` back online (its context/state is kept)."""
        self._check_known(node_id)
        self._dropped.discard(node_id)

    def _check_known(self, node_id: int) -> None:
        if node_id not in self._contexts:
            raise KeyError(f"Unknown node id: {node_id}")

    # ---------------------------------------------------------- Grid API
    def create_message(  # pylint: disable=too-many-arguments,R0917
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create an instruction message (deprecated in Flower; kept for compat)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """Ids of the nodes currently online."""
        return [nid for nid in self._node_ids if nid not in self._dropped]

    def get_nodes(self) -> list[NodeInfo]:
        """``NodeInfo`` of the nodes currently online."""
        return [NodeInfo(node_id=nid, status=NodeStatus.ONLINE) for nid in self.get_node_ids()]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Assign ids, deliver a copy to each online destination, store replies.

        Like Flower's LinkState, invalid messages (bad run id, unknown node,
        ...) are logged and their ids omitted from the result.
        """
        msg_ids: list[str] = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            md = msg.metadata
            if not (md.reply_to_message_id == "" and md.ttl > 0):
                raise ValueError(f"Invalid message: {msg}")
            errors = validate_message(msg, is_reply_message=False)
            if md.run_id != self._run.run_id:
                errors.append(f"invalid run_id {md.run_id}")
            if md.dst_node_id not in self._contexts:
                errors.append(f"invalid dst_node_id {md.dst_node_id}")
            if errors:
                log.error("InProcessGrid rejected message: %s", errors)
                continue
            msg_ids.append(md.message_id)
            if self._vanish.get(md.dst_node_id) == md.group_id:
                self._dropped.add(md.dst_node_id)
            if md.dst_node_id in self._dropped:
                continue  # accepted but never delivered
            self._deliver(_copy_message(msg))
        return msg_ids

    def _deliver(self, message: Message) -> None:
        """Run the ClientApp on ``message`` and store the (copied) reply."""
        node_id = message.metadata.dst_node_id
        message.metadata.delivered_at = now().isoformat()
        working = _copy_context(self._contexts[node_id])
        prev_node_id = TaskIdentity.node_id
        TaskIdentity.node_id = node_id
        try:
            reply = self._client_app(message, working)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log.error("ClientApp on node %s raised an exception", node_id, exc_info=ex)
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            err = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
            reply = Message(err, reply_to=message)
        else:
            self._contexts[node_id] = _copy_context(working)  # commit state
        finally:
            TaskIdentity.node_id = prev_node_id

        if not isinstance(reply, Message):
            log.error("ClientApp on node %s returned %r", node_id, type(reply))
            return
        reply = _copy_message(reply)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        errors = validate_message(reply, is_reply_message=True)
        md = reply.metadata
        if md.reply_to_message_id != message.metadata.message_id:
            errors.append("reply_to_message_id does not match")
        if md.src_node_id != node_id:
            errors.append(f"src_node_id {md.src_node_id} != {node_id}")
        if errors:
            log.error("InProcessGrid dropped invalid reply: %s", errors)
            return
        self._replies[md.reply_to_message_id] = reply

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Return (and remove) the available replies to ``message_ids``."""
        out: list[Message] = []
        for msg_id in message_ids:
            reply = self._replies.pop(msg_id, None)
            if reply is not None:
                reply.metadata.delivered_at = now().isoformat()
                out.append(reply)
        return out

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
    ) -> list[Message]:
        """Push ``messages`` and return all replies.

        Delivery is synchronous, so every reply that will ever arrive exists
        once ``push_messages`` returns; this never sleeps. Unlike a real grid,
        ``timeout=None`` does not block forever when dropped nodes never reply.
        """
        msg_ids = self.push_messages(messages)
        replies = self.pull_messages(msg_ids)
        if timeout is None and len(replies) < len(msg_ids):
            log.warning(
                "%d message(s) got no reply; a real grid would block forever with timeout=None",
                len(msg_ids) - len(replies),
            )
        return replies
