"""The coordinator as the adversary, against the real ClientApp on the in-process grid:
it chooses the global weights and the plan and reads every reply and ledger head."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from client.app import app as client_app
from common.codec import decode_reply, encode_train
from common.config import RunConfig
from common.messages import RoundPlan, TrainReply, TrainRequest
from common.model import build_model, model_spec
from common.privacy.identity import init_state
from common.privacy.ledger import LEDGER_FILE, LedgerEntry, read_ledger, row_digest
from common.task import run_task
from common.text import encode
from tests.support.inprocess_grid import InProcessGrid

WORD = "headache"  # a public token the coordinator wants to find at a site
WORDS = "the film was good and bad fun boring long short plot actors story".split()
CFG = RunConfig(
    num_server_rounds=3,
    max_length=16,
    batch_size=32,
    epsilon=3.0,
    secure_aggregation=False,
)
PROBE = CFG.with_overrides({"learning-rate": 1e-20})


def _site_file(path: Path, with_word: bool) -> Path:
    last = WORD if with_word else "story"
    rows = [f"the film was {w} and {last},{'fresh' if i % 2 else 'rotten'}" for i, w in
            enumerate(WORDS * 10)]  # fmt: skip
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def _sites(tmp_path: Path, **node: Any) -> list[dict[str, Any]]:
    configs = []
    for name, with_word in (("holds-word", True), ("lacks-word", False)):
        state = tmp_path / name / "state"
        init_state(state, site_id=name)
        configs.append(
            {
                "data-path": str(_site_file(tmp_path / f"{name}.csv", with_word)),
                "site-id": name,
                "epsilon": 6.0,
                "data-size": 130,
                "state-dir": str(state),
                # These probes aim at the training path, which plain and secure rounds
                # share; the sites opt in to plain rounds to be probed directly.
                "secagg-required": False,
                **node,
            }
        )
    return configs


def crafted_weights() -> dict[str, torch.Tensor]:
    """Finite weights aimed at WORD: the first LayerNorm's gain and bias on the
    coordinate where WORD's (public) embedding stands out most from the common words'
    are set so that its activation reaches 2.2e19 only where WORD occurs (the others
    stay below 5e18); a a^T then overflows float32 in the ghost norm, while qkv ignores
    that coordinate and the zero head keeps every upstream gradient zero: the true
    norm fits, and only the site holding WORD used to fail. (With PROBE's tiny
    learning rate the weights hardly move during the round.)"""
    model = build_model(model_spec(run_task(CFG)), seed=0)
    table = model.embed.weight.detach()
    token = int(encode([WORD], 4).ids[0][1])
    others = sorted(set(encode([" ".join(WORDS) + " story"], 32).ids.flatten().tolist()) - {token})

    def normed(e: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(e, (e.shape[-1],))

    mine, theirs = normed(table[token]), normed(table[others])
    low, high = theirs.min(0).values, theirs.max(0).values
    centre, half = (low + high) / 2, (high - low) / 2
    j = int(((mine - centre).abs() / half).argmax())
    gain = 2.2e19 / float((mine[j] - centre[j]).abs())
    state = {k: v.clone() for k, v in model.trainable_state().items()}
    state["layers.0.norm1.weight"][j] = gain
    state["layers.0.norm1.bias"][j] = -gain * float(centre[j])
    state["layers.0.qkv.weight"][:, j] = 0.0
    return state


def _coordinator(
    arrays: Callable[[int], dict[str, torch.Tensor]], plans: Callable[[int], RunConfig]
) -> tuple[ServerApp, list[dict[str, TrainReply]]]:
    """A ServerApp that sends its own weights and plans for CFG's rounds and keeps the
    decoded replies by site."""
    seen: list[dict[str, TrainReply]] = []
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for rnd in range(1, CFG.num_server_rounds + 1):
            content = encode_train(TrainRequest(RoundPlan(rnd, plans(rnd)), arrays(rnd)))
            msgs = [
                Message(content, nid, "train", group_id=str(rnd)) for nid in grid.get_node_ids()
            ]
            replies = [decode_reply(r.content) for r in grid.send_and_receive(msgs)]
            seen.append({r.report.site: r for r in replies})

    return app, seen


def _run(tmp_path: Path, nodes: list[dict[str, Any]], **kw: Any) -> list[dict[str, TrainReply]]:
    app, seen = _coordinator(**kw)
    grid = InProcessGrid(client_app, len(nodes), node_configs=nodes)
    app(grid, grid.server_context())
    return seen


def _ledger(node: dict[str, Any]) -> list[LedgerEntry]:
    path = Path(node["state-dir"]) / LEDGER_FILE
    return read_ledger(path) if path.exists() else []


@pytest.mark.parametrize("bound", [None, 1e30])
def test_crafted_weights_cannot_tell_which_site_holds_a_word(
    tmp_path: Path, bound: float | None
) -> None:
    # Before: the site holding WORD failed 3 of 3 probes with 0 ledger entries, the
    # other trained: a membership test at zero recorded epsilon. Now the weights are
    # refused by the public norm bound (the default), or, with the bound raised, the
    # norm is found without overflow: the outcome is the same either way, and charged.
    weights = crafted_weights()
    nodes = _sites(tmp_path, **({} if bound is None else {"max-global-norm": bound}))

    seen = _run(tmp_path, nodes, arrays=lambda _: weights, plans=lambda _: PROBE)

    for replies in seen:
        statuses = {site: r.report.status for site, r in replies.items()}
        assert statuses["holds-word"] == statuses["lacks-word"], statuses
        reasons = {r.report.reason for r in replies.values()}
        assert len(reasons) == 1
    ledgers = [_ledger(n) for n in nodes]
    if bound is None:
        assert all(r.report.status == "refused" for row in seen for r in row.values())
        assert "public bound" in seen[0]["holds-word"].report.reason
        assert ledgers == [[], []]  # refused before anything was touched
    else:
        assert all(r.report.status == "ok" for row in seen for r in row.values())
        assert [len(entries) for entries in ledgers] == [3, 3]  # every probe charged


def test_a_plan_changed_mid_run_is_refused_and_nothing_is_spent(tmp_path: Path) -> None:
    nodes = _sites(tmp_path)
    start = build_model(model_spec(run_task(CFG)), seed=0).trainable_state()
    # Round 1 as planned, then a plan that would recalibrate: batch size 1 (sample rate
    # 1/n), a tenfold epsilon.
    changes = {1: {}, 2: {"batch-size": 1}, 3: {"epsilon": 30.0}}

    seen = _run(
        tmp_path,
        nodes,
        arrays=lambda _: start,
        plans=lambda rnd: CFG.with_overrides(changes[rnd]),
    )

    assert {r.report.status for r in seen[0].values()} == {"ok"}
    for replies in seen[1:]:
        for reply in replies.values():
            assert reply.report.status == "refused"
            assert "the plan changed during run" in reply.report.reason
    assert [len(_ledger(n)) for n in nodes] == [1, 1]


def test_ledger_heads_cannot_be_tested_against_guessed_data(tmp_path: Path) -> None:
    # Attack: every field of a ledger entry is known to the coordinator but the data
    # fingerprint (was an unkeyed hash of the rows) and a microsecond time; guessing the
    # data set and brute-forcing the time recovered the head. Now the fingerprint is an
    # HMAC under a key that never leaves the site.
    nodes = _sites(tmp_path)
    start = build_model(model_spec(run_task(CFG)), seed=0).trainable_state()
    seen = _run(tmp_path, nodes, arrays=lambda _: start, plans=lambda _: CFG)
    reply = seen[0]["holds-word"]
    entry = _ledger(nodes[0])[0]
    assert entry.entry_hash() == reply.report.ledger_head

    # The coordinator's best guess: the true file, hashed every way it could be.
    data = Path(nodes[0]["data-path"]).read_bytes()
    lines = data.decode().splitlines()[1:]
    texts = [line.rsplit(",", 1)[0] for line in lines]
    labels = [1 if line.endswith("fresh") else 0 for line in lines]
    guesses = {
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(b"fedsilo-file-v1\n" + data).hexdigest(),
        row_digest(texts, labels).hex(),
    }
    from dataclasses import replace

    for guess in guesses:
        forged = replace(entry, dataset=guess)
        assert forged.entry_hash() != reply.report.ledger_head
    assert entry.dataset not in guesses
