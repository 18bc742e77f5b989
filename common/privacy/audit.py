"""What a privacy officer asks of ledgers, without trusting the coordinator.

``verify_ledger`` / ``verify`` check each ledger: parse, schema, signatures, hash
chain, order, one site, every claimed epsilon re-derived with Google's dp_accounting
PLD accountant (independent of the Opacus PRV accountant that wrote them) and no
spend above the recorded budget; with the coordinator's ``summary.json`` also that no
entry it saw was removed. ``spend_rows`` says per site, data set and run how much
epsilon was spent of which budget.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.privacy.errors import LedgerError, PrivacyError
from common.privacy.events import (
    PRV_EPS_ERROR,
    PRV_MAX_EPSILON,
    SubsampledGaussianEvent,
    merged_history,
)
from common.privacy.identity import PUBLIC_KEY_FILE, load_public_key
from common.privacy.ledger import (
    LEDGER_FILE,
    ZERO_HASH,
    Finding,
    LedgerEntry,
    parse_ledger,
    parse_time,
    spent_events,
)

# PLD's grid: the same as the tests' reference accountant.
PLD_DISCRETIZATION = 1e-3
# Opacus PRV may be off by PRV_EPS_ERROR and PLD's grid adds its own; small epsilons
# (a few hundredths) would otherwise fail a purely relative comparison.
ABSOLUTE_SLACK = 2 * PRV_EPS_ERROR


@lru_cache(maxsize=256)
def _pld_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    # dp_accounting is imported here so that writing a ledger does not need it.
    try:
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant
    except ImportError as err:
        raise ImportError("auditing epsilons needs the dp-accounting package") from err
    accountant = pld_privacy_accountant.PLDAccountant(
        value_discretization_interval=PLD_DISCRETIZATION
    )
    for sigma, q, steps in history:
        accountant.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps,
            )
        )
    return float(accountant.get_epsilon(delta))


def recompute_epsilon(events: Sequence[SubsampledGaussianEvent], delta: float) -> float:
    """Epsilon of ``events`` by Google's PLD accountant, independent of Opacus."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    history = tuple(merged_history(events))
    if not history:
        return 0.0
    return _pld_epsilon(history, delta)


def _epsilon_finding(
    number: int, kind: str, recorded: float, reference: float, tolerance: float
) -> Finding | None:
    """Above PRV_MAX_EPSILON the writer records an RDP upper bound: only too low is wrong."""
    slack = tolerance * reference + ABSOLUTE_SLACK
    if recorded > PRV_MAX_EPSILON:
        wrong = recorded < reference - slack
    else:
        wrong = abs(recorded - reference) > slack
    if not wrong:
        return None
    return Finding(
        number,
        kind,
        f"line {number}: recorded {kind.replace('-', '_')} {recorded:.6g} but the "
        f"independent PLD accountant gives {reference:.6g} (tolerance {tolerance:.0%})",
    )


