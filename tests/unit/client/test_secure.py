"""The site's glue between messages and the protocol: advertise, step, admit, masked,
failure."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from client import secure
from common.arrays import flatten
from common.config import RunConfig
from common.messages import RoundPlan, SecAggSetup, StageMessage
from common.privacy.identity import init_state
from common.quantize import decode_sum, unpack
from common.secagg.coordinator import CoordinatorSession
from common.secagg.encoding import encoding_spec
from common.secagg.errors import SecAggError
from common.secagg.params import Advert, SecAggParams
from common.secagg.roster import Roster, enrol

CFG = RunConfig(update_clip_norm=1.0)
DELTAS = [
    {"w": torch.full((3, 4), 0.01 * (i + 1)), "b": torch.linspace(-0.1, 0.1, 5)} for i in range(3)
]
DIM = 17


def _params(num_sites: int = 3, seed: int = 5) -> tuple[SecAggParams, int]:
    spec = encoding_spec(CFG, num_sites=num_sites, seed=seed, dim=DIM)
    params = SecAggParams.create(
        range(1, num_sites + 1), ring_bits=spec.ring_bits, vector_length=spec.encoded_length
    )
    return params, seed


def _advertised(
    tmp_path: Path, params: SecAggParams, seed: int, *, min_sites: int = 3
) -> tuple[dict[int, secure.Pending], dict[int, Advert]]:
    """Every participant with a state folder, enrolled in one roster, advertised."""
    roster = tmp_path / "roster.json"
    pending, adverts = {}, {}
    for u in params.participants:
        folder = tmp_path / f"site-{u}"
        keys = init_state(folder, site_id=f"site-{u}")
        identity = keys.identity.public_key.public_bytes_raw()
        enrol(roster, f"site-{u}", identity)
        reply, pending[u] = secure.advertise(
            SecAggSetup(params, u, seed),
            identity=identity,
            sign=keys.identity.sign,
            state_dir=folder,
            roster=roster,
            min_sites=min_sites,
        )
        adverts[u] = Advert.from_bytes(u, reply.blobs[0])
    return pending, adverts


def _share_and_open(
    co: CoordinatorSession, pending: dict[int, secure.Pending], adverts: dict[int, Advert]
) -> tuple[int, ...]:
    """The two stages before training: share keys, open shares; the round's sites."""
    session = next(iter(pending.values())).session.params.session
    routed = co.receive_adverts(adverts)
    everyone = StageMessage(
        "share-keys",
        session,
        ids=tuple(routed),
        blobs=tuple(a.to_bytes() for a in routed.values()),
    )
    shares = {}
    for u in pending:
        reply, kept = secure.step(pending[u], everyone)
        assert kept is not None
        pending[u] = kept
        shares[u] = (
            {v: b for v, b in zip(reply.ids, reply.blobs, strict=True) if v != u},
            dict(zip(reply.ids, reply.more, strict=True)),
        )
    refused = {}
    for u, (sealed, dealt) in co.receive_shares(shares).items():
        msg = StageMessage(
            "open-shares",
            session,
            ids=tuple(sealed),
            blobs=tuple(sealed.values()),
            more=tuple(dealt[v] for v in sealed),
        )
        reply, kept = secure.step(pending[u], msg)
        assert kept is not None
        pending[u] = kept
        refused[u] = reply.dropped
    return co.receive_opened(refused)


def test_three_sites_through_every_stage_give_the_mean(tmp_path: Path) -> None:
    # Prepare
    params, seed = _params()
    pending, adverts = _advertised(tmp_path, params, seed)
    co = CoordinatorSession(params)

    # Execute: the coordinator's routing, the sites' steps
    members = _share_and_open(co, pending, adverts)
    masked = {}
    for u, delta in zip(params.participants, DELTAS, strict=True):
        setup = SecAggSetup(params, u, seed, members)
        pending[u] = secure.admit(pending[u], setup, RoundPlan(1, CFG), DIM)
        reply, pending[u], clipped = secure.masked(pending[u], setup, CFG, flatten(delta), 100)
        assert not clipped
        masked[u] = (reply.blobs[0], reply.more[0])
    survivors = co.receive_masked(masked)
    signed = {}
    for u in survivors.alive:
        msg = StageMessage("consistency", params.session, alive=survivors.alive)
        reply, kept = secure.step(pending[u], msg)
        assert kept is not None
        pending[u] = kept
        signed[u] = reply.signature
    signatures = co.receive_signatures(signed)
    revealed = {}
    for u in signatures:
        msg = StageMessage(
            "unmask",
            params.session,
            ids=tuple(signatures),
            blobs=tuple(signatures.values()),
            alive=survivors.alive,
        )
        reply, kept = secure.step(pending[u], msg)
        assert kept is None  # the round is over: nothing kept
        revealed[u] = (dict(zip(reply.ids, reply.blobs, strict=True)), reply.signature)
    total, alive = co.receive_unmask(revealed)

    # Assert
    spec = encoding_spec(CFG, num_sites=3, seed=seed, dim=DIM)
    mean, weight = decode_sum(total, spec, len(alive))
    expected = np.mean([flatten(d) for d in DELTAS], axis=0)
    assert weight == 3
    assert np.linalg.norm(mean - expected) < 0.01


