"""The site's side of secure aggregation, between Flower messages and the protocol.

A secure round runs three stages before the site trains, none of which touches its
data: ``advertise`` (it checks the coordinator's parameters against its own safety
rules, makes fresh keys and signs them with its identity key), ``share-keys`` (it
checks every site's signed advert against its roster, then deals shares of its
secrets) and ``open-shares`` (it opens and checks the shares dealt to it). The train
message then names the round's final sites: the site checks them (``admit``), and
only then trains (client/round.py), encodes its delta (clip, rotate, quantize into
Z_2^k) and answers with its masked input (``masked``). Two stages follow: it signs
the survivor set, then reveals its shares. A stage that fails (a forged advert, a
survivor set too few holders signed, a replayed or out-of-order message) ends the
site's part in the round: it answers with the reason (which names sites and sizes,
never data) and forgets the round's secrets.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.config import RunConfig
from common.evaluation import IntArray, encode_counts
from common.messages import RoundPlan, SecAggSetup, StageMessage
from common.privacy.identity import open_state
from common.quantize import encode
from common.rotation import FloatArray
from common.secagg.encoding import encoding_spec, payload_shape, site_weight
from common.secagg.errors import SecAggError
from common.secagg.params import (
    Advert,
    SecAggParams,
    Signer,
    Survivors,
    default_degree,
    pack_masked,
)
from common.secagg.roster import Roster, RosterError
from common.secagg.site import SiteSession

log = logging.getLogger("fedsilo.site")


@dataclass(frozen=True)
class Pending:
    """What a site keeps between the stages of one secure round (node state): the
    session, and where its identity key and roster are (paths, not secrets)."""

    session: SiteSession
    state_dir: str
    roster: str
    min_sites: int

    def signer(self) -> Signer:
        return open_state(Path(self.state_dir)).identity.sign


def unsafe(params: SecAggParams, min_sites: int) -> str | None:
    """Why the coordinator's protocol parameters are unsafe for this site (None: they
    are not), checked before the site advertises: fewer sites than its own minimum, or
    a neighbour graph sparser than the safe default for the round's size (a few
    dropouts, which an active coordinator causes by ignoring replies, would cut it into
    pieces that unmask separately). The threshold's active-security bound is checked
    when the parameters are parsed (``SecAggParams``)."""
    n = len(params.participants)
    if n < min_sites:
        return (
            f"the secure round has {n} sites, this site requires at least {min_sites} "
            "(secagg-min-sites)"
        )
    safe = default_degree(n)
    if params.degree < safe:
        return (
            f"the secure round's neighbour graph has degree {params.degree}, below the safe "
            f"{safe} for {n} sites: this site does not join it"
        )
    return None


def advertise(
    setup: SecAggSetup,
    *,
    identity: bytes,
    sign: Signer,
    state_dir: Path,
    roster: Path,
    min_sites: int,
) -> tuple[StageMessage, Pending]:
    """Stage 1: fresh keys, signed; nothing of the site's data is touched."""
    problem = unsafe(setup.params, min_sites)
    if problem is not None:
        raise SecAggError(problem)
    session, advert = SiteSession.start(setup.params, setup.index, identity, sign)
    reply = StageMessage(
        "advertise", setup.params.session, ids=(setup.index,), blobs=(advert.to_bytes(),)
    )
    log.info(
        "secure round %s: advertised as site %d of %d (threshold %d, tolerates %d colluding "
        "holders)",
        setup.params.session,
        setup.index,
        len(setup.params.participants),
        setup.params.threshold,
        setup.params.tolerated,
    )
    return reply, Pending(session, str(state_dir), str(roster), min_sites)


def admit(pending: Pending, setup: SecAggSetup, plan: RoundPlan, dim: int) -> Pending:
    """Before training: the train message must continue the round this site advertised
    in, its parameters must still be safe and match the plan's encoding, and the
    round's final sites must pass the session's checks. Raises ``SecAggError`` naming
    the problem; nothing is charged."""
    session = pending.session
    if setup.index != session.index or replace(session.params, graph="") != setup.params:
        raise SecAggError("the train message's secure round is not the one this site advertised in")
    problem = unsafe(setup.params, pending.min_sites)
    if problem is not None:
        raise SecAggError(problem)
    params = session.params
    bits, length = payload_shape(
        plan, num_sites=len(params.participants), seed=setup.rotation_seed, dim=dim
    )
    if (bits, length) != (params.ring_bits, params.vector_length):
        raise SecAggError(
            f"the round's secagg parameters ({params.ring_bits} bits, {params.vector_length} "
            f"elements) do not match this plan's encoding ({bits} bits, {length} elements)"
        )
    session.admit(setup.members)
    return replace(pending, session=session)


