"""minilm-probe through the real ServerApp and ClientApp on the in-process grid (issue
15): three sites train a linear head on the frozen pretrained encoder's features with
DP-SGD inside the secure sum; only the head travels, and it learns."""

from __future__ import annotations

import json
from pathlib import Path

from client.app import app as client_app
from common.privacy.ledger import LEDGER_FILE, read_ledger
from server.app import app as server_app
from tests.support.inprocess_grid import InProcessGrid
from tests.support.runs import SMALL_RUN


def test_three_sites_train_the_probes_head_with_dp_in_the_secure_sum(tmp_path: Path) -> None:
    grid = InProcessGrid(
        client_app,
        num_nodes=3,
        node_configs=[{"partition-id": i, "num-partitions": 10} for i in range(3)],
        run_config={
            **SMALL_RUN,
            "model-preset": "minilm-probe",
            "learning-rate": 8.0,
            "num-server-rounds": 3,
            # the current model, not the moving average (which after 3 rounds is mostly
            # round 1's): the check is that the head learns, not how the average lags
            "server-ema": 0.0,
            "max-length": 32,
            "out-dir": str(tmp_path),
        },
    )
    server_app(grid, grid.server_context())
    summary = json.loads((tmp_path / "summary.json").read_text())

    rounds = summary["rounds"]
    assert [r["trained"] for r in rounds] == [3, 3, 3]
    # 384 x 2 + 2 head parameters at 12 bits, masked: a few KiB, not the encoder's 87 MiB
    assert max(b for r in rounds for b in r["upload_bytes"].values()) < 16 * 1024
    # the pretrained features carry sentiment: above the 0.58 majority class already
    assert rounds[-1]["accuracy"] > 0.62, [r["accuracy"] for r in rounds]
    for i in range(3):
        entries = read_ledger(tmp_path / "sites" / f"site-{i}" / LEDGER_FILE)
        assert len(entries) == 3 and entries[-1].epsilon_run <= 4.0 + 1e-6
