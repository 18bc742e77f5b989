"""What the coordinator and a site say to each other, as plain values (no Flower).

What crosses the wire, and nothing else:
- coordinator -> site: ``TrainRequest``: the round plan (round number plus the
  federation's RunConfig), the trainable global arrays and, with secure aggregation,
  the site's part of the round (``SecAggSetup``);
- site -> coordinator: ``TrainReply``: a ``SiteReport`` (a status and declared public
  numbers) and the update (only when trained). No loss, no per-example value, no text:
  those are data-dependent and not covered by the DP guarantee.
- with secure aggregation, the reply carries the site's two public keys instead of the
  update, and three more exchanges (``StageMessage``) carry public keys, sealed shares,
  the masked (uniformly random-looking) input and unmasking shares.

Flower's record codec (common/codec.py) turns these into records and back, and
refuses any message that does not have the declared shape with ``WireError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from common.config import RunConfig
from common.secagg.params import PublicKeys, SecAggParams

if TYPE_CHECKING:
    import torch

    Arrays = dict[str, torch.Tensor]

Status = Literal["ok", "refused", "failed"]
STATUSES: tuple[Status, ...] = ("ok", "refused", "failed")
SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
LEDGER_HEAD = re.compile(r"(|[0-9a-f]{64})")
LEDGER_SIGNATURE = re.compile(r"(|[A-Za-z0-9+/]{86}==)")  # base64 of 64 bytes
KEY_FINGERPRINT = re.compile(r"(|sha256:[0-9a-f]{64})")  # a site's ledger key


class WireError(ValueError):
    """A message that does not have the declared shape; it is rejected, not used."""


@dataclass(frozen=True)
class RoundPlan:
    """What the coordinator asks of every site this round."""

    round: int
    config: RunConfig


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
    protocol index and the public seed of the round's rotation."""

    params: SecAggParams
    index: int
    rotation_seed: int


@dataclass(frozen=True)
class TrainRequest:
    """A round's train message to one site (sites of one round share plan and arrays)."""

    plan: RoundPlan
    arrays: Arrays
    setup: SecAggSetup | None = None  # None: plain aggregation


@dataclass(frozen=True)
class TrainReply:
    """A site's answer to a train message: an ok reply carries the update (plain) or the
    site's public keys (secure), exactly one of them; other replies carry neither."""

    report: SiteReport
    update: Arrays | None = None
    keys: PublicKeys | None = None

    def __post_init__(self) -> None:
        carries = (self.update is not None) + (self.keys is not None)
        if carries != (1 if self.report.status == "ok" else 0):
            raise ValueError("an update or keys (one of them) travel exactly when status is 'ok'")


StageName = Literal["share-keys", "masked-input", "unmask"]
STAGES: tuple[StageName, ...] = ("share-keys", "masked-input", "unmask")


@dataclass(frozen=True)
class StageMessage:
    """One secure-aggregation exchange after the first (either direction).

    share-keys: coordinator -> site: ``ids`` with their ``blobs`` (c keys) and ``more``
    (s keys); site -> coordinator: ``ids`` with sealed shares in ``blobs``.
    masked-input: coordinator -> site: sealed shares by sender; site -> coordinator:
    its own index with its packed masked vector.
    unmask: coordinator -> site: ``alive`` and ``dropped``; site -> coordinator: ``ids``
    with one share each in ``blobs``.
    ``error`` (site -> coordinator only) says why the site left the round.
    """

    stage: StageName
    session: str
    ids: tuple[int, ...] = ()
    blobs: tuple[bytes, ...] = ()
    more: tuple[bytes, ...] = ()
    alive: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    error: str = ""