def verify_ledger(
    path: Path, public_key: Ed25519PublicKey | None = None, *, tolerance: float = 0.02
) -> tuple[list[LedgerEntry], list[Finding]]:
    """Audit a ledger: parse, schema, signatures, hash chain, order, one site, every
    claimed epsilon re-derived independently, and no spend above the recorded budget.
    Bad content gives findings, never raises."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise LedgerError(f"tolerance must be a non-negative number, got {tolerance}")
    try:
        data = path.read_bytes()
    except OSError as err:
        return [], [Finding(None, "parse", f"{path}: cannot read the ledger ({err})")]
    numbered, findings = parse_ledger(data, path)

    if public_key is None:
        findings.append(Finding(None, "no-key", "no public key given: signatures not checked"))
    else:
        for number, entry in numbered:
            try:
                signature = base64.b64decode(entry.signature, validate=True)
                public_key.verify(signature, entry.signed_bytes())
            except (binascii.Error, InvalidSignature):
                findings.append(
                    Finding(number, "signature", f"line {number}: signature does not verify")
                )

    by_line = dict(numbered)
    for number, entry in numbered:
        if number == 1:
            expected: str | None = ZERO_HASH
        else:
            before = by_line.get(number - 1)
            expected = before.entry_hash() if before is not None else None  # already flagged
        if expected is not None and entry.prev_hash != expected:
            findings.append(
                Finding(
                    number,
                    "chain",
                    f"line {number}: prev_hash does not match the entry before it "
                    "(an entry was deleted, inserted, reordered or edited)",
                )
            )

    last_round: dict[str, int] = {}
    last_time: datetime | None = None
    for number, entry in numbered:
        previous = last_round.get(entry.run_id)
        if previous is not None and entry.round <= previous:
            findings.append(
                Finding(
                    number,
                    "order",
                    f"line {number}: run {entry.run_id!r} round {entry.round} follows "
                    f"round {previous}",
                )
            )
        last_round[entry.run_id] = max(entry.round, previous if previous is not None else -1)
        moment = parse_time(entry.time)
        if last_time is not None and moment < last_time:
            findings.append(
                Finding(number, "order", f"line {number}: time {entry.time} goes backwards")
            )
        last_time = moment if last_time is None else max(last_time, moment)

    if numbered:
        site = numbered[0][1].site_id
        for number, entry in numbered:
            if entry.site_id != site:
                findings.append(
                    Finding(
                        number,
                        "site",
                        f"line {number}: site {entry.site_id!r} in the ledger of {site!r}",
                    )
                )

    for index, (number, entry) in enumerate(numbered):
        upto = [e for _, e in numbered[: index + 1]]
        run_events = [e.event for e in upto if e.run_id == entry.run_id]
        dataset_events = spent_events(upto, entry.dataset)
        for kind, recorded, events in (
            ("epsilon-run", entry.epsilon_run, run_events),
            ("epsilon-dataset", entry.epsilon_dataset, dataset_events),
        ):
            try:
                reference = recompute_epsilon(events, entry.delta)
            except (ValueError, ArithmeticError) as err:  # absurd values: report them
                findings.append(
                    Finding(number, kind, f"line {number}: cannot recompute epsilon ({err})")
                )
                continue
            finding = _epsilon_finding(number, kind, recorded, reference, tolerance)
            if finding is not None:
                findings.append(finding)
            if kind == "epsilon-dataset" and max(recorded, reference) > entry.budget * (
                1 + tolerance
            ):
                findings.append(
                    Finding(
                        number,
                        "overspend",
                        f"line {number}: epsilon {max(recorded, reference):.4f} on data set "
                        f"{entry.dataset[:12]}... exceeds the budget {entry.budget:g}",
                    )
                )

    findings.sort(key=lambda f: f.entry if f.entry is not None else 0)
    return [entry for _, entry in numbered], findings


@dataclass(frozen=True)
class LedgerAudit:
    path: Path
    key: Path | None
    entries: list[LedgerEntry]
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            "ledger": str(self.path),
            "key": str(self.key) if self.key else None,
            "site": self.entries[0].site_id if self.entries else None,
            "entries": len(self.entries),
            "ok": self.ok,
            "findings": [
                {"entry": f.entry, "kind": f.kind, "message": f.message} for f in self.findings
            ],
        }


def find_ledgers(paths: list[Path]) -> list[Path]:
    """Ledger files named directly, or every ledger.jsonl below a folder (a run dir)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(path.rglob(LEDGER_FILE)))
        else:
            found.append(path)
    return found


def _match_heads(entries: list[LedgerEntry], seen: list[tuple[int, str]]) -> list[Finding]:
    """Every head the coordinator saw must still be in the ledger: a ledger cut back at
    an entry boundary keeps a valid chain, and only this outside anchor reveals it."""
    hashes = {e.entry_hash() for e in entries}
    return [
        Finding(
            None,
            "truncated",
            f"the coordinator saw ledger head {head[:16]}... after "
            f"round {rnd}; it is missing from the ledger (entries removed?)",
        )
        for rnd, head in seen
        if head not in hashes
    ]


def verify(
    path: Path, key: Path | None = None, heads: dict[str, list[tuple[int, str]]] | None = None
) -> LedgerAudit:
    """Audit one ledger; without ``key`` the site's identity.pub beside it is used; with
    ``heads`` (``RunSummary.ledger_heads``: what the coordinator saw) the ledger must
    contain them all."""
    key = key or (
        path.parent / PUBLIC_KEY_FILE if (path.parent / PUBLIC_KEY_FILE).is_file() else None
    )
    try:
        public_key = load_public_key(key) if key else None
    except LedgerError as err:
        return LedgerAudit(path, key, [], [Finding(None, "key", str(err))])
    entries, findings = verify_ledger(path, public_key)
    if heads is not None and entries:
        findings.extend(_match_heads(entries, heads.get(entries[0].site_id, [])))
    return LedgerAudit(path, key, entries, findings)


@dataclass(frozen=True)
class SpendRow:
    site: str
    dataset: str
    run_id: str
    rounds: int
    epsilon_run: float
    epsilon_dataset: float
    budget: float
    delta: float

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget - self.epsilon_dataset)

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "dataset": self.dataset,
            "run": self.run_id,
            "rounds": self.rounds,
            "epsilon_run": self.epsilon_run,
            "epsilon_dataset": self.epsilon_dataset,
            "budget": self.budget,
            "remaining": self.remaining,
            "delta": self.delta,
        }


def spend_rows(entries: list[LedgerEntry]) -> list[SpendRow]:
    """One row per (site, data set, run), in ledger order; epsilon_dataset is the spend
    on that data set after the run's last entry (all earlier runs included)."""
    rows: dict[tuple[str, str, str], SpendRow] = {}
    for e in entries:
        key = (e.site_id, e.dataset, e.run_id)
        prior = rows.get(key)
        rows[key] = SpendRow(
            site=e.site_id,
            dataset=e.dataset,
            run_id=e.run_id,
            rounds=(prior.rounds if prior else 0) + 1,
            epsilon_run=e.epsilon_run,
            epsilon_dataset=e.epsilon_dataset,
            budget=e.budget,
            delta=e.delta,
        )
    return list(rows.values())
