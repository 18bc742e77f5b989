"""The site's ClientApp: unpack the message, call client.site, pack the reply.

Errors at a site are logged in full locally; the coordinator receives a status and
a generic reason that quotes no data (Flower would forward exception text verbatim).
"""

from __future__ import annotations

import logging
import secrets

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client.site import (
    PARTITION_ID_KEY,
    SITE_ID_KEY,
    SiteConfigError,
    SiteSettings,
    SiteState,
    run_round,
    site_report,
)
from common.data import DataValidationError
from common.privacy.accounting import PrivacyError
from common.privacy.ledger import LedgerError
from common.training import default_device
from common.wire import SITE_NAME, SiteReport, decode_plan, encode_reply

log = logging.getLogger("fedsilo.site")
STATE_KEY = "fedsilo.site"

app = ClientApp()

# Reasons the coordinator may see: fixed texts, never an exception's message.
_PUBLIC_REASONS: dict[type[BaseException], str] = {
    DataValidationError: "site data failed validation (details in the site's log)",
    SiteConfigError: "site configuration is invalid (details in the site's log)",
    PrivacyError: "site privacy settings are invalid (details in the site's log)",
    LedgerError: "site privacy ledger is unreadable or damaged (details in the site's log)",
}


def _failure(err: BaseException, site: str) -> SiteReport:
    reason = next(
        (text for kind, text in _PUBLIC_REASONS.items() if isinstance(err, kind)),
        "site error (details in the site's log)",
    )
    return site_report("failed", reason, site)


def _safe_site_name(name: object, node_id: int) -> str:
    if isinstance(name, int):
        name = f"site-{name}"
    if isinstance(name, str) and SITE_NAME.fullmatch(name):
        return name
    return f"node-{node_id}"[:64]


@app.train()
def train(msg: Message, context: Context) -> Message:
    plan, global_arrays = decode_plan(msg.content)  # our own WireError: names no data
    record = context.state.config_records.get(STATE_KEY)
    state = SiteState.from_json(str(record["json"]) if record else None)
    # Noise and sampling must be unpredictable to anyone else: OS entropy.
    generator = torch.Generator(device=default_device()).manual_seed(secrets.randbits(63))
    try:
        settings = SiteSettings.from_node_config(context.node_config, plan.config)
        report, update = run_round(
            plan, global_arrays, settings, state, run_id=str(context.run_id), generator=generator
        )
    except Exception as err:
        log.exception("round %d failed at this site", plan.round)
        name = context.node_config.get(SITE_ID_KEY, context.node_config.get(PARTITION_ID_KEY))
        report, update = _failure(err, _safe_site_name(name, context.node_id)), None
    # The ledger entry is already on disk; persist the run's calibration too.
    context.state[STATE_KEY] = ConfigRecord({"json": state.to_json()})
    return Message(encode_reply(report, update), reply_to=msg)
