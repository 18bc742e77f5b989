"""What the coordinator and a site say to each other, as plain values (no Flower).

What crosses the wire, and nothing else:
- coordinator -> site: ``TrainRequest``: the round plan (round number plus the
  federation's RunConfig), the trainable global arrays and, with secure aggregation,
  the site's part of the round (``SecAggSetup``);
- site -> coordinator: ``TrainReply``: a ``SiteReport`` (a status and declared public
  numbers) and the update (only when trained). No loss, no per-example value, no text:
  those are data-dependent and not covered by the DP guarantee.
- with secure aggregation, three exchanges (``StageMessage``) come before training,
  none of which touches data: ``advertise`` (public keys signed by the site's identity
  key), ``share-keys`` (every advert out; sealed shares and signed dealing entries
  back) and ``open-shares`` (the shares dealt to the site out; the dealers whose shares
  failed its checks back). The train message then names the round's final sites, and
  the reply carries the masked (uniformly random-looking) input instead of the update;
  two more exchanges carry the signatures on the survivor set (the consistency round)
  and the unmasking shares.

Flower's record codec (common/codec.py) turns these into records and back, and
refuses any message that does not have the declared shape with ``WireError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from common.config import RunConfig
from common.secagg.params import SecAggParams
from common.task import Task, run_task

if TYPE_CHECKING:
    import torch

    Arrays = dict[str, torch.Tensor]

Status = Literal["ok", "refused", "failed"]
STATUSES: tuple[Status, ...] = ("ok", "refused", "failed")
SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
LEDGER_HEAD = re.compile(r"(|[0-9a-f]{64})")
LEDGER_SIGNATURE = re.compile(r"(|[A-Za-z0-9+/]{86}==)")  # base64 of 64 bytes
# What a site's report says in a rehearsal (client/rehearsal.py).
REHEARSAL_NOTE = "REHEARSAL: public stand-in data, nothing charged"
KEY_FINGERPRINT = re.compile(r"(|sha256:[0-9a-f]{64})")  # a site's ledger key


class WireError(ValueError):
    """A message that does not have the declared shape; it is rejected, not used."""


@dataclass(frozen=True)
class RoundPlan:
    """What the coordinator asks of every site this round: the federation's config and
    the task itself (a site cannot read the coordinator's task file; a deployed site
    compares its digest with the one it pinned). An ``evaluate`` round trains nothing:
    each site evaluates the global weights on its held-out share and answers with
    per-class counts (client/evaluation.py)."""

    round: int
    config: RunConfig
    task: Task = field(default=None)  # type: ignore[assignment]  # None: the config's
    evaluate: bool = False
    # The pre-flight before a run's first round: each site answers what the plan would
    # cost it and what its lifetime budget leaves (numbers of plans and ledgers, never of
    # data), and whether it would refuse; nothing is trained, charged or loaded.
    preflight: bool = False

    def __post_init__(self) -> None:
        if self.task is None:
            object.__setattr__(self, "task", run_task(self.config))
        if self.evaluate and self.preflight:
            raise ValueError("a plan is an evaluation or a pre-flight, not both")


@dataclass(frozen=True)
class SiteReport:
    """A site's declared public metrics for one round.

    ``epsilon`` is this run's epsilon after the round (the PRV accountant on the run's
    fixed plan; NaN when DP is off); ``lifetime_epsilon`` what the site's adaptive
    filter certifies spent of its lifetime ``budget`` over every run. ``num_examples``
    is the size the site declared public, never the count of its file.
    """

    status: Status
    reason: str
    site: str
    num_examples: int
    dp: bool
    epsilon: float
    budget: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    total_steps: int
    # The site's privacy ledger after this round: hash and signature of its last entry
    # ("" when the site keeps no ledger), so an auditor can match the ledger later.
    ledger_head: str = ""
    ledger_signature: str = ""
    # 1 when the site's model delta was scaled down to the plan's update-clip-norm.
    update_clipped: int = 0
    lifetime_epsilon: float = 0.0
    # The fingerprint of the key that signs the site's ledger ("" without a ledger).
    identity: str = ""
    # Pre-flight only: what the site keeps of its budget (its node config) and what its
    # lifetime filter would certify after the whole planned run.
    reserve: float = 0.0
    lifetime_after: float = 0.0

    @classmethod
    def of(cls, status: Status, reason: str, site: str, **values: Any) -> SiteReport:
        """A report with every number not given set to 0 (DP on)."""
        base: dict[str, Any] = {
            "num_examples": 0,
            "dp": True,
            "epsilon": 0.0,
            "budget": 0.0,
            "delta": 0.0,
            "noise_multiplier": 0.0,
            "sample_rate": 0.0,
            "steps": 0,
            "total_steps": 0,
        }
        base.update(values)
        return cls(status=status, reason=reason, site=site, **base)


# The report's fields that travel as text; the others are declared numbers.
REPORT_TEXT_FIELDS = (
    "status",
    "reason",
    "site",
    "dp",
    "ledger_head",
    "ledger_signature",
    "identity",
)


@dataclass(frozen=True)
class SecAggSetup:
    """What one site needs to join a secure round: the public parameters, its own
    protocol index and the public seed of the round's rotation; in the train message,
    also the round's sites (``members``: those whose dealt shares every holder
    accepted), which the site checks before it trains."""

    params: SecAggParams
    index: int
    rotation_seed: int
    members: tuple[int, ...] = ()


@dataclass(frozen=True)
class TrainRequest:
    """A round's train message to one site (sites of one round share plan and arrays)."""

    plan: RoundPlan
    arrays: Arrays
    setup: SecAggSetup | None = None  # None: plain aggregation


