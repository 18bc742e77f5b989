"""The site's side of secure aggregation, between Flower messages and the protocol.

After training (client/round.py) the site encodes its delta (clip, rotate, quantize
into Z_2^k), starts a protocol session and answers with its public keys; the session
and the encoded vector wait in node state for the next three stages. A stage that
fails (a tampered share, a replayed or out-of-order message) ends the site's part in
the round: it answers with the reason (which names sites and sizes, never data) and
forgets the round's secrets.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import numpy as np

from common.config import RunConfig
from common.messages import SecAggSetup, StageMessage
from common.quantize import encode, pack, unpack
from common.rotation import FloatArray
from common.secagg.encoding import encoding_spec, site_weight
from common.secagg.errors import SecAggError
from common.secagg.params import (
    PublicKeys,
    SecAggParams,
    UnmaskRequest,
    default_degree,
    pack_masked,
)
from common.secagg.site import SiteSession

log = logging.getLogger("fedsilo.site")


@dataclass(frozen=True)
class Pending:
    """What a site keeps between the stages of one secure round."""

    session: SiteSession
    encoded: bytes  # the packed encoding of its update (before masking)


def unsafe(params: SecAggParams) -> str | None:
    """Why the coordinator's protocol parameters are unsafe for this site (None: they
    are not), checked before the site trains: a neighbour graph sparser than the safe
    default for the round's size can be cut by a few dropouts (which an active
    coordinator causes by ignoring replies) into pieces that unmask separately."""
    n = len(params.participants)
    safe = default_degree(n)
    if params.degree < safe:
        return (
            f"the secure round's neighbour graph has degree {params.degree}, below the safe "
            f"{safe} for {n} sites: this site does not join it"
        )
    return None


def join(
    setup: SecAggSetup, cfg: RunConfig, vector: FloatArray, num_examples: int
) -> tuple[Pending, PublicKeys, bool]:
    """Encode the flat update (common/arrays.py ``flatten``) for the round's secure sum;
    returns the state, the public keys to advertise and whether the delta had to be
    clipped. Imports no torch: neither do the stages after it."""
    params = setup.params
    spec = encoding_spec(
        cfg, num_sites=len(params.participants), seed=setup.rotation_seed, dim=vector.size
    )
    if (spec.ring_bits, spec.encoded_length) != (params.ring_bits, params.vector_length):
        raise SecAggError(
            f"the round's secagg parameters ({params.ring_bits} bits, {params.vector_length} "
            f"elements) do not match this plan's encoding ({spec.ring_bits} bits, "
            f"{spec.encoded_length} elements)"
        )
    # Stochastic rounding must be unpredictable to the coordinator: OS entropy.
    rng = np.random.default_rng(secrets.randbits(128))
    encoded = encode(vector, spec, rng, weight=site_weight(cfg, num_examples))
    session, keys = SiteSession.start(params, setup.index)
    return Pending(session, pack(encoded.values, spec.ring_bits)), keys, encoded.clipped


def step(pending: Pending, message: StageMessage) -> tuple[StageMessage, Pending | None]:
    """Answer one stage message; the state to keep (None once the round is over)."""
    session = pending.session
    if message.session != session.params.session:
        raise SecAggError("message belongs to another secure round (stale or replayed)")
    me = session.index
    if message.stage == "share-keys":
        keys = {
            v: PublicKeys(c, s)
            for v, c, s in zip(message.ids, message.blobs, message.more, strict=True)
        }
        sealed = session.share_keys(keys)
        reply = StageMessage(
            "share-keys", message.session, ids=tuple(sealed), blobs=tuple(sealed.values())
        )
        return reply, pending
    if message.stage == "masked-input":
        params = session.params
        encoded = unpack(pending.encoded, params.ring_bits, params.vector_length)
        masked = session.masked_input(dict(zip(message.ids, message.blobs, strict=True)), encoded)
        reply = StageMessage(
            "masked-input",
            message.session,
            ids=(me,),
            blobs=(pack_masked(masked, params),),
            more=(session.commitment,),
        )
        return reply, Pending(session, b"")  # the update itself is no longer needed
    shares = session.unmask(UnmaskRequest(alive=message.alive, dropped=message.dropped))
    return StageMessage(
        "unmask", message.session, ids=tuple(shares), blobs=tuple(shares.values())
    ), None


def failure(message: StageMessage, err: Exception) -> StageMessage:
    """The reply of a site leaving the round: the protocol's reason, or a generic one."""
    reason = str(err) if isinstance(err, SecAggError) else "site error (details in the site's log)"
    return StageMessage(message.stage, message.session, error=reason[:200])
