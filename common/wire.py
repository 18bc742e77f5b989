"""The one place that converts between fedsilo's values and Flower records.

What crosses the wire, and nothing else:
- coordinator -> site: the trainable global arrays and the round plan (round number
  plus the federation's RunConfig);
- site -> coordinator: a status, the update (only when trained) and declared public
  metrics. No loss, no per-example value, no text: those are data-dependent and
  not covered by the DP guarantee.

Every message is validated on arrival; anything malformed raises ``WireError``
naming what is wrong, and is never used.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.config import ConfigError, RunConfig

GLOBAL_KEY = "global"
PLAN_KEY = "plan"
UPDATE_KEY = "update"
STATUS_KEY = "status"
METRICS_KEY = "metrics"

Status = Literal["ok", "refused", "failed"]
STATUSES: tuple[Status, ...] = ("ok", "refused", "failed")
_STRING_FIELDS = ("status", "reason", "site", "dp", "ledger_head", "ledger_signature")
LEDGER_HEAD = re.compile(r"(|[0-9a-f]{64})")
LEDGER_SIGNATURE = re.compile(r"(|[A-Za-z0-9+/]{86}==)")  # base64 of 64 bytes
SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


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

    ``epsilon`` is the site's spend on this data set in this run after the round (0
    for refused rounds that spent nothing new; NaN when DP is off), ``budget`` the
    site's own epsilon budget.
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


def _arrays_to_record(arrays: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in arrays.items()})


def _record_to_arrays(record: ArrayRecord, what: str) -> dict[str, torch.Tensor]:
    try:
        arrays = dict(record.to_torch_state_dict())
    except Exception as err:  # noqa: BLE001 - any decoding failure is a bad message
        raise WireError(f"{what}: undecodable arrays ({type(err).__name__})") from None
    for name, value in arrays.items():
        if value.dtype != torch.float32:
            raise WireError(f"{what}: array {name!r} has dtype {value.dtype}, expected float32")
        if not bool(torch.isfinite(value).all()):
            raise WireError(f"{what}: array {name!r} holds NaN or infinite values")
    return arrays


def encode_plan(plan: RoundPlan, global_arrays: dict[str, torch.Tensor]) -> RecordDict:
    config = ConfigRecord({"round": plan.round, **plan.config.to_user_config()})
    return RecordDict({GLOBAL_KEY: _arrays_to_record(global_arrays), PLAN_KEY: config})


def decode_plan(content: RecordDict) -> tuple[RoundPlan, dict[str, torch.Tensor]]:
    if PLAN_KEY not in content.config_records or GLOBAL_KEY not in content.array_records:
        raise WireError("train message lacks its plan or global arrays")
    raw = dict(content.config_records[PLAN_KEY])
    rnd = raw.pop("round", None)
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 1:
        raise WireError(f"train message has a bad round number {rnd!r}")
    try:
        config = RunConfig.from_user_config(raw)
    except ConfigError as err:
        raise WireError(f"train message carries a bad plan: {err}") from None
    return RoundPlan(round=rnd, config=config), _record_to_arrays(
        content.array_records[GLOBAL_KEY], "global model"
    )


def encode_reply(report: SiteReport, update: dict[str, torch.Tensor] | None) -> RecordDict:
    if (update is None) == (report.status == "ok"):
        raise ValueError("an update travels exactly when the status is 'ok'")
    numbers = {
        f.name.replace("_", "-"): getattr(report, f.name)
        for f in fields(report)
        if f.name not in _STRING_FIELDS
    }
    content = RecordDict(
        {
            STATUS_KEY: ConfigRecord(
                {
                    "status": report.status,
                    "reason": report.reason,
                    "site": report.site,
                    "dp": report.dp,
                    "ledger-head": report.ledger_head,
                    "ledger-signature": report.ledger_signature,
                }
            ),
            METRICS_KEY: MetricRecord(numbers),
        }
    )
    if update is not None:
        content[UPDATE_KEY] = _arrays_to_record(update)
    return content


def decode_reply(content: RecordDict) -> tuple[SiteReport, dict[str, torch.Tensor] | None]:
    if STATUS_KEY not in content.config_records or METRICS_KEY not in content.metric_records:
        raise WireError("reply lacks its status or metrics")
    status_rec = content.config_records[STATUS_KEY]
    status, reason, dp = status_rec.get("status"), status_rec.get("reason"), status_rec.get("dp")
    site = status_rec.get("site")
    if status not in STATUSES or not isinstance(reason, str) or not isinstance(dp, bool):
        raise WireError(f"reply has a bad status record (status {status!r})")
    if not isinstance(site, str) or not SITE_NAME.fullmatch(site):
        raise WireError("reply has a bad site name (1-64 letters, digits, '.', '_', '-')")
    head, signature = status_rec.get("ledger-head", ""), status_rec.get("ledger-signature", "")
    if not isinstance(head, str) or not LEDGER_HEAD.fullmatch(head):
        raise WireError("reply has a bad ledger head (64 hex digits or empty)")
    if not isinstance(signature, str) or not LEDGER_SIGNATURE.fullmatch(signature):
        raise WireError("reply has a bad ledger signature (base64 Ed25519 or empty)")
    metrics = dict(content.metric_records[METRICS_KEY])
    values: dict[str, object] = {}
    for f in fields(SiteReport):
        if f.name in _STRING_FIELDS:
            continue
        key = f.name.replace("_", "-")
        value = metrics.pop(key, None)
        if f.type == "int":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise WireError(f"reply metric {key!r} must be a non-negative integer")
        elif not isinstance(value, float | int) or (math.isinf(value) or value < 0):
            raise WireError(f"reply metric {key!r} must be a non-negative finite number")
        values[f.name] = value
    if metrics:
        raise WireError(f"reply has undeclared metrics {sorted(metrics)}")
    # NaN means "no DP" and nothing else: a DP report's numbers are all finite.
    if dp and any(isinstance(v, float) and math.isnan(v) for v in values.values()):
        raise WireError("reply claims DP but carries NaN metrics")
    report = SiteReport(
        status=status,
        reason=reason[:200],
        site=site,
        dp=dp,
        ledger_head=head,
        ledger_signature=signature,
        **values,  # type: ignore[arg-type]
    )
    has_update = UPDATE_KEY in content.array_records
    if has_update != (status == "ok"):
        raise WireError(
            f"reply with status {status!r} {'has' if has_update else 'lacks'} an update"
        )
    update = _record_to_arrays(content.array_records[UPDATE_KEY], "update") if has_update else None
    return report, update


def report_dict(report: SiteReport) -> dict[str, object]:
    """JSON-ready form (NaN epsilon of a non-DP site becomes None)."""
    out = asdict(report)
    for k, v in out.items():
        if isinstance(v, float) and math.isnan(v):
            out[k] = None
    return out
