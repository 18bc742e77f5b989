"""Which rows a site holds out of training for the private federated evaluation.

A deployed site's share is its own (node config ``eval-fraction``, default 0.2); a
simulated site holds rows out only in a run that evaluates privately, at the plan's
``eval-fraction``. The first time a site holds rows out, the fraction is pinned in its
state folder (``holdout.json``) and from then on every run, training or evaluating,
keeps the same rows out: the keyed hash of common/data/holdout.py is stable, so the
held-out rows are never trained on. That disjointness is what lets the evaluation's
spend compose in parallel with training's (common/privacy/ledger.py ``charges``). A
site whose ledger already held training rounds when it pinned (rows that are held out
now may have been trained on before) does not evaluate privately: ``late`` says so,
and the evaluation refuses rather than compose unsoundly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from client.data import Holdout
from client.settings import SiteConfigError, SiteSettings
from common.evaluation import evaluation_modes
from common.messages import RoundPlan
from common.privacy.identity import exclusive, fsync_dir
from common.privacy.ledger import EVAL_SCOPE, LedgerEntry

HOLDOUT_FILE = "holdout.json"


@dataclass(frozen=True)
class SiteHoldout:
    holdout: Holdout
    late: bool  # pinned after training rounds: the evaluation would not be sound


def _read(path: Path) -> tuple[float, bool, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        fraction, late, column = raw["fraction"], raw["late"], raw["text-column"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SiteConfigError(f"{path} is damaged ({type(err).__name__}); restore it") from None
    if not (
        isinstance(fraction, float)
        and 0 <= fraction < 1
        and isinstance(late, bool)
        and isinstance(column, str)
    ):
        raise SiteConfigError(f"{path} is damaged (fraction {fraction!r}); restore it")
    return fraction, late, column


def _write(path: Path, fraction: float, late: bool, column: str) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump({"fraction": fraction, "late": late, "text-column": column}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def site_holdout(
    settings: SiteSettings, plan: RoundPlan, key: bytes | None, entries: list[LedgerEntry]
) -> SiteHoldout:
    """The rows this site keeps out this round (pinning the fraction at first use)."""
    if settings.deployed:
        asked = settings.eval_fraction or 0.0
    else:
        _, federated = evaluation_modes(plan.config, plan.task)
        asked = plan.config.eval_fraction if federated else 0.0
    if settings.state_dir is None or key is None:
        if asked:
            raise SiteConfigError("a held-out share needs the site's 'state-dir' (its key)")
        return SiteHoldout(Holdout(hashlib.sha256(b"no-holdout").digest(), 0.0), False)
    column = settings.text_column if settings.deployed else plan.task.text_column
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(settings.state_dir / (HOLDOUT_FILE + ".lock")):  # one pin at a time
        return _pin(settings, settings.state_dir / HOLDOUT_FILE, asked, column, key, entries)


def _pin(
    settings: SiteSettings,
    path: Path,
    asked: float,
    column: str,
    key: bytes,
    entries: list[LedgerEntry],
) -> SiteHoldout:
    if path.exists():
        fraction, late, pinned_column = _read(path)
        if pinned_column != column:
            raise SiteConfigError(
                f"the held-out share was pinned on the text column {pinned_column!r}, the "
                f"site now reads {column!r}: the rows would be split anew"
            )
        if fraction > 0:
            if settings.deployed and fraction != asked:
                raise SiteConfigError(
                    f"'eval-fraction' is {asked} but this site pinned {fraction} at its "
                    "first round: changing it would move held-out rows into training"
                )
            return SiteHoldout(Holdout(key, fraction), late)
        if not asked:  # still nothing held out
            return SiteHoldout(Holdout(key, 0.0), False)
        _write(path, asked, True, column)  # it trained on every row before
        return SiteHoldout(Holdout(key, asked), True)
    if any(e.budget_scope == EVAL_SCOPE for e in entries):
        raise SiteConfigError(
            f"{path} is missing but the ledger holds evaluation releases: restore it (a new "
            "pin could move rows already released into training)"
        )
    late = any(e.budget_scope != EVAL_SCOPE for e in entries)
    _write(path, asked, late and bool(asked), column)
    return SiteHoldout(Holdout(key, asked), late and bool(asked))
