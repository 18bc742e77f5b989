"""The secure workflow: one round of SecAgg+ driven over the Transport.

Four exchanges with the sampled sites (common/secagg/ has the protocol):
train + advertise keys, share keys, masked input, unmask. The coordinator never holds
a site's update in the clear: it routes opaque sealed shares, sums masked vectors,
removes the masks from the sum and decodes the sum into the mean clipped update. A
site that fails or misbehaves at a stage is dropped from the round with the reason; if
too few remain for the protocol to finish, the round aborts and the global model stays
as it was.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

from common.arrays import unflatten
from common.messages import (
    RoundPlan,
    SecAggSetup,
    StageMessage,
    StageName,
    TrainRequest,
)
from common.quantize import check_sum, decode_sum
from common.secagg.coordinator import CoordinatorSession
from common.secagg.encoding import encoding_spec, site_weight
from common.secagg.errors import SecAggAbort, SecAggError
from common.secagg.params import PublicKeys, SecAggParams
from server.aggregation import Arrays, RoundOutcome, SiteResult, Transport

log = logging.getLogger("fedsilo.coordinator")


def make_params(
    plan: RoundPlan, num_sites: int, *, ring_bits: int, vector_length: int
) -> SecAggParams:
    """This round's public protocol parameters for ``num_sites`` sampled sites."""
    cfg = plan.config
    degree = None
    if cfg.secagg_degree:
        degree = min(cfg.secagg_degree, num_sites - 1)
    return SecAggParams.create(
        range(1, num_sites + 1),
        ring_bits=ring_bits,
        vector_length=vector_length,
        degree=degree,
        threshold_fraction=cfg.secagg_threshold,
    )


class _Round:
    """Bookkeeping of one secure round: who is still in, what each site sent."""

    def __init__(self, transport: Transport, chosen: list[int], plan: RoundPlan) -> None:
        self.transport = transport
        self.plan = plan
        self.node_of = {i + 1: nid for i, nid in enumerate(sorted(chosen))}
        self.index = {nid: i for i, nid in self.node_of.items()}
        self.results: dict[int, SiteResult] = {}
        self.upload: dict[int, int] = dict.fromkeys(chosen, 0)
        self.seconds: dict[str, float] = {}

    def drop(self, nid: int, why: str) -> None:
        report = self.results[nid].report if nid in self.results else None
        self.results[nid] = SiteResult(nid, report, why)

    def exchange(
        self,
        stage: StageName,
        session: str,
        messages: dict[int, StageMessage],
        accept: Callable[[int, StageMessage], None],
    ) -> None:
        """Send one stage message per protocol index; ``accept`` each valid reply."""
        outgoing = {self.node_of[u]: m for u, m in messages.items()}
        started = time.monotonic()
        replies = self.transport.stage(outgoing, group=f"{self.plan.round}/{stage}")
        self.seconds[stage] = time.monotonic() - started
        for u in sorted(messages):
            nid = self.node_of[u]
            reply = replies[nid]
            self.upload[nid] += reply.nbytes
            message = reply.message
            if message is None:
                self.drop(nid, f"dropped at {stage}: {reply.error or 'no reply'}")
                continue
            if message.stage != stage:
                self.drop(nid, f"dropped at {stage}: malformed reply: a {message.stage} message")
                continue
            if message.session != session:
                self.drop(nid, f"dropped at {stage}: reply for another session (replay?)")
                continue
            if message.error:
                self.drop(nid, f"left at {stage}: {message.error}")
                continue
            accept(u, message)


