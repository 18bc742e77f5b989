"""The coordinator's ServerApp: Flower's Grid as a transport for server.federation.

The same ``main`` runs under ``flwr run .`` (config from pyproject.toml and
``--run-config``), the Simulation Engine (``fedsilo simulate`` adds its overrides),
the Deployment Engine and the in-process test grid.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.wire import content_bytes
from server.aggregation import Reply
from server.federation import run_federation
from server.report import Reporter

log = logging.getLogger("fedsilo.coordinator")


class GridTransport:
    """One message per node and stage over Flower's Grid; replies keyed by node."""

    def __init__(self, grid: Grid, *, timeout: float) -> None:
        self.grid = grid
        self.timeout = timeout

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def exchange(self, contents: dict[int, RecordDict], *, group: str) -> dict[int, Reply]:
        messages = [
            Message(content=c, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=group)
            for nid, c in contents.items()
        ]
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        out: dict[int, Reply] = {}
        for reply in replies:
            nid = reply.metadata.src_node_id
            if nid not in contents or nid in out:
                log.warning("ignoring an unexpected reply from node %s", nid)
                continue
            if reply.has_error():
                out[nid] = Reply(None, f"site error {reply.error.code}")
                continue
            out[nid] = Reply(reply.content, None, content_bytes(reply.content))
        for nid in contents:
            out.setdefault(nid, Reply(None, "no reply before the round timeout"))
        return out


def out_dir_for(cfg: RunConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def serve(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    cfg = RunConfig.from_user_config(run_config)
    out_dir = out_dir_for(cfg)
    # The plan carries the resolved folders (simulated sites write their ledgers there).
    sites_dir = cfg.sites_dir or str(out_dir / "sites")
    cfg = cfg.with_overrides({"out-dir": str(out_dir), "sites-dir": sites_dir})
    transport = GridTransport(grid, timeout=cfg.round_timeout)
    return run_federation(cfg, transport, out_dir, Reporter())


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context.run_config)


def make_server_app(overrides: Mapping[str, Any]) -> ServerApp:
    """The same ServerApp with run-config overrides: how ``fedsilo simulate`` passes its
    options (Flower's Python simulation entry point carries no run config)."""
    configured = ServerApp()

    @configured.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, {**context.run_config, **overrides})

    return configured
