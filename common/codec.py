"""Flower's record codec: the one place that converts common/messages.py's values to
Flower records and back, for the ClientApp, the ServerApp's transport and nothing else.

Every message is validated on arrival; anything malformed raises ``WireError`` naming
what is wrong, and is never used. Arrays are torch tensors, and torch is imported only
where arrays are converted: a secure-aggregation stage message (all bytes and
integers) is coded without it, so a deployed site's process for such a message does
not pay for torch's import.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from common.config import ConfigError, RunConfig
from common.messages import (
    KEY_FINGERPRINT,
    LEDGER_HEAD,
    LEDGER_SIGNATURE,
    REPORT_TEXT_FIELDS,
    SITE_NAME,
    STAGES,
    STATUSES,
    RoundPlan,
    SecAggSetup,
    SiteReport,
    StageMessage,
    StageName,
    TrainReply,
    TrainRequest,
    WireError,
)
from common.secagg.errors import SecAggError
from common.secagg.params import SecAggParams
from common.task import Task

if TYPE_CHECKING:
    from common.messages import Arrays

GLOBAL_KEY = "global"
PLAN_KEY = "plan"
UPDATE_KEY = "update"
STATUS_KEY = "status"
METRICS_KEY = "metrics"
SECAGG_KEY = "secagg"
STAGE_KEY = "secagg-stage"


def _arrays_to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in arrays.items()})


def _record_to_arrays(record: ArrayRecord, what: str) -> Arrays:
    import torch  # only messages that carry arrays pay for it

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


# ---- coordinator -> site: the train message -----------------------------------------


def encode_plan(plan: RoundPlan, global_arrays: Arrays) -> RecordDict:
    """A round's train message without a site's secure-aggregation setup."""
    return RecordDict({GLOBAL_KEY: _arrays_to_record(global_arrays), PLAN_KEY: _plan_record(plan)})


def _plan_record(plan: RoundPlan) -> ConfigRecord:
    return ConfigRecord(
        {
            "round": plan.round,
            "plan-task": plan.task.canonical(),
            "plan-evaluate": plan.evaluate,
            "plan-preflight": plan.preflight,
            **plan.config.to_user_config(),
        }
    )


def _setup_record(setup: SecAggSetup) -> ConfigRecord:
    return ConfigRecord(
        {
            "params": setup.params.to_json(),
            "index": setup.index,
            "rotation-seed": setup.rotation_seed,
            "members": list(setup.members),
        }
    )


def with_setup(plan_content: RecordDict, setup: SecAggSetup) -> RecordDict:
    """A site's train message: the shared plan content plus its own secagg setup (the
    global arrays are converted once per round, not once per site)."""
    content = RecordDict(dict(plan_content))
    content[SECAGG_KEY] = _setup_record(setup)
    return content


def encode_train(request: TrainRequest, base: RecordDict | None = None) -> RecordDict:
    """``request`` as a record; ``base`` is ``encode_plan`` of its plan and arrays when
    the caller has it already (one conversion of the arrays per round)."""
    content = base if base is not None else encode_plan(request.plan, request.arrays)
    return content if request.setup is None else with_setup(content, request.setup)


def _decode_setup(content: RecordDict, what: str = "train message") -> SecAggSetup | None:
    record = content.config_records.get(SECAGG_KEY)
    if record is None:
        return None
    params, index, seed = record.get("params"), record.get("index"), record.get("rotation-seed")
    if not isinstance(params, str):
        raise WireError(f"{what} has malformed secagg parameters")
    for name, value in (("index", index), ("rotation-seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise WireError(f"{what} has a bad secagg {name}")
    try:
        parsed = SecAggParams.from_json(params)
        members = _int_list(record.get("members", []), "members")
        if list(members) != sorted(set(members)) or not set(members) <= set(parsed.participants):
            raise WireError(f"{what} lists the round's sites out of order or unknown")
    except SecAggError as err:
        raise WireError(f"{what}: {err}") from None
    assert isinstance(index, int) and isinstance(seed, int)
    if index not in parsed.participants:
        raise WireError(f"{what}: secagg index {index} is not a participant")
    return SecAggSetup(params=parsed, index=index, rotation_seed=seed, members=members)


def _decode_plan(content: RecordDict, what: str) -> RoundPlan:
    if PLAN_KEY not in content.config_records:
        raise WireError(f"{what} lacks its plan")
    raw = dict(content.config_records[PLAN_KEY])
    rnd = raw.pop("round", None)
    task, evaluate = raw.pop("plan-task", None), raw.pop("plan-evaluate", None)
    preflight = raw.pop("plan-preflight", None)
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 1:
        raise WireError(f"{what} has a bad round number {rnd!r}")
    if not isinstance(task, str) or not isinstance(evaluate, bool):
        raise WireError(f"{what} lacks its task or its evaluate flag")
    if not isinstance(preflight, bool) or (preflight and evaluate):
        raise WireError(f"{what} lacks its pre-flight flag, or is both an evaluation and one")
    try:
        config = RunConfig.from_user_config(raw)
        return RoundPlan(
            round=rnd,
            config=config,
            task=Task.from_canonical(task),
            evaluate=evaluate,
            preflight=preflight,
        )
    except ConfigError as err:  # TaskError is one
        raise WireError(f"{what} carries a bad plan: {err}") from None


def decode_train(content: RecordDict) -> TrainRequest:
    if PLAN_KEY not in content.config_records or GLOBAL_KEY not in content.array_records:
        raise WireError("train message lacks its plan or global arrays")
    plan = _decode_plan(content, "train message")
    setup = _decode_setup(content)
    arrays = _record_to_arrays(content.array_records[GLOBAL_KEY], "global model")
    return TrainRequest(plan, arrays, setup)


# ---- site -> coordinator: the reply to a train message ------------------------------


def encode_reply(reply: TrainReply) -> RecordDict:
    """An ok reply carries the update (plain) or the site's public keys (secure)."""
    report = reply.report
    numbers = {
        f.name.replace("_", "-"): getattr(report, f.name)
        for f in fields(report)
        if f.name not in REPORT_TEXT_FIELDS
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
                    "identity": report.identity,
                    "preflight": reply.preflight,
                }
            ),
            METRICS_KEY: MetricRecord(numbers),
        }
    )
    if reply.update is not None:
        content[UPDATE_KEY] = _arrays_to_record(reply.update)
    if reply.masked is not None:
        content[STAGE_KEY] = _stage_record(reply.masked)
    return content


