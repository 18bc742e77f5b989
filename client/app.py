"""The site's ClientApp: decode the message, call the site's code, encode the reply.

A train message runs the round (client/round.py). With secure aggregation three stage
messages come first and touch no data (advertise, share keys, open shares: the site
signs fresh keys, checks every advert against its roster, deals and checks shares);
the train message names the round's final sites (checked before training), and the
reply carries the masked input instead of the update; two stage messages follow
(consistency, unmask). The protocol's state waits in node state between messages
(client/secure.py).

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
    task_problem,
)
from common.codec import decode_stage, decode_train, encode_reply, encode_stage, is_stage
from common.data.dataset import DataValidationError
from common.messages import SITE_NAME, STAGES, SiteReport, StageMessage, TrainReply
from common.privacy.errors import LedgerError, PrivacyError
from common.privacy.identity import init_state, open_state
from common.secagg.errors import SecAggError
from common.secagg.roster import enrol
from common.secagg.site import SiteSession

log = logging.getLogger("fedsilo.site")
STATE_KEY = "fedsilo.site"
SECAGG_STATE_KEY = "fedsilo.secagg"
DROPOUT_KEY = "fedsilo.dropout"
_STAGES = (*STAGES[:1], "train", *STAGES[1:])  # in the order a secure round runs them


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
    fields = [record.get(k) for k in ("session", "state-dir", "roster", "min-sites")]
    session, state_dir, roster, min_sites = fields
    if not (
        isinstance(session, str)
        and isinstance(state_dir, str)
        and isinstance(roster, str)
        and isinstance(min_sites, int)
    ):
        raise SecAggError("saved secure-aggregation state is damaged")
    return secure.Pending(SiteSession.from_json(session), state_dir, roster, min_sites)


def _save_pending(context: Context, pending: secure.Pending | None) -> None:
    if pending is None:
        context.state.config_records.pop(SECAGG_STATE_KEY, None)
        return
    context.state[SECAGG_STATE_KEY] = ConfigRecord(
        {
            "session": pending.session.to_json(),
            "state-dir": pending.state_dir,
            "roster": pending.roster,
            "min-sites": pending.min_sites,
        }
    )


def _advertise(message: StageMessage, context: Context) -> tuple[StageMessage, secure.Pending]:
    """Stage 1 of a secure round: the site's identity signs fresh keys. A simulated
    site enrols its identity in the simulation's shared roster first."""
    assert message.plan is not None and message.setup is not None  # codec checked
    settings = SiteSettings.from_node_config(context.node_config, message.plan.config)
    problem = task_problem(settings, message.plan.task)
    if problem is not None:  # refused before any key is made
        raise SecAggError(problem)
    if settings.state_dir is None or settings.roster_path is None:
        raise SiteConfigError("secure aggregation needs the site's 'state-dir' (identity, roster)")
    if settings.deployed:
        keys = open_state(settings.state_dir)
    else:
        keys = init_state(settings.state_dir, site_id=settings.site_id)
        enrol(
            settings.roster_path,
            settings.site_id,
            keys.identity.public_key.public_bytes_raw(),
        )
    return secure.advertise(
        message.setup,
        identity=keys.identity.public_key.public_bytes_raw(),
        sign=keys.identity.sign,
        state_dir=settings.state_dir,
        roster=settings.roster_path,
        min_sites=settings.min_secure_sites,
    )


def _stage(msg: Message, context: Context) -> Message:
    """One secure-aggregation stage: advertise before training, the others after."""
    message = decode_stage(msg.content)  # our own WireError: names no data
    if message.stage == "advertise":
        _save_pending(context, None)  # a new round ends any unfinished one
        crash_at = _plan_dropout(
            context, message.plan.config.dropout_rate if message.plan else 0, True
        )
        context.state[DROPOUT_KEY] = ConfigRecord({"stage": crash_at})
    _maybe_crash(context, message.stage)
    kept: secure.Pending | None
    try:
        if message.stage == "advertise":
            reply, kept = _advertise(message, context)
        else:
            pending = _load_pending(context)
            if pending is None:
                raise SecAggError("no secure round in progress at this site (stale or replayed)")
            reply, kept = secure.step(pending, message)
    except Exception as err:
        log.exception("secure aggregation stage %s failed at this site", message.stage)
        # The protocol's own reasons name sites and sizes, never data; others are generic.
        reason = str(err) if isinstance(err, SecAggError) else _failure(err, "-").reason
        reply, kept = secure.failure(message, reason), None
    _save_pending(context, kept)
    return Message(encode_stage(reply), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_stage(msg.content):
        return _stage(msg, context)
    # The training path: torch, Opacus and the model load here, for train messages only.
    from client.reply import train_round
    from client.round import SiteState

    request = decode_train(msg.content)  # our own WireError: names no data
    pending: secure.Pending | None = None
    if request.plan.preflight:  # before the run's first round: no protocol state, no dropout
        context.state[DROPOUT_KEY] = ConfigRecord({"stage": ""})
    elif request.setup is None:
        _save_pending(context, None)  # a new round ends any unfinished one
        crash_at = _plan_dropout(context, request.plan.config.dropout_rate, False)
        context.state[DROPOUT_KEY] = ConfigRecord({"stage": crash_at})
    _maybe_crash(context, "train")
    record = context.state.config_records.get(STATE_KEY)
    state = SiteState.from_json(str(record["json"]) if record else None)
    try:
        settings = SiteSettings.from_node_config(context.node_config, request.plan.config)
        if request.setup is not None:
            pending = _load_pending(context)  # the session this site advertised in
        reply, pending = train_round(
            request, settings, state, run_id=str(context.run_id), pending=pending
        )
        _save_pending(context, pending)
    except Exception as err:
        log.exception("round %d failed at this site", request.plan.round)
        name = context.node_config.get(SITE_ID_KEY, context.node_config.get(PARTITION_ID_KEY))
        reply = TrainReply(
            _failure(err, _safe_site_name(name, context.node_id)),
            preflight=request.plan.preflight,
        )
        _save_pending(context, None)
    # The ledger entry is already on disk; persist the run's calibration too.
    context.state[STATE_KEY] = ConfigRecord({"json": state.to_json()})
    return Message(encode_reply(reply), reply_to=msg)
