"""The site's glue between messages and the protocol: join, step, failure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import secure
from common.arrays import flatten
from common.config import RunConfig
from common.messages import SecAggSetup, StageMessage
from common.quantize import decode_sum, unpack
from common.secagg.coordinator import CoordinatorSession
from common.secagg.encoding import encoding_spec
from common.secagg.errors import SecAggError
from common.secagg.params import SecAggParams

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


def test_three_sites_through_join_and_step_give_the_mean() -> None:
    # Prepare
    params, seed = _params()
    pending, keys = {}, {}
    for u, delta in zip(params.participants, DELTAS, strict=True):
        pending[u], keys[u], clipped = secure.join(
            SecAggSetup(params, u, seed), CFG, flatten(delta), 100
        )
        assert not clipped
    co = CoordinatorSession(params)

    # Execute: the coordinator's routing, the sites' steps
    routed = co.receive_keys(keys)
    shares = {}
    for u, peers in routed.items():
        msg = StageMessage(
            "share-keys",
            params.session,
            ids=tuple(peers),
            blobs=tuple(k.c for k in peers.values()),
            more=tuple(k.s for k in peers.values()),
        )
        reply, kept = secure.step(pending[u], msg)
        assert kept is not None
        pending[u] = kept
        shares[u] = dict(zip(reply.ids, reply.blobs, strict=True))
    masked = {}
    for u, sealed in co.receive_shares(shares).items():
        msg = StageMessage(
            "masked-input", params.session, ids=tuple(sealed), blobs=tuple(sealed.values())
        )
        reply, kept = secure.step(pending[u], msg)
        assert kept is not None and kept.encoded == b""  # the update is forgotten once masked
        pending[u] = kept
        masked[u] = (reply.blobs[0], reply.more[0])
    revealed = {}
    for u, req in co.receive_masked(masked).items():
        msg = StageMessage("unmask", params.session, alive=req.alive, dropped=req.dropped)
        reply, kept = secure.step(pending[u], msg)
        assert kept is None  # the round is over: nothing kept
        revealed[u] = dict(zip(reply.ids, reply.blobs, strict=True))
    total, alive = co.receive_unmask(revealed)

    # Assert
    spec = encoding_spec(CFG, num_sites=3, seed=seed, dim=DIM)
    mean, weight = decode_sum(total, spec, len(alive))
    expected = np.mean([flatten(d) for d in DELTAS], axis=0)
    assert weight == 3
    assert np.linalg.norm(mean - expected) < 0.01


def test_join_clips_a_large_delta_and_says_so() -> None:
    # Prepare
    params, seed = _params()
    big = {"w": torch.full((3, 4), 10.0), "b": torch.zeros(5)}

    # Execute
    pending, _, clipped = secure.join(SecAggSetup(params, 1, seed), CFG, flatten(big), 100)

    # Assert
    assert clipped
    values = unpack(pending.encoded, params.ring_bits, params.vector_length)
    assert values.shape == (params.vector_length,)


def test_join_refuses_parameters_that_do_not_match_the_plan() -> None:
    # Prepare: parameters for a 5-site ring, but the plan's encoding for 3 sites.
    spec = encoding_spec(CFG, num_sites=5, seed=1, dim=DIM)
    params = SecAggParams.create(range(1, 4), ring_bits=spec.ring_bits, vector_length=99)

    # Execute / Assert
    with pytest.raises(SecAggError, match="do not match"):
        secure.join(SecAggSetup(params, 1, 1), CFG, flatten(DELTAS[0]), 100)


def test_a_message_of_another_round_is_refused() -> None:
    # Prepare
    params, seed = _params()
    pending, _, _ = secure.join(SecAggSetup(params, 1, seed), CFG, flatten(DELTAS[0]), 100)
    stale = StageMessage("unmask", "another-session", alive=(1, 2, 3))

    # Execute / Assert
    with pytest.raises(SecAggError, match="another secure round"):
        secure.step(pending, stale)


def test_a_stage_out_of_order_is_refused() -> None:
    # Prepare
    params, seed = _params()
    pending, _, _ = secure.join(SecAggSetup(params, 1, seed), CFG, flatten(DELTAS[0]), 100)

    # Execute / Assert: unmask before any share was exchanged
    with pytest.raises(SecAggError, match="not allowed at stage 'advertised'"):
        secure.step(pending, StageMessage("unmask", params.session, alive=(1, 2, 3)))


def test_failure_replies_name_the_protocol_reason_or_nothing() -> None:
    msg = StageMessage("unmask", "s")
    assert secure.failure(msg, SecAggError("ciphertext failed authentication")).error == (
        "ciphertext failed authentication"
    )
    generic = secure.failure(msg, RuntimeError("/data/patients.csv line 7: SECRET"))
    assert "SECRET" not in generic.error and "site's log" in generic.error