def _decode_report(content: RecordDict) -> SiteReport:
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
    if not isinstance(status_rec.get("preflight", None), bool):
        raise WireError("reply lacks its pre-flight flag")
    identity = status_rec.get("identity", "")
    if not isinstance(identity, str) or not KEY_FINGERPRINT.fullmatch(identity):
        raise WireError("reply has a bad ledger key fingerprint ('sha256:' and 64 hex digits)")
    metrics = dict(content.metric_records[METRICS_KEY])
    values: dict[str, object] = {}
    for f in fields(SiteReport):
        if f.name in REPORT_TEXT_FIELDS:
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
    return SiteReport(
        status=status,
        reason=reason[:200],
        site=site,
        dp=dp,
        ledger_head=head,
        ledger_signature=signature,
        identity=identity,
        **values,  # type: ignore[arg-type]
    )


def decode_reply(content: RecordDict) -> TrainReply:
    report = _decode_report(content)
    preflight = bool(content.config_records[STATUS_KEY]["preflight"])
    has_update = UPDATE_KEY in content.array_records
    has_masked = STAGE_KEY in content.config_records
    if has_update and has_masked:
        raise WireError("reply carries both an update and a masked input")
    if preflight and (has_update or has_masked):
        raise WireError("a pre-flight answer carries an update")
    if (has_update or has_masked) != (report.status == "ok" and not preflight):
        raise WireError(
            f"reply with status {report.status!r} {'has' if has_update else 'lacks'} an update"
        )
    update = _record_to_arrays(content.array_records[UPDATE_KEY], "update") if has_update else None
    masked = decode_stage(content, expect="masked-input") if has_masked else None
    return TrainReply(report, update, masked, preflight=preflight)


# ---- secure-aggregation stages, both directions --------------------------------------


def _stage_record(message: StageMessage) -> ConfigRecord:
    return ConfigRecord(
        {
            "stage": message.stage,
            "session": message.session,
            "ids": list(message.ids),
            "blobs": list(message.blobs),
            "more": list(message.more),
            "alive": list(message.alive),
            "dropped": list(message.dropped),
            "signature": message.signature,
            "error": message.error,
        }
    )


def encode_stage(message: StageMessage) -> RecordDict:
    content = RecordDict({STAGE_KEY: _stage_record(message)})
    if message.plan is not None:
        config = _plan_record(message.plan)
        content[PLAN_KEY] = config
    if message.setup is not None:
        content[SECAGG_KEY] = _setup_record(message.setup)
    return content


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
    if stage not in STAGES and not (stage == "masked-input" == expect):
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
    signature = record.get("signature", b"")
    if not isinstance(signature, bytes) or len(signature) not in (0, 64):
        raise WireError("secagg message has a bad signature field (64 bytes or none)")
    plan = setup = None
    if stage == "advertise" and not error and PLAN_KEY in content.config_records:
        plan = _decode_plan(content, "advertise message")
        setup = _decode_setup(content, "advertise message")
        if setup is None or setup.params.session != session:
            raise WireError("advertise message lacks its secagg setup for this session")
    return StageMessage(
        stage=stage,
        session=session,
        ids=ids,
        blobs=blobs,
        more=more,
        alive=_int_list(record.get("alive", []), "alive"),
        dropped=_int_list(record.get("dropped", []), "dropped"),
        signature=signature,
        plan=plan,
        setup=setup,
        error=error[:200],
    )


def content_bytes(content: RecordDict) -> int:
    """What a message's content costs on the wire (its serialized protobuf size)."""
    return int(recorddict_to_proto(content).ByteSize())