def secure_round(
    transport: Transport, chosen: list[int], plan: RoundPlan, weights: Arrays
) -> RoundOutcome:
    """One round with secure aggregation among the ``chosen`` nodes."""
    cfg = plan.config
    state = _Round(transport, chosen, plan)
    if len(chosen) < 2:
        return RoundOutcome(
            results=[],
            mean=None,
            failure="secure aggregation needs at least 2 sampled sites; round skipped",
        )
    dim = sum(v.numel() for v in weights.values())
    spec = encoding_spec(cfg, num_sites=len(chosen), seed=secrets.randbits(62), dim=dim)
    params = make_params(
        plan, len(chosen), ring_bits=spec.ring_bits, vector_length=spec.encoded_length
    )
    session = params.session
    coordinator = CoordinatorSession(params)

    # 1. train + advertise keys
    train = {
        nid: TrainRequest(plan, weights, SecAggSetup(params, state.index[nid], spec.seed))
        for nid in chosen
    }
    started = time.monotonic()
    replies = transport.train(train, group=str(plan.round))
    state.seconds["train"] = time.monotonic() - started
    keys: dict[int, PublicKeys] = {}
    for nid in chosen:
        reply = replies[nid]
        state.upload[nid] += reply.nbytes
        if reply.message is None:
            state.results[nid] = SiteResult(nid, None, reply.error or "no reply")
            continue
        report, update, site_keys = reply.message.report, reply.message.update, reply.message.keys
        state.results[nid] = SiteResult(nid, report)
        if report.status != "ok":
            continue
        if site_keys is None or update is not None:
            # An update in the clear is never used (nor kept) in a secure round.
            state.drop(nid, "sent its update in the clear instead of joining secure aggregation")
            continue
        keys[state.index[nid]] = site_keys

    failure = ""
    mean: Arrays | None = None
    alive: tuple[int, ...] = ()
    if not keys:  # nobody trained: nothing to aggregate, nothing to abort
        return RoundOutcome(
            results=[state.results[n] for n in chosen],
            mean=None,
            upload_bytes=state.upload,
            stage_seconds=state.seconds,
        )
    try:
        # 2. share keys: each site gets its live holders' public keys
        routing = coordinator.receive_keys(keys)
        shares: dict[int, dict[int, bytes]] = {}

        def take_shares(u: int, m: StageMessage) -> None:
            shares[u] = dict(zip(m.ids, m.blobs, strict=True))

        state.exchange(
            "share-keys",
            session,
            {
                u: StageMessage(
                    "share-keys",
                    session,
                    ids=tuple(peers),
                    blobs=tuple(k.c for k in peers.values()),
                    more=tuple(k.s for k in peers.values()),
                )
                for u, peers in routing.items()
            },
            take_shares,
        )
        # 3. masked input: route the sealed shares, collect masked vectors
        routed = coordinator.receive_shares(shares)
        masked: dict[int, tuple[bytes, bytes]] = {}

        def take_masked(u: int, m: StageMessage) -> None:
            if m.ids != (u,) or len(m.blobs) != 1 or len(m.more) != 1:
                state.drop(state.node_of[u], "dropped at masked-input: reply is not one vector")
                return
            masked[u] = (m.blobs[0], m.more[0])

        state.exchange(
            "masked-input",
            session,
            {
                u: StageMessage(
                    "masked-input", session, ids=tuple(sealed), blobs=tuple(sealed.values())
                )
                for u, sealed in routed.items()
            },
            take_masked,
        )
        # 4. unmask: b shares of alive sites, s shares of dropped ones
        requests = coordinator.receive_masked(masked)
        revealed: dict[int, dict[int, bytes]] = {}

        def take_revealed(u: int, m: StageMessage) -> None:
            revealed[u] = dict(zip(m.ids, m.blobs, strict=True))

        state.exchange(
            "unmask",
            session,
            {
                u: StageMessage("unmask", session, alive=r.alive, dropped=r.dropped)
                for u, r in requests.items()
            },
            take_revealed,
        )
        started = time.monotonic()
        total, alive = coordinator.receive_unmask(revealed)
        mean_vector, total_weight = decode_sum(total, spec, len(alive))
        # Public weights (declared sizes): the total must be the survivors' own, and the
        # mean within what clipped sites can produce.
        declared = [state.results[state.node_of[u]].report for u in alive]
        check_sum(
            mean_vector,
            total_weight,
            spec,
            num_summands=len(alive),
            expected_weight=sum(site_weight(cfg, r.num_examples) for r in declared if r is not None)
            if all(r is not None for r in declared)
            else None,
        )
        mean = unflatten(mean_vector, weights)
        mean = {k: v.to(weights[k].dtype) for k, v in mean.items()}
        state.seconds["unmask-and-decode"] = time.monotonic() - started
    except SecAggAbort as err:
        failure = f"secure aggregation aborted: {err}"
    except (SecAggError, ValueError) as err:
        failure = f"secure aggregation failed: {err}"
    for u, why in coordinator.rejected.items():
        if u in state.node_of:
            state.drop(state.node_of[u], f"rejected: {why}")
    clipped = 0
    results: list[SiteResult] = []
    for nid in chosen:
        res = state.results[nid]
        in_sum = state.index[nid] in alive and not failure
        if in_sum and res.report is not None:
            clipped += res.report.update_clipped
            res = SiteResult(nid, res.report, None, contributed=True)
        elif res.report is not None and res.report.status == "ok" and res.error is None:
            res = SiteResult(nid, res.report, failure or "not in the secure sum")
        results.append(res)
    if failure:
        log.warning("round %d: %s", plan.round, failure)
    return RoundOutcome(
        results=results,
        mean=mean,
        failure=failure,
        upload_bytes=state.upload,
        clipped=clipped,
        stage_seconds=state.seconds,
    )
