"""The secure workflow: one round of SecAgg+ driven over the Transport.

Six exchanges with the sampled sites (common/secagg/ has the protocol). Three before
anyone trains, touching no data: advertise signed keys, share keys (each site checks
every advert against its roster, then deals), open shares (each site checks the shares
dealt to it; a dealer any holder refuses is left out). Then train + masked input (each
site checks the round's final sites first), consistency (the survivors sign the
survivor set) and unmask. The coordinator never holds a site's update in the clear: it
routes opaque sealed shares, sums masked vectors, removes the masks from the sum and
decodes the sum into the mean clipped update. A site that fails or misbehaves at a
stage is dropped from the round with the reason (a site that reveals a share its
dealer did not deal is named); if too few remain for the protocol to finish, the
round aborts and the global model stays as it was.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from common.arrays import unflatten
from common.evaluation import COUNTS_KEY, decode_counts
from common.messages import (
    RoundPlan,
    SecAggSetup,
    StageMessage,
    StageName,
    TrainRequest,
)
from common.quantize import check_sum, decode_sum
from common.secagg.coordinator import CoordinatorSession
from common.secagg.encoding import encoding_spec, payload_shape, site_weight
from common.secagg.errors import SecAggAbort, SecAggError
from common.secagg.params import Advert, SecAggParams
from server.aggregation import Arrays, RoundOutcome, SiteResult, Transport, round_group

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


class _NobodyTrained(Exception):
    """No site sent a masked input: the round has nothing to aggregate or abort."""


class _Done(Exception):
    """An evaluation round's sum is decoded: nothing of a training round's remains."""


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

    def drop(self, nid: int, why: str, *, left: bool = False) -> None:
        report = self.results[nid].report if nid in self.results else None
        self.results[nid] = SiteResult(nid, report, why, left=left)

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
        replies = self.transport.stage(outgoing, group=f"{round_group(self.plan)}/{stage}")
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
                # The site's own words (it may be lying): quoted as its claim.
                self.drop(nid, f"left at {stage}, saying: {message.error}", left=True)
                continue
            accept(u, message)


def name_indices(text: str, names: Mapping[int, str]) -> str:
    """``text`` with the protocol's ``site N`` and ``sites [N, M]`` (also ``holders``)
    replaced by the sites' names: a protocol index would read like a site name."""

    def one(index: str) -> str:
        return names.get(int(index), f"#{index}")

    text = re.sub(
        r"\b(sites|holders) \[([\d, ]*)\]",
        lambda m: f"{m[1]} [{', '.join(one(x) for x in m[2].split(', ') if x)}]",
        text,
    )
    return re.sub(r"\bsite (\d+)\b", lambda m: one(m[1]), text)


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
    ring_bits, length = payload_shape(plan, num_sites=len(chosen), seed=spec.seed, dim=dim)
    params = make_params(plan, len(chosen), ring_bits=ring_bits, vector_length=length)
    session = params.session
    coordinator = CoordinatorSession(params)
    log.info(
        "round %d: secure aggregation among %d sites, degree %d, threshold %d (tolerates %d "
        "colluding holders)",
        plan.round,
        len(chosen),
        params.degree,
        params.threshold,
        params.tolerated,
    )
    failure = ""
    mean: Arrays | None = None
    alive: tuple[int, ...] = ()
    try:
        # 1. advertise: signed keys, before anyone trains
        adverts: dict[int, Advert] = {}

        def take_advert(u: int, m: StageMessage) -> None:
            if m.ids != (u,) or len(m.blobs) != 1:
                state.drop(state.node_of[u], "dropped at advertise: reply is not one advert")
                return
            try:
                adverts[u] = Advert.from_bytes(u, m.blobs[0])
            except SecAggError as err:
                state.drop(state.node_of[u], f"dropped at advertise: {err}")

        state.exchange(
            "advertise",
            session,
            {
                u: StageMessage(
                    "advertise", session, plan=plan, setup=SecAggSetup(params, u, spec.seed)
                )
                for u in state.node_of
            },
            take_advert,
        )
        routed_adverts = coordinator.receive_adverts(adverts)

        # 2. share keys: every advert to every site; each checks them against its
        # roster and deals its shares (no data touched)
        shares: dict[int, tuple[dict[int, bytes], dict[int, bytes]]] = {}

        def take_shares(u: int, m: StageMessage) -> None:
            if len(m.more) != len(m.ids):
                state.drop(state.node_of[u], "dropped at share-keys: malformed shares")
                return
            shares[u] = (
                {v: b for v, b in zip(m.ids, m.blobs, strict=True) if v != u},
                dict(zip(m.ids, m.more, strict=True)),
            )

        everyone = StageMessage(  # one message, the same for every site
            "share-keys",
            session,
            ids=tuple(routed_adverts),
            blobs=tuple(a.to_bytes() for a in routed_adverts.values()),
        )
        state.exchange("share-keys", session, dict.fromkeys(everyone.ids, everyone), take_shares)
        # 3. open shares: each site checks the shares dealt to it (no data touched)
        routed = coordinator.receive_shares(shares)
        refused: dict[int, tuple[int, ...]] = {}

        def take_opened(u: int, m: StageMessage) -> None:
            refused[u] = m.dropped

        state.exchange(
            "open-shares",
            session,
            {
                u: StageMessage(
                    "open-shares",
                    session,
                    ids=tuple(sealed),
                    blobs=tuple(sealed.values()),
                    more=tuple(dealt[v] for v in sealed),
                )
                for u, (sealed, dealt) in routed.items()
            },
            take_opened,
        )
        members = coordinator.receive_opened(refused)

        # 4. train + masked input: each site admits the round's sites, then trains
        train = {
            state.node_of[u]: TrainRequest(
                plan, weights, SecAggSetup(params, u, spec.seed, members)
            )
            for u in members
        }
        started = time.monotonic()
        replies = transport.train(train, group=round_group(plan))
        state.seconds["train"] = time.monotonic() - started
        masked: dict[int, tuple[bytes, bytes]] = {}
        for nid in train:
            reply = replies[nid]
            state.upload[nid] += reply.nbytes
            if reply.message is None:
                state.results[nid] = SiteResult(nid, None, reply.error or "no reply")
                continue
            report, update, y = reply.message.report, reply.message.update, reply.message.masked
            state.results[nid] = SiteResult(nid, report)
            if report.status != "ok":
                continue
            if y is None or update is not None:
                # An update in the clear is never used (nor kept) in a secure round.
                state.drop(
                    nid, "sent its update in the clear instead of joining secure aggregation"
                )
                continue
            u = state.index[nid]
            if y.session != session or y.ids != (u,) or len(y.blobs) != 1 or len(y.more) != 1:
                state.drop(nid, "dropped at masked-input: reply is not one vector")
                continue
            masked[u] = (y.blobs[0], y.more[0])
        if not masked:  # nobody trained: nothing to aggregate, nothing to abort
            raise _NobodyTrained

        # 5. consistency: every survivor signs the one survivor set
        survivors = coordinator.receive_masked(masked)
        signed: dict[int, bytes] = {}

        def take_signature(u: int, m: StageMessage) -> None:
            signed[u] = m.signature

        state.exchange(
            "consistency",
            session,
            {
                u: StageMessage(
                    "consistency", session, alive=survivors.alive, dropped=survivors.dropped
                )
                for u in survivors.alive
            },
            take_signature,
        )
        signatures = coordinator.receive_signatures(signed)

        # 6. unmask: b shares of alive sites, s shares of dropped ones, signed
        revealed: dict[int, tuple[dict[int, bytes], bytes]] = {}

        def take_revealed(u: int, m: StageMessage) -> None:
            revealed[u] = (dict(zip(m.ids, m.blobs, strict=True)), m.signature)

        state.exchange(
            "unmask",
            session,
            {
                u: StageMessage(
                    "unmask",
                    session,
                    ids=tuple(signatures),
                    blobs=tuple(signatures.values()),
                    alive=survivors.alive,
                    dropped=survivors.dropped,
                )
                for u in signatures
            },
            take_revealed,
        )
        started = time.monotonic()
        total, alive = coordinator.receive_unmask(revealed)
        if plan.evaluate:  # the sum of the sites' (noisy) confusion matrices
            counts = decode_counts(total, params.ring_bits)
            mean = {COUNTS_KEY: torch.from_numpy(counts.astype("float64"))}
            raise _Done
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
    except _NobodyTrained:
        pass  # the round's notes say why each site did not train
    except _Done:
        pass
    except SecAggAbort as err:
        failure = f"secure aggregation aborted: {err}"
    except (SecAggError, ValueError) as err:
        failure = f"secure aggregation failed: {err}"
    for u, why in coordinator.rejected.items():
        if u in state.node_of:
            state.drop(state.node_of[u], f"rejected: {why}")
    # The protocol's texts count sites by protocol index: name them as the notes do.
    names = {
        u: res.report.site if res.report is not None else f"node-{nid}"
        for u, nid in state.node_of.items()
        for res in [state.results.get(nid, SiteResult(nid, None))]
    }
    failure = name_indices(failure, names)
    clipped = 0
    results: list[SiteResult] = []
    for nid in chosen:
        res = state.results.get(nid, SiteResult(nid, None, failure or "not in the secure sum"))
        if res.error:
            res = replace(res, error=name_indices(res.error, names))
        in_sum = state.index[nid] in alive and not failure
        if in_sum and res.report is not None:
            clipped += res.report.update_clipped
            # A site rejected after its masked input (it revealed a share its dealer did
            # not deal) is still in the sum: it contributed, and it is named. One that
            # only vanished after it is in the sum too, recovered, and nothing more.
            named = res.error if res.error and res.error.startswith("rejected:") else None
            res = SiteResult(nid, res.report, named, contributed=True)
        elif res.report is not None and res.report.status == "ok" and res.error is None:
            res = SiteResult(
                nid, res.report, failure or "not in the secure sum", round_failed=bool(failure)
            )
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
        cheaters=tuple(state.node_of[u] for u in sorted(coordinator.cheaters)),
    )