def masked(
    pending: Pending, setup: SecAggSetup, cfg: RunConfig, vector: FloatArray, num_examples: int
) -> tuple[StageMessage, Pending, bool]:
    """After training: encode the flat update (common/arrays.py ``flatten``) and mask
    it; returns the masked-input message, the state to keep and whether the delta had
    to be clipped. The update itself is not kept."""
    session = pending.session
    params = session.params
    spec = encoding_spec(
        cfg, num_sites=len(params.participants), seed=setup.rotation_seed, dim=vector.size
    )
    # Stochastic rounding must be unpredictable to the coordinator: OS entropy.
    rng = np.random.default_rng(secrets.randbits(128))
    encoded = encode(vector, spec, rng, weight=site_weight(cfg, num_examples))
    y = session.masked_input(encoded.values)
    message = StageMessage(
        "masked-input",
        params.session,
        ids=(session.index,),
        blobs=(pack_masked(y, params),),
        more=(session.commitment,),
    )
    return message, replace(pending, session=session), encoded.clipped


def masked_counts(pending: Pending, counts: IntArray) -> tuple[StageMessage, Pending]:
    """An evaluation round's masked input: the site's (noisy) confusion matrix, one
    signed count per ring element."""
    session = pending.session
    params = session.params
    y = session.masked_input(encode_counts(counts, params.ring_bits))
    message = StageMessage(
        "masked-input",
        params.session,
        ids=(session.index,),
        blobs=(pack_masked(y, params),),
        more=(session.commitment,),
    )
    return message, replace(pending, session=session)


def step(pending: Pending, message: StageMessage) -> tuple[StageMessage, Pending | None]:
    """Answer one stage message after advertising; the state to keep (None once over)."""
    session = pending.session
    if message.session != session.params.session:
        raise SecAggError("message belongs to another secure round (stale or replayed)")
    kept = replace(pending, session=session)
    if message.stage == "share-keys":
        adverts = {
            v: Advert.from_bytes(v, blob)
            for v, blob in zip(message.ids, message.blobs, strict=True)
        }
        try:
            roster = Roster.load(Path(pending.roster))
        except RosterError as err:  # its text names local paths: it stays in the log
            log.error("secure round %s: %s", message.session, err)
            raise SecAggError(
                "this site has no usable roster (details in the site's log; install one "
                "with `fedsilo site roster`)"
            ) from None
        session.check_adverts(adverts, roster, min_sites=pending.min_sites)
        sealed, dealt = session.share_keys(pending.signer())
        holders = tuple(sorted(dealt))
        reply = StageMessage(
            "share-keys",
            message.session,
            ids=holders,
            blobs=tuple(sealed.get(v, b"") for v in holders),
            more=tuple(dealt[v] for v in holders),
        )
        return reply, kept
    if message.stage == "open-shares":
        if len(message.more) != len(message.ids):
            raise SecAggError("every routed share must come with its dealer's signed entry")
        refused = session.open_shares(
            dict(zip(message.ids, message.blobs, strict=True)),
            dict(zip(message.ids, message.more, strict=True)),
        )
        if refused:
            log.warning("secure round %s: refused the shares of sites %s", message.session, refused)
        return StageMessage("open-shares", message.session, dropped=refused), kept
    survivors = Survivors(alive=message.alive, dropped=message.dropped)
    if message.stage == "consistency":
        signature = session.consistency(survivors, pending.signer())
        return StageMessage("consistency", message.session, signature=signature), kept
    if message.stage != "unmask":
        raise SecAggError(f"unexpected secure-aggregation stage {message.stage!r}")
    signatures = dict(zip(message.ids, message.blobs, strict=True))
    shares, signature = session.unmask(survivors, signatures, pending.signer())
    return StageMessage(
        "unmask",
        message.session,
        ids=tuple(shares),
        blobs=tuple(shares.values()),
        signature=signature,
    ), None


def failure(message: StageMessage, reason: str) -> StageMessage:
    """The reply of a site leaving the round, with its public reason."""
    return StageMessage(message.stage, message.session, error=reason[:200] or "site error")