def test_a_site_refuses_to_advertise_below_its_own_minimum(tmp_path: Path) -> None:
    params, seed = _params(3)
    with pytest.raises(SecAggError, match="has 3 sites, this site requires at least 4"):
        _advertised(tmp_path, params, seed, min_sites=4)


def test_a_site_refuses_a_degree_below_the_safe_default() -> None:
    params = SecAggParams.create(range(1, 21), ring_bits=12, vector_length=4, degree=4)
    assert "below the safe" in str(secure.unsafe(params, 3))
    assert (
        secure.unsafe(SecAggParams.create(range(1, 21), ring_bits=12, vector_length=4), 3) is None
    )


def _everyone(params: SecAggParams, adverts: dict[int, Advert]) -> StageMessage:
    return StageMessage(
        "share-keys",
        params.session,
        ids=tuple(adverts),
        blobs=tuple(a.to_bytes() for a in adverts.values()),
    )


def test_a_site_refuses_adverts_from_sites_not_on_its_roster(tmp_path: Path) -> None:
    # Prepare: site 3's roster lists sites 1 and 3 only (site 2's key is unknown to it).
    params, seed = _params()
    pending, adverts = _advertised(tmp_path, params, seed)
    roster = Roster.load(tmp_path / "roster.json")
    partial = Roster({k: v for k, v in roster.sites.items() if k != "site-2"})
    (tmp_path / "partial.json").write_text(partial.to_json())
    mine = replace(pending[3], roster=str(tmp_path / "partial.json"))

    # Execute / Assert: refused before any share is dealt
    with pytest.raises(SecAggError, match="site 2's identity key is not on this site's roster"):
        secure.step(mine, _everyone(params, adverts))
    assert mine.session.stage == "advertised"


def test_a_site_without_a_roster_refuses_naming_the_command(tmp_path: Path) -> None:
    params, seed = _params()
    pending, adverts = _advertised(tmp_path, params, seed)
    (tmp_path / "roster.json").unlink()
    with pytest.raises(SecAggError, match="fedsilo site roster"):
        secure.step(pending[1], _everyone(params, adverts))


def _opened(
    tmp_path: Path, params: SecAggParams, seed: int
) -> tuple[dict[int, secure.Pending], tuple[int, ...]]:
    pending, adverts = _advertised(tmp_path, params, seed)
    return pending, _share_and_open(CoordinatorSession(params), pending, adverts)


def test_masking_clips_a_large_delta_and_says_so(tmp_path: Path) -> None:
    # Prepare
    params, seed = _params()
    pending, members = _opened(tmp_path, params, seed)
    setup = SecAggSetup(params, 1, seed, members)
    big = {"w": torch.full((3, 4), 10.0), "b": torch.zeros(5)}

    # Execute
    kept = secure.admit(pending[1], setup, RoundPlan(1, CFG), DIM)
    reply, kept, clipped = secure.masked(kept, setup, CFG, flatten(big), 100)

    # Assert
    assert clipped
    values = unpack(reply.blobs[0], params.ring_bits, params.vector_length)
    assert values.shape == (params.vector_length,)


def test_admit_refuses_parameters_that_do_not_match_the_plan_before_training(
    tmp_path: Path,
) -> None:
    # Prepare: parameters for a 3-site round whose vector length is not the plan's.
    params = SecAggParams.create(range(1, 4), ring_bits=12, vector_length=99)
    pending, members = _opened(tmp_path, params, 1)

    # Execute / Assert
    with pytest.raises(SecAggError, match="do not match"):
        secure.admit(pending[1], SecAggSetup(params, 1, 1, members), RoundPlan(1, CFG), DIM)


def test_admit_refuses_a_train_message_of_another_round(tmp_path: Path) -> None:
    params, seed = _params()
    pending, members = _opened(tmp_path, params, seed)
    other, _ = _params()
    with pytest.raises(SecAggError, match="not the one this site advertised in"):
        secure.admit(pending[1], SecAggSetup(other, 1, seed, members), RoundPlan(1, CFG), DIM)


def test_a_message_of_another_round_is_refused(tmp_path: Path) -> None:
    # Prepare
    params, seed = _params()
    pending, _ = _advertised(tmp_path, params, seed)
    stale = StageMessage("unmask", "another-session", alive=(1, 2, 3))

    # Execute / Assert
    with pytest.raises(SecAggError, match="another secure round"):
        secure.step(pending[1], stale)


def test_a_stage_out_of_order_is_refused(tmp_path: Path) -> None:
    # Prepare
    params, seed = _params()
    pending, _ = _advertised(tmp_path, params, seed)

    # Execute / Assert: opening shares before dealing, an unmask before anything
    with pytest.raises(SecAggError, match="open shares is not allowed at stage 'advertised'"):
        secure.step(pending[1], StageMessage("open-shares", params.session))
    with pytest.raises(SecAggError, match="not allowed at stage 'advertised'"):
        secure.step(pending[1], StageMessage("unmask", params.session, alive=(1, 2, 3)))


def test_failure_replies_carry_the_public_reason_truncated() -> None:
    msg = StageMessage("unmask", "s")
    assert secure.failure(msg, "ciphertext failed authentication").error == (
        "ciphertext failed authentication"
    )
    assert len(secure.failure(msg, "x" * 500).error) == 200
