"""The coordinator's ServerApp: Flower's Grid as a transport for server.federation.

The same ``main`` runs under ``flwr run .`` (config from pyproject.toml and
``--run-config``), the Simulation Engine (``fedsilo simulate`` hands over its config,
parsed once: ``make_server_app``), the Deployment Engine and the in-process test grid.
Everything behind ``GridTransport`` speaks common/messages.py's values; this module and
the record codec are where Flower's records are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import HttpGrid

from common.codec import (
    content_bytes,
    decode_reply,
    decode_stage,
    encode_plan,
    encode_stage,
    encode_train,
)
from common.config import RunConfig
from common.messages import StageMessage, TrainReply, TrainRequest, WireError
from common.outputs import RunSummary
from server.aggregation import Reply
from server.federation import run_federation
from server.report import Reporter

log = logging.getLogger("fedsilo.coordinator")


_ERROR_CODES = {
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "site could not load the ClientApp",
    ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "site crashed in the round",
    ErrorCode.MESSAGE_UNAVAILABLE: "message expired before the site took it",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "site's reply expired",
    ErrorCode.NODE_UNAVAILABLE: "site went offline",
    ErrorCode.CLIENT_APP_CRASHED: "site's ClientApp process crashed",
}


M = TypeVar("M", TrainReply, StageMessage)
# Between pulls of the replies: 20 ms at first, growing to at most 100 ms (Flower's
# in-memory grid pulls every 100 ms), so a long exchange asks the SuperLink at most ten
# times a second.
POLL_SECONDS, MAX_POLL_SECONDS = 0.02, 0.1


# How an exchange is going: its message group, the sites that answered, the sites
# asked, seconds so far, and whether it is over.
Progress = Callable[[str, int, int, float, bool], None]


class GridTransport:
    """One message per node and stage over Flower's Grid: encodes the workflows'
    messages, decodes (and validates) the replies, counts the bytes sites send, and
    tells ``progress`` how each exchange is going while it waits."""

    def __init__(self, grid: Grid, *, timeout: float, progress: Progress | None = None) -> None:
        self.grid = grid
        self.timeout = timeout
        self.progress = progress

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def train(
        self, requests: Mapping[int, TrainRequest], *, group: str
    ) -> dict[int, Reply[TrainReply]]:
        bases: dict[tuple[int, int], RecordDict] = {}
        contents: dict[int, RecordDict] = {}
        for nid, request in requests.items():
            # The sites of a round share its plan and arrays: convert the arrays once.
            key = (id(request.plan), id(request.arrays))
            if key not in bases:
                bases[key] = encode_plan(request.plan, request.arrays)
            contents[nid] = encode_train(request, bases[key])
        return self._exchange(contents, group, decode_reply)

    def stage(
        self, messages: Mapping[int, StageMessage], *, group: str
    ) -> dict[int, Reply[StageMessage]]:
        stages = {m.stage for m in messages.values()}
        if len(stages) > 1:
            raise ValueError(f"one exchange carries one stage, got {sorted(stages)}")
        expect = stages.pop() if stages else None
        contents = {nid: encode_stage(m) for nid, m in messages.items()}
        return self._exchange(contents, group, lambda c: decode_stage(c, expect=expect))

    def _send_and_receive(self, messages: list[Message], group: str = "") -> list[Message]:
        """Push, then pull until every reply is in or the timeout passes. Flower's Grid
        offers no blocking wait: its own ``send_and_receive`` polls every 3 s deployed
        (0.1 s in simulation), and a back-off to 1 s cost every exchange half a second
        on average (a training exchange ended on a poll tick, 6.47 s, in every round)."""
        pending = set(self.grid.push_messages(messages))
        started = time.monotonic()
        deadline = started + self.timeout
        delay, replies = POLL_SECONDS, []
        while pending:
            got = list(self.grid.pull_messages(list(pending)))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or time.monotonic() >= deadline:
                break
            if self.progress is not None:
                self.progress(group, len(replies), len(messages), time.monotonic() - started, False)
            time.sleep(delay)
            delay = min(delay * 1.5, MAX_POLL_SECONDS)
        if self.progress is not None:
            self.progress(group, len(replies), len(messages), time.monotonic() - started, True)
        return replies

    def _exchange(
        self, contents: dict[int, RecordDict], group: str, decode: Callable[[RecordDict], M]
    ) -> dict[int, Reply[M]]:
        messages = [
            Message(content=c, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=group)
            for nid, c in contents.items()
        ]
        replies = self._send_and_receive(messages, group)
        out: dict[int, Reply[M]] = {}
        for reply in replies:
            nid = reply.metadata.src_node_id
            if nid not in contents or nid in out:
                log.warning("ignoring an unexpected reply from node %s", nid)
                continue
            if reply.has_error():
                # Flower's reason text may quote site data: only the code is kept.
                code = reply.error.code
                what = _ERROR_CODES.get(code, "site error")
                out[nid] = Reply(None, f"{what} (Flower error {code})")
                continue
            nbytes = content_bytes(reply.content)
            try:
                out[nid] = Reply(decode(reply.content), None, nbytes)
            except WireError as err:
                out[nid] = Reply(None, f"malformed reply: {err}", nbytes)
        for nid in contents:
            out.setdefault(nid, Reply(None, "no reply before the round timeout"))
        return out


def with_run_folders(cfg: RunConfig) -> RunConfig:
    """The config with its output folder (default ``runs/<timestamp>``) and the
    simulated sites' folder (default ``<out-dir>/sites``) resolved: the plan carries
    them (simulated sites write their ledgers there)."""
    out_dir = cfg.out_dir or str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    out_dir = str(Path(out_dir).resolve())  # the run prints and records where it is
    sites_dir = str(Path(cfg.sites_dir or Path(out_dir) / "sites").resolve())
    return cfg.model_copy(update={"out_dir": out_dir, "sites_dir": sites_dir})


def serve(grid: Grid, cfg: RunConfig, *, run_id: int | str = "") -> RunSummary:
    """Run the federation over ``grid``; ``cfg`` was parsed once, at the edge. The
    Deployment Engine's grid talks to a SuperLink over HTTP; the Simulation Engine's is
    in memory (the banner shows only what applies to the engine in use)."""
    cfg = with_run_folders(cfg)
    # Flower's logger runs at DEBUG in the ServerApp's process, and `flwr run --stream`
    # shows it: our table says what happens, Flower's INFO and above say the rest.
    logging.getLogger("flwr").setLevel(logging.INFO)
    reporter = Reporter(deployed=isinstance(grid, HttpGrid))
    transport = GridTransport(grid, timeout=cfg.round_timeout, progress=reporter.exchange)
    return run_federation(cfg, transport, Path(cfg.out_dir).resolve(), reporter, run_id=str(run_id))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, RunConfig.from_user_config(context.run_config), run_id=context.run_id)


def make_server_app(cfg: RunConfig) -> ServerApp:
    """The same ServerApp with a config given in Python: how ``fedsilo simulate`` passes
    its options (Flower's Python simulation entry point carries no run config)."""
    configured = ServerApp()

    @configured.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, cfg, run_id=context.run_id)

    return configured