@dataclass(frozen=True)
class TrainReply:
    """A site's answer to a train message: an ok reply carries the update (plain) or the
    site's ``masked-input`` message (secure), exactly one of them; other replies carry
    neither."""

    report: SiteReport
    update: Arrays | None = None
    masked: StageMessage | None = None
    preflight: bool = False  # the answer to a pre-flight: a report, nothing else

    def __post_init__(self) -> None:
        carries = (self.update is not None) + (self.masked is not None)
        if carries != (1 if self.report.status == "ok" and not self.preflight else 0):
            raise ValueError(
                "an update or a masked input (one of them) travels exactly when status is "
                "'ok', and never in a pre-flight answer"
            )


StageName = Literal[
    "advertise", "share-keys", "open-shares", "masked-input", "consistency", "unmask"
]
# The stages that travel as messages of their own ("masked-input" rides the train reply).
STAGES: tuple[StageName, ...] = (
    "advertise",
    "share-keys",
    "open-shares",
    "consistency",
    "unmask",
)


@dataclass(frozen=True)
class StageMessage:
    """One secure-aggregation exchange (either direction).

    advertise: coordinator -> site: the round's ``plan`` and the site's ``setup``;
    site -> coordinator: its own index in ``ids`` and its signed advert in ``blobs``.
    share-keys: coordinator -> site: every advert (``ids``, ``blobs``); site ->
    coordinator: ``ids`` the site's holders (itself included), ``blobs`` the sealed
    shares (empty for itself), ``more`` the signed dealing entries.
    open-shares: coordinator -> site: sealed shares (``blobs``) and dealing entries
    (``more``) by dealer (``ids``); site -> coordinator: in ``dropped``, the dealers
    whose shares failed its checks.
    masked-input (inside the train reply): its own index with its packed masked
    vector and, in ``more``, its commitment to its self-mask seed.
    consistency: coordinator -> site: the survivor set (``alive``, ``dropped``);
    site -> coordinator: its ``signature`` on it.
    unmask: coordinator -> site: the survivor set and the survivors' signatures
    (``ids``, ``blobs``); site -> coordinator: ``ids`` with one share each in ``blobs``,
    and its ``signature`` on what it reveals.
    ``error`` (site -> coordinator only) says why the site left the round.
    """

    stage: StageName
    session: str
    ids: tuple[int, ...] = ()
    blobs: tuple[bytes, ...] = ()
    more: tuple[bytes, ...] = ()
    alive: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    signature: bytes = b""
    plan: RoundPlan | None = None
    setup: SecAggSetup | None = None
    error: str = ""
