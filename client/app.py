"""The site's ClientApp: decode the message, call the site's code, encode the reply.

A train message runs the round (client/round.py); with secure aggregation the update
does not leave with the reply: it is encoded and waits in node state for the three
protocol stages (client/secure.py) that follow as messages of their own.

Only a train message loads the training path (torch, Opacus, the model): in deployment
Flower starts a fresh process for every message, and a stage message's process imports
neither torch nor Opacus.

Errors at a site are logged in full locally; the coordinator receives a status and
a generic reason that quotes no data (Flower would forward exception text verbatim).
"""

from __future__ import annotations

import logging
import secrets

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client import secure
from client.settings import (
    DATA_PATH_KEY,
    PARTITION_ID_KEY,
    SITE_ID_KEY,
    SiteConfigError,
    SiteSettings,
)
from common.codec import decode_stage, decode_train, encode_reply, encode_stage, is_stage
from common.data.dataset import DataValidationError
from common.messages import SITE_NAME, STAGES, SiteReport, TrainReply
from common.privacy.errors import LedgerError, PrivacyError
from common.secagg.errors import SecAggError
from common.secagg.site import SiteSession

log = logging.getLogger("fedsilo.site")
STATE_KEY = "fedsilo.site"
SECAGG_STATE_KEY = "fedsilo.secagg"
DROPOUT_KEY = "fedsilo.dropout"
_STAGES = ("train", *STAGES)


class SimulatedDropout(RuntimeError):
    """A simulated site crashing on purpose (run-config ``dropout-rate``)."""


def _plan_dropout(context: Context, rate: float, secure: bool) -> str:
    """The stage at which this simulated site will crash this round ("" = none)."""
    simulated = PARTITION_ID_KEY in context.node_config and DATA_PATH_KEY not in context.node_config
    if not simulated or rate <= 0 or secrets.SystemRandom().random() >= rate:
        return ""
    return secrets.choice(_STAGES if secure else _STAGES[:1])


def _maybe_crash(context: Context, stage: str) -> None:
    record = context.state.config_records.get(DROPOUT_KEY)
    if record is not None and record.get("stage") == stage:
        raise SimulatedDropout(f"simulated dropout at {stage}")


app = ClientApp()

# Reasons the coordinator may see: fixed texts, never an exception's message.
_PUBLIC_REASONS: dict[type[BaseException], str] = {
    DataValidationError: "site data failed validation (details in the site's log)",
    SiteConfigError: "site configuration is invalid (details in the site's log)",
    PrivacyError: "site privacy settings are invalid (details in the site's log)",
    LedgerError: "site privacy ledger is unreadable or damaged (details in the site's log)",
    SecAggError: "site could not join secure aggregation (details in the site's log)",
}


def _failure(err: BaseException, site: str) -> SiteReport:
    reason = next(
        (text for kind, text in _PUBLIC_REASONS.items() if isinstance(err, kind)),
        "site error (details in the site's log)",
    )
    return SiteReport.of("failed", reason, site)


def _safe_site_name(name: object, node_id: int) -> str:
    if isinstance(name, int):
        name = f"site-{name}"
    if isinstance(name, str) and SITE_NAME.fullmatch(name):
        return name
    return f"node-{node_id}"[:64]


def _load_pending(context: Context) -> secure.Pending | None:
    record = context.state.config_records.get(SECAGG_STATE_KEY)
    if record is None:
        return None
    session, encoded = record.get("session"), record.get("encoded")
    if not isinstance(session, str) or not isinstance(encoded, bytes):
        raise SecAggError("saved secure-aggregation state is damaged")
    return secure.Pending(SiteSession.from_json(session), encoded)


def _save_pending(context: Context, pending: secure.Pending | None) -> None:
    if pending is None:
        context.state.config_records.pop(SECAGG_STATE_KEY, None)
        return
    context.state[SECAGG_STATE_KEY] = ConfigRecord(
        {"session": pending.session.to_json(), "encoded": pending.encoded}
    )


def _stage(msg: Message, context: Context) -> Message:
    """One secure-aggregation stage after training."""
    message = decode_stage(msg.content)  # our own WireError: names no data
    _maybe_crash(context, message.stage)
    try:
        pending = _load_pending(context)
        if pending is None:
            raise SecAggError("no secure round in progress at this site (stale or replayed)")
        reply, kept = secure.step(pending, message)
    except Exception as err:
        log.exception("secure aggregation stage %s failed at this site", message.stage)
        reply, kept = secure.failure(message, err), None
    _save_pending(context, kept)
    return Message(encode_stage(reply), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_stage(msg.content):
        return _stage(msg, context)
    # The training path: torch, Opacus and the model load here, for train messages only.
    from client.round import SiteState, train_round

    request = decode_train(msg.content)  # our own WireError: names no data
    _save_pending(context, None)  # a new round ends any unfinished one
    crash_at = _plan_dropout(context, request.plan.config.dropout_rate, request.setup is not None)
    context.state[DROPOUT_KEY] = ConfigRecord({"stage": crash_at})
    _maybe_crash(context, "train")
    record = context.state.config_records.get(STATE_KEY)
    state = SiteState.from_json(str(record["json"]) if record else None)
    try:
        settings = SiteSettings.from_node_config(context.node_config, request.plan.config)
        reply, pending = train_round(request, settings, state, run_id=str(context.run_id))
        _save_pending(context, pending)
    except Exception as err:
        log.exception("round %d failed at this site", request.plan.round)
        name = context.node_config.get(SITE_ID_KEY, context.node_config.get(PARTITION_ID_KEY))
        reply = TrainReply(_failure(err, _safe_site_name(name, context.node_id)))
        _save_pending(context, None)
    # The ledger entry is already on disk; persist the run's calibration too.
    context.state[STATE_KEY] = ConfigRecord({"json": state.to_json()})
    return Message(encode_reply(reply), reply_to=msg)
