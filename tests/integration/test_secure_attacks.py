"""Issue 13's attacks on secure aggregation through the real ServerApp and ClientApp on
the in-process grid: the coordinator substitutes a site's keys (it relays every
advert), and a malicious site lies about a share it reveals."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message

from client.app import SECAGG_STATE_KEY
from client.app import app as client_app
from common.codec import STAGE_KEY, decode_stage, encode_stage, is_stage
from common.privacy.identity import open_state
from common.privacy.ledger import LEDGER_FILE
from common.secagg import crypto
from common.secagg.params import Advert, PublicKeys, SecAggParams, reveal_message
from common.secagg.site import SiteSession
from server.app import app as server_app
from tests.support.inprocess_grid import NODE_ID_OFFSET, InProcessGrid
from tests.support.runs import SMALL_RUN

RUN = {**SMALL_RUN, "num-server-rounds": 1, "server-optimizer": "fedavg", "server-ema": 0.0}
SITES = 5  # complete graph, threshold 4: one site may leave the round


def _nodes() -> list[dict[str, int]]:
    return [{"partition-id": i, "num-partitions": 20} for i in range(SITES)]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


class SubstitutingGrid(InProcessGrid):
    """The coordinator as the adversary: in the share-keys message to ``victim`` (every
    site's advert) it swaps the signed advert of protocol index ``swap`` for keys it
    made itself (signed with a key of its own, as the coordinator runs the CA and can
    register any node)."""

    victim = NODE_ID_OFFSET
    swap = 2
    params: SecAggParams | None = None

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        for msg in messages:
            if not is_stage(msg.content):
                continue
            stage = decode_stage(msg.content)
            if stage.setup is not None:
                self.params = stage.setup.params  # the advertise message: left alone
            if stage.stage != "share-keys" or msg.metadata.dst_node_id != self.victim:
                continue
            assert self.params is not None
            forger = Ed25519PrivateKey.generate()
            c, s = crypto.generate_keypair(), crypto.generate_keypair()
            fake = Advert.make(
                self.params,
                self.swap,
                forger.public_key().public_bytes_raw(),
                PublicKeys(c.public, s.public),
                forger.sign,
            )
            blobs = list(stage.blobs)
            blobs[stage.ids.index(self.swap)] = fake.to_bytes()
            forged = encode_stage(dataclasses.replace(stage, blobs=tuple(blobs)))
            msg.content.config_records[STAGE_KEY] = forged.config_records[STAGE_KEY]
        return super().push_messages(messages)


def test_key_substitution_is_refused_by_the_victim_before_it_trains(tmp_path: Path) -> None:
    # Attack (issue 13, 1): with unauthenticated keys the victim sealed both its
    # self-mask share and its key share to the coordinator, which then stripped every
    # mask from its input. Now every advert must verify under a key on the site's roster.
    out = tmp_path / "run"
    grid = SubstitutingGrid(
        client_app, num_nodes=SITES, node_configs=_nodes(), run_config={**RUN, "out-dir": str(out)}
    )

    server_app(grid, grid.server_context())

    row = _summary(out)["rounds"][0]
    notes = {n["site"]: n for n in row["notes"]}
    victim = notes["site-0"]  # it never trained; its name is its pre-flight answer's
    assert victim["status"] == "failed"
    assert "left at share-keys" in victim["reason"]
    assert "site-1's identity key is not on this site's roster" in victim["reason"]
    # It refused before charging or touching its data, and dealt no share to anyone.
    assert not (out / "sites" / "site-0" / LEDGER_FILE).exists()
    # The others completed the round without it (4 sites, threshold 4).
    assert row["status"] == "ok" and row["trained"] == SITES - 1


def _lying_client(liar: int):  # type: ignore[no-untyped-def]
    """The real ClientApp, except that node ``liar`` flips a byte of the first share it
    reveals and signs the result with its own identity key (a malicious site can)."""

    def app(message: Message, context: Context) -> Message:
        node = context.node_id
        record = context.state.config_records.get(SECAGG_STATE_KEY)
        session = SiteSession.from_json(str(record["session"])) if record else None
        state_dir = str(record["state-dir"]) if record else ""
        reply = client_app(message, context)
        unmask = message.metadata.group_id.endswith("/unmask")
        if node != liar or not unmask or reply.has_error() or session is None:
            return reply
        stage = decode_stage(reply.content)
        if stage.stage != "unmask" or not stage.ids:
            return reply
        shares = dict(zip(stage.ids, stage.blobs, strict=True))
        first = stage.ids[0]
        bad = bytearray(shares[first])
        bad[-1] ^= 1
        shares[first] = bytes(bad)
        sign = open_state(Path(state_dir)).identity.sign
        signature = sign(reveal_message(session.params, session.index, shares))
        lie = type(stage)(
            "unmask",
            stage.session,
            ids=tuple(shares),
            blobs=tuple(shares.values()),
            signature=signature,
        )
        return Message(encode_stage(lie), reply_to=message)

    return app


def test_a_lying_share_is_named_and_the_round_completes(tmp_path: Path) -> None:
    # Attack (issue 13, 4): one malicious site flipped one byte of one revealed share;
    # every secure round aborted after all sites had trained (and spent), blaming an
    # honest holder. Now each share is checked against its dealer's signed hash: the
    # liar's shares are discarded and it is named, the others' suffice.
    out = tmp_path / "run"
    liar = NODE_ID_OFFSET + 3
    grid = InProcessGrid(
        _lying_client(liar),
        num_nodes=SITES,
        node_configs=_nodes(),
        run_config={**RUN, "out-dir": str(out), "round-timeout": 30.0},
    )

    server_app(grid, grid.server_context())

    row = _summary(out)["rounds"][0]
    assert row["status"] == "ok"
    assert row["trained"] == SITES  # the liar's masked input is in the sum (it was bounded)
    rejected = [n for n in row["notes"] if n["status"] == "rejected"]
    assert [n["site"] for n in rejected] == ["site-3"]
    assert "did not deal it" in rejected[0]["reason"]


def _cheating_client(cheat: int):  # type: ignore[no-untyped-def]
    """The real ClientApp, except that node ``cheat``, once it has dealt the shares of
    its self-mask seed, masks with (and commits to) another seed: its dealt shares all
    match its signed entries, but rebuild a seed it did not commit to."""

    def app(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        dealt = message.metadata.group_id.endswith("/share-keys")
        record = context.state.config_records.get(SECAGG_STATE_KEY)
        if context.node_id == cheat and dealt and record is not None:
            session = json.loads(str(record["session"]))
            session["b"] = base64.b64encode(os.urandom(32)).decode()
            record["session"] = json.dumps(session)
        return reply

    return app


def test_a_site_proven_to_cheat_is_named_and_not_asked_again(tmp_path: Path) -> None:
    # A malicious site can still fail one round after the others trained (shares that
    # match their hashes but not its commitment: only verifiable secret sharing would
    # catch that before training). It is proven to have cheated, named, and left out of
    # every later round of the run, so it costs the others one round, not every round.
    out = tmp_path / "run"
    cheat = NODE_ID_OFFSET + 2
    grid = InProcessGrid(
        _cheating_client(cheat),
        num_nodes=SITES,
        node_configs=_nodes(),
        run_config={**RUN, "num-server-rounds": 2, "out-dir": str(out)},
    )

    server_app(grid, grid.server_context())

    first, second = _summary(out)["rounds"]
    assert first["status"] == "failed"
    assert "site-2" in first["reason"] and "cheated" in first["reason"]
    notes = {n["site"]: n for n in first["notes"]}
    assert notes["site-2"]["status"] == "rejected" and "cheated" in notes["site-2"]["reason"]
    assert all(n["status"] == "failed" for s, n in notes.items() if s != "site-2")
    assert second["status"] == "ok" and second["trained"] == SITES - 1
    assert "site-2" not in second["trained_sites"]
    assert {"site": "site-2", "status": "rejected"}.items() <= second["notes"][0].items()
    assert "proven to cheat in secure aggregation in round 1" in second["notes"][0]["reason"]
