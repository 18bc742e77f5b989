"""The one place that converts between fedsilo's values and Flower records.

What crosses the wire, and nothing else:
- coordinator -> site: the trainable global arrays and the round plan (round number
  plus the federation's RunConfig);
- site -> coordinator: a status, the update (only when trained) and declared public
  metrics. No loss, no per-example value, no text: those are data-dependent and
  not covered by the DP guarantee.
- with secure aggregation, the first reply carries the site's two public keys instead
  of the update, and three more exchanges (``StageMessage``) carry public keys, sealed
  shares, the masked (uniformly random-looking) input and unmasking shares.

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
from flwr.common.serde import recorddict_to_proto

from common.config import ConfigError, RunConfig
from common.secagg.errors import SecAggError
from common.secagg.params import PublicKeys, SecAggParams

GLOBAL_KEY = "global"
PLAN_KEY = "plan"
UPDATE_KEY = "update"
STATUS_KEY = "status"
METRICS_KEY = "metrics"
SECAGG_KEY = "secagg"
KEYS_KEY = "secagg-keys"
STAGE_KEY = "secagg-stage"

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
    # 1 when the site's model delta was scaled down to the plan's update-clip-norm.
    update_clipped: int = 0


@dataclass(frozen=True)
class SecAggSetup:
    """What one site needs to join a secure round: the public parameters, its own
    protocol index and the public seed of the round's rotation."""

    params: SecAggParams
    index: int
    rotation_seed: int


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
    """A round's train message (secure rounds add each site's setup: ``with_setup``)."""
    config = ConfigRecord({"round": plan.round, **plan.config.to_user_config()})
    return RecordDict({GLOBAL_KEY: _arrays_to_record(global_arrays), PLAN_KEY: config})


def with_setup(plan_content: RecordDict, setup: SecAggSetup) -> RecordDict:
    """A site's train message: the shared plan content plus its own secagg setup (the
    global arrays are converted once per round, not once per site)."""
    content = RecordDict(dict(plan_content))
    content[SECAGG_KEY] = ConfigRecord(
        {
            "params": setup.params.to_json(),
            "index": setup.index,
            "rotation-seed": setup.rotation_seed,
        }
    )
    return content


def decode_setup(content: RecordDict) -> SecAggSetup | None:
    """The secure-aggregation part of a train message (None: plain aggregation)."""
    record = content.config_records.get(SECAGG_KEY)
    if record is None:
        return None
    params, index, seed = record.get("params"), record.get("index"), record.get("rotation-seed")
    if not isinstance(params, str):
        raise WireError("train message has malformed secagg parameters")
    for name, value in (("index", index), ("rotation-seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise WireError(f"train message has a bad secagg {name}")
    try:
        parsed = SecAggParams.from_json(params)
    except SecAggError as err:
        raise WireError(f"train message: {err}") from None
    assert isinstance(index, int) and isinstance(seed, int)
    if index not in parsed.participants:
        raise WireError(f"train message: secagg index {index} is not a participant")
    return SecAggSetup(params=parsed, index=index, rotation_seed=seed)


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


def encode_reply(
    report: SiteReport,
    update: dict[str, torch.Tensor] | None,
    keys: PublicKeys | None = None,
) -> RecordDict:
    """An ok reply carries the update (plain) or the site's public keys (secure)."""
    if ((update is None) == (keys is None)) == (report.status == "ok"):
        raise ValueError("an update or keys (one of them) travel exactly when status is 'ok'")
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
    if keys is not None:
        content[KEYS_KEY] = ConfigRecord({"c": keys.c, "s": keys.s})
    return content


def decode_reply(
    content: RecordDict,
) -> tuple[SiteReport, dict[str, torch.Tensor] | None, PublicKeys | None]:
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
    has_keys = KEYS_KEY in content.config_records
    if has_update and has_keys:
        raise WireError("reply carries both an update and secagg keys")
    if (has_update or has_keys) != (status == "ok"):
        raise WireError(
            f"reply with status {status!r} {'has' if has_update else 'lacks'} an update"
        )
    update = _record_to_arrays(content.array_records[UPDATE_KEY], "update") if has_update else None
    keys = None
    if has_keys:
        rec = content.config_records[KEYS_KEY]
        c, s_key = rec.get("c"), rec.get("s")
        if not isinstance(c, bytes) or not isinstance(s_key, bytes):
            raise WireError("reply has malformed secagg keys")
        try:
            keys = PublicKeys(c, s_key)
        except SecAggError as err:
            raise WireError(f"reply has bad secagg keys: {err}") from None
    return report, update, keys


def encode_stage(message: StageMessage) -> RecordDict:
    record = ConfigRecord(
        {
            "stage": message.stage,
            "session": message.session,
            "ids": list(message.ids),
            "blobs": list(message.blobs),
            "more": list(message.more),
            "alive": list(message.alive),
            "dropped": list(message.dropped),
            "error": message.error,
        }
    )
    return RecordDict({STAGE_KEY: record})


def is_stage(content: RecordDict) -> bool:
    return STAGE_KEY in content.config_records


def _int_list(raw: object, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or any(
        not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < 2**31 for x in raw
    ):
        raise WireError(f"secagg message field {name!r} must be a list of site indices")
    return tuple(raw)


def _bytes_list(raw: object, name: str) -> tuple[bytes, ...]:
    if not isinstance(raw, list) or any(not isinstance(x, bytes) for x in raw):
        raise WireError(f"secagg message field {name!r} must be a list of byte strings")
    return tuple(raw)


def decode_stage(content: RecordDict, *, expect: StageName | None = None) -> StageMessage:
    """A stage message, checked for shape; ``expect`` refuses any other stage."""
    record = content.config_records.get(STAGE_KEY)
    if record is None:
        raise WireError("message is not a secure-aggregation stage message")
    stage, session, error = record.get("stage"), record.get("session"), record.get("error", "")
    if stage not in STAGES:
        raise WireError(f"unknown secagg stage {stage!r}")
    if expect is not None and stage != expect:
        raise WireError(f"expected secagg stage {expect!r}, got {stage!r}")
    if not isinstance(session, str) or not session or not isinstance(error, str):
        raise WireError("secagg message has a bad session or error field")
    ids = _int_list(record.get("ids", []), "ids")
    blobs = _bytes_list(record.get("blobs", []), "blobs")
    more = _bytes_list(record.get("more", []), "more")
    if len(set(ids)) != len(ids):
        raise WireError("secagg message names a site twice")
    if len(blobs) != len(ids):
        raise WireError("secagg message has a different number of ids and blobs")
    if more and len(more) != len(ids):
        raise WireError("secagg message has a different number of ids and second keys")
    return StageMessage(
        stage=stage,
        session=session,
        ids=ids,
        blobs=blobs,
        more=more,
        alive=_int_list(record.get("alive", []), "alive"),
        dropped=_int_list(record.get("dropped", []), "dropped"),
        error=error[:200],
    )


def content_bytes(content: RecordDict) -> int:
    """What a message's content costs on the wire (its serialized protobuf size)."""
    return int(recorddict_to_proto(content).ByteSize())


def report_dict(report: SiteReport) -> dict[str, object]:
    """JSON-ready form (NaN epsilon of a non-DP site becomes None)."""
    out = asdict(report)
    for k, v in out.items():
        if isinstance(v, float) and math.isnan(v):
            out[k] = None
    return out
