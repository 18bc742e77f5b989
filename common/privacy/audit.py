"""What a privacy officer asks of ledgers, without trusting the coordinator or the site.

``verify_ledger`` checks one ledger: parse, schema, signatures, hash chain, order, one
site, and every claimed epsilon re-derived independently of Opacus (which wrote them):

- a run's epsilon (``epsilon_run``, a fixed history) with Google's dp_accounting PLD
  accountant over the run's entries;
- schema 2: the lifetime epsilon (``epsilon_lifetime``) with dp_accounting's RDP
  accountant at the filter's fixed orders over every entry charged to the entry's
  budget scope (``charged_to``), converted at delta / K as the adaptive filter does;
  no spend above the budget beyond numerical slack; one frozen plan per run, and no
  more rounds than planned;
- schema 1: the data set's epsilon (``epsilon_dataset``) with PLD over the data set's
  entries, and its per-data-set budget, as before.

``audit_ledgers`` / ``audit_against_summary`` check a federation's ledgers together
against the coordinator's ``summary.json`` (every site it saw with DP must be matched to
a ledger, every head it saw must be in it, the ledger key must be the one the site
reported) and, optionally, the coordinator's registry (``sites.json``). ``spend_rows``
says per site, scope and run how much epsilon was spent of which budget.

Bad content gives findings, never exceptions.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.privacy.budget import PLAN_FIELDS
from common.privacy.errors import LedgerError, PrivacyError
from common.privacy.events import (
    FILTER_ORDERS,
    PRV_EPS_ERROR,
    PRV_MAX_EPSILON,
    SubsampledGaussianEvent,
    merged_history,
)
from common.privacy.identity import (
    MARKER_FILE,
    PUBLIC_KEY_FILE,
    key_fingerprint,
    load_public_key,
)
from common.privacy.ledger import (
    LEDGER_FILE,
    ZERO_HASH,
    Finding,
    LedgerEntry,
    charges,
    parse_ledger,
    parse_time,
)

if TYPE_CHECKING:
    from dp_accounting.rdp import RdpAccountant

    from common.outputs import RunSummary

# PLD's grid: the same as the tests' reference accountant.
PLD_DISCRETIZATION = 1e-3
# Opacus PRV may be off by PRV_EPS_ERROR and PLD's grid adds its own; small epsilons
# (a few hundredths) would otherwise fail a purely relative comparison.
ABSOLUTE_SLACK = 2 * PRV_EPS_ERROR
# PLD's memory grows with epsilon (about 0.8 GB at 16,000): beyond this RDP bound an
# entry's epsilon is reported as not recomputable (it protects nothing anyway).
PLD_MAX_EPSILON = 2000.0
# The lifetime budget is a hard limit: only floating-point noise is forgiven.
OVERSPEND_SLACK = 1e-6  # relative
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")

# What one unit of privacy is: printed with every report.
PRIVACY_UNIT = (
    "one row of the site's data file: a person with k rows is protected as a group of k "
    "(roughly k times epsilon, and delta multiplied by about k*e^((k-1)*epsilon))"
)
RUN_EPSILON_NOTE = (
    "run epsilon: the run's own spend by the tight PRV accountant; valid for its fixed "
    "plan only (a fixed history), not across runs chosen after earlier outputs"
)
LIFETIME_EPSILON_NOTE = (
    "lifetime epsilon: what the site's adaptive RDP privacy filter certifies over every "
    "round charged to the scope, valid even when runs were chosen adaptively; the budget "
    "is enforced on this number"
)
EVAL_SCOPE_NOTE = (
    "eval scope: the private evaluation's releases (noisy counts of the held-out rows, "
    "which no training round touches): its own budget, in parallel with training's"
)
SCHEMA1_NOTE = (
    "schema-1 rows (ledgers written before lifetime budgets): per-data-set budgets, "
    "PRV epsilon over the data set's runs"
)


class _NotRecomputable(Exception):
    """An epsilon the independent accountants cannot give (absurd recorded values)."""


def _dp_accounting() -> Any:
    # dp_accounting is imported here so that writing a ledger does not need it.
    try:
        import dp_accounting
    except ImportError as err:
        raise ImportError("auditing epsilons needs the dp-accounting package") from err
    return dp_accounting


def _event(dp_accounting: Any, sigma: float, q: float, steps: int) -> Any:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


@contextlib.contextmanager
def _quiet_dp_accounting() -> Iterator[None]:
    """dp_accounting logs a warning per fractional order it excludes; its number is
    what counts here, not the log line."""
    try:
        from absl import logging as absl_logging
    except ImportError:  # pragma: no cover - dp_accounting depends on absl
        yield
        return
    before = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(before)


@lru_cache(maxsize=256)
def _rdp_bound(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """An RDP upper bound on the history's epsilon (cheap): guards the PLD's size."""
    dp_accounting = _dp_accounting()
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(orders=FILTER_ORDERS)
    for sigma, q, steps in history:
        accountant.compose(_event(dp_accounting, sigma, q, steps))
    return float(accountant.get_epsilon(delta))


@lru_cache(maxsize=256)
def _pld_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    dp_accounting = _dp_accounting()
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant(
        value_discretization_interval=PLD_DISCRETIZATION
    )
    for sigma, q, steps in history:
        accountant.compose(_event(dp_accounting, sigma, q, steps))
    return float(accountant.get_epsilon(delta))


def recompute_epsilon(events: Sequence[SubsampledGaussianEvent], delta: float) -> float:
    """Epsilon of ``events`` (a fixed history) by Google's PLD accountant, independent of
    Opacus. ``PrivacyError`` when the history is beyond what PLD computes in memory."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    history = tuple(merged_history(events))
    if not history:
        return 0.0
    with _quiet_dp_accounting():
        try:
            bound = _rdp_bound(history, delta)
        except (ValueError, ArithmeticError) as err:
            raise PrivacyError(f"no accountant composes these values ({err})") from None
        if not bound <= PLD_MAX_EPSILON:  # NaN included
            raise PrivacyError(
                f"epsilon beyond what the auditor recomputes (RDP bound {bound:.4g} > "
                f"{PLD_MAX_EPSILON:g})"
            )
        try:
            return _pld_epsilon(history, delta)
        except (ValueError, ArithmeticError) as err:
            raise PrivacyError(f"no accountant composes these values ({err})") from None


def recompute_filter_epsilon(events: Sequence[SubsampledGaussianEvent], delta: float) -> float:
    """What the adaptive RDP filter certifies for ``events``, by dp_accounting's RDP
    accountant (independent of Opacus): RDP at the fixed FILTER_ORDERS composed, each
    converted at delta / K, the smallest taken. At integer orders the two agree to
    rounding; were a fractional order added to FILTER_ORDERS, dp_accounting's looser
    bound there (it sums the binomial series' terms' absolute values) could make this a
    little higher than the site's number at large epsilons, never lower."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    reference = _FilterReference()
    accountant = reference.fresh()
    with _quiet_dp_accounting():
        try:
            for sigma, q, steps in merged_history(events):
                reference.compose(accountant, sigma, q, steps)
            return reference.epsilon(accountant, delta)
        except _NotRecomputable as err:
            raise PrivacyError(str(err)) from None


class _FilterReference:
    """One dp_accounting RDP accountant per budget scope, fed in ledger order: the
    lifetime epsilon of every entry without composing the ledger again per entry."""

    def __init__(self) -> None:
        self._dp = _dp_accounting()
        self._seen: list[LedgerEntry] = []
        self._scopes: dict[str, RdpAccountant | str] = {}  # str: why it broke

    def fresh(self) -> RdpAccountant:
        from dp_accounting.rdp import RdpAccountant

        return RdpAccountant(orders=FILTER_ORDERS)

    def compose(self, accountant: RdpAccountant, sigma: float, q: float, steps: int) -> None:
        if steps == 0:
            return
        try:
            accountant.compose(_event(self._dp, sigma, q, steps))
        except (ValueError, TypeError, ArithmeticError) as err:
            raise _NotRecomputable(f"the RDP accountant cannot compose it ({err})") from None

    def epsilon(self, accountant: RdpAccountant, delta: float) -> float:
        try:
            value = float(accountant.get_epsilon(delta / len(FILTER_ORDERS)))
        except (ValueError, ArithmeticError) as err:
            raise _NotRecomputable(f"the RDP accountant gives no epsilon ({err})") from None
        if math.isnan(value):
            raise _NotRecomputable("the RDP accountant gives no epsilon (NaN)")
        return value

    def _feed(self, scope: str, entry: LedgerEntry) -> None:
        state = self._scopes[scope]
        if isinstance(state, str):
            return
        try:
            self.compose(state, entry.noise_multiplier, entry.sample_rate, entry.steps)
        except _NotRecomputable as err:
            self._scopes[scope] = str(err)

    @staticmethod
    def _charges(entry: LedgerEntry, scope: str) -> bool:
        return charges(entry, scope)

    def add(self, entry: LedgerEntry) -> None:
        self._seen.append(entry)
        for scope in self._scopes:
            if self._charges(entry, scope):
                self._feed(scope, entry)

    def lifetime(self, entry: LedgerEntry) -> float:
        """The filter's epsilon over everything added so far that is charged to the
        entry's scope (``charged_to``), at the entry's delta."""
        scope = entry.budget_scope
        if scope not in self._scopes:
            self._scopes[scope] = self.fresh()
            for earlier in self._seen:
                if self._charges(earlier, scope):
                    self._feed(scope, earlier)
        state = self._scopes[scope]
        if isinstance(state, str):
            raise _NotRecomputable(state)
        return self.epsilon(state, entry.delta)


def _epsilon_finding(
    number: int, kind: str, recorded: float, reference: float, tolerance: float, accountant: str
) -> Finding | None:
    """Above PRV_MAX_EPSILON the writer records an RDP upper bound of a PRV epsilon:
    there only too low is wrong. The lifetime filter's number is RDP on both sides."""
    if not math.isfinite(reference):
        wrong = True
    else:
        slack = tolerance * reference + ABSOLUTE_SLACK
        if kind != "epsilon-lifetime" and recorded > PRV_MAX_EPSILON:
            wrong = recorded < reference - slack
        else:
            wrong = abs(recorded - reference) > slack
    if not wrong:
        return None
    return Finding(
        number,
        kind,
        f"line {number}: recorded {kind.replace('-', '_')} {recorded:.6g} but the "
        f"independent {accountant} accountant gives {reference:.6g} "
        f"(tolerance {tolerance:.0%})",
    )


def _plan_of(entry: LedgerEntry) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in PLAN_FIELDS}


def _plan_findings(numbered: list[tuple[int, LedgerEntry]]) -> list[Finding]:
    """Schema 2 freezes a run's plan at its first entry; a run never runs more rounds
    than it planned; a run never mixes schemas."""
    findings: list[Finding] = []
    first: dict[str, LedgerEntry] = {}
    count: dict[str, int] = {}
    for number, entry in numbered:
        start = first.setdefault(entry.run_id, entry)
        count[entry.run_id] = count.get(entry.run_id, 0) + 1
        if entry.schema != start.schema:
            findings.append(
                Finding(
                    number,
                    "plan",
                    f"line {number}: run {entry.run_id!r} began as schema {start.schema} and "
                    f"continues as schema {entry.schema}",
                )
            )
            continue
        if entry.schema < 2:
            continue
        was, now = _plan_of(start), _plan_of(entry)
        changed = [f"{n} {now[n]!r} (was {was[n]!r})" for n in PLAN_FIELDS if was[n] != now[n]]
        if changed:
            findings.append(
                Finding(
                    number,
                    "plan",
                    f"line {number}: run {entry.run_id!r} changed its frozen plan: "
                    + ", ".join(changed),
                )
            )
        planned = start.rounds
        if planned is not None and count[entry.run_id] > planned:
            findings.append(
                Finding(
                    number,
                    "plan",
                    f"line {number}: run {entry.run_id!r} has {count[entry.run_id]} entries but "
                    f"planned {planned} rounds",
                )
            )
    return findings


def _epsilon_findings(numbered: list[tuple[int, LedgerEntry]], tolerance: float) -> list[Finding]:
    findings: list[Finding] = []
    lifetime = _FilterReference()
    for index, (number, entry) in enumerate(numbered):
        upto = [e for _, e in numbered[: index + 1]]
        lifetime.add(entry)
        run_events = [e.event for e in upto if e.run_id == entry.run_id]
        if entry.schema == 1:
            assert entry.epsilon_dataset is not None
            dataset_events = [e.event for e in upto if e.dataset == entry.dataset]
            checks = [
                ("epsilon-run", entry.epsilon_run, run_events),
                ("epsilon-dataset", entry.epsilon_dataset, dataset_events),
            ]
        else:
            checks = [("epsilon-run", entry.epsilon_run, run_events)]
        for kind, recorded, events in checks:
            try:
                reference = recompute_epsilon(events, entry.delta)
            except PrivacyError as err:  # absurd values: report them
                findings.append(
                    Finding(number, kind, f"line {number}: cannot recompute epsilon ({err})")
                )
                continue
            finding = _epsilon_finding(number, kind, recorded, reference, tolerance, "PLD")
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
                        f"{entry.dataset[:12]}... exceeds its per-data-set budget "
                        f"{entry.budget:g}",
                    )
                )
        if entry.schema == 1:
            continue
        try:
            reference = lifetime.lifetime(entry)
        except _NotRecomputable as err:
            findings.append(
                Finding(
                    number,
                    "epsilon-lifetime",
                    f"line {number}: cannot recompute the lifetime epsilon of scope "
                    f"{entry.budget_scope!r} ({err})",
                )
            )
            continue
        recorded = entry.spent
        finding = _epsilon_finding(
            number, "epsilon-lifetime", recorded, reference, tolerance, "RDP filter"
        )
        if finding is not None:
            findings.append(finding)
        spent = max(recorded, reference)
        if not spent <= entry.budget * (1 + OVERSPEND_SLACK):
            findings.append(
                Finding(
                    number,
                    "overspend",
                    f"line {number}: lifetime epsilon {spent:.6g} of scope "
                    f"{entry.budget_scope!r} (the adaptive filter over every round charged "
                    f"to it, recomputed with dp_accounting's RDP accountant) exceeds its "
                    f"budget {entry.budget:g}",
                )
            )
    return findings


def verify_ledger(
    path: Path,
    public_key: Ed25519PublicKey | None = None,
    *,
    tolerance: float = 0.02,
    missing_ok: bool = False,
) -> tuple[list[LedgerEntry], list[Finding]]:
    """Audit a ledger: parse, schema, signatures, hash chain, order, one site, frozen
    plans, every claimed epsilon re-derived independently, and no spend above the
    recorded budget (``missing_ok``: an absent file is an empty ledger). Bad content
    gives findings, never raises."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise LedgerError(f"tolerance must be a non-negative number, got {tolerance}")
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        if not missing_ok:
            return [], [Finding(None, "parse", f"{path}: cannot read the ledger ({err})")]
        data = b""
    except OSError as err:
        return [], [Finding(None, "parse", f"{path}: cannot read the ledger ({err})")]
    try:
        numbered, findings = parse_ledger(data, path)
    except RecursionError:
        return [], [Finding(None, "parse", f"{path}: a line is nested too deeply to read")]

    if public_key is None:
        findings.append(Finding(None, "no-key", "no public key given: signatures not checked"))
    else:
        for number, entry in numbered:
            try:
                signature = base64.b64decode(entry.signature, validate=True)
                public_key.verify(signature, entry.signed_bytes())
            except (binascii.Error, InvalidSignature, ValueError):
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

    findings.extend(_plan_findings(numbered))
    findings.extend(_epsilon_findings(numbered, tolerance))
    findings.sort(key=lambda f: f.entry if f.entry is not None else 0)
    return [entry for _, entry in numbered], findings


# ---- a federation's ledgers ---------------------------------------------------------


@dataclass(frozen=True)
class LedgerAudit:
    """One ledger's audit: ``site`` is whose it is (from its entries, else the state
    folder's marker, else its key's fingerprint as the coordinator recorded it) and
    ``identity`` the fingerprint of the key its signatures were checked with."""

    path: Path
    key: Path | None
    entries: list[LedgerEntry]
    findings: list[Finding]
    site: str | None = None
    identity: str | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            "ledger": str(self.path),
            "key": str(self.key) if self.key else None,
            "identity": self.identity,
            "site": self.site,
            "entries": len(self.entries),
            "ok": self.ok,
            "findings": [_finding_json(f) for f in self.findings],
        }


@dataclass(frozen=True)
class FederationAudit:
    """Every ledger's audit, and the findings that belong to no ledger file (a site the
    coordinator saw train with DP whose ledger is missing; registry conflicts)."""

    ledgers: list[LedgerAudit]
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings and all(a.ok for a in self.ledgers)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "ledgers": [a.to_json() for a in self.ledgers],
            "findings": [_finding_json(f) for f in self.findings],
        }


def _finding_json(f: Finding) -> dict[str, Any]:
    return {"entry": f.entry, "kind": f.kind, "message": f.message}


def find_ledgers(paths: list[Path], *, states: bool = False) -> list[Path]:
    """Ledger files named directly, or every ledger.jsonl below a folder (a run dir).
    With ``states``, also the ledger path of every site state folder below a folder
    (one with its ``site-state.json`` marker) that holds no ledger file: a site that
    was never charged, or whose ledger was deleted (the audit tells which)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            below = set(path.rglob(LEDGER_FILE))
            if states:
                below |= {m.parent / LEDGER_FILE for m in path.rglob(MARKER_FILE)}
            found.extend(sorted(below))
        else:
            found.append(path)
    return found


def _match_heads(
    entries: list[LedgerEntry], seen: list[tuple[int, str]], site: str | None = None
) -> list[Finding]:
    """Every head the coordinator saw must still be in the ledger: a ledger cut back at
    an entry boundary keeps a valid chain, and only this outside anchor reveals it."""
    hashes = {e.entry_hash() for e in entries}
    whose = f"the ledger of site {site!r}" if site is not None else "the ledger"
    what = f"{whose} is empty or absent" if not entries else f"it is missing from {whose}"
    return [
        Finding(
            None,
            "truncated",
            f"the coordinator saw ledger head {head[:16]}... after "
            f"round {rnd}; {what} (entries removed?)",
        )
        for rnd, head in seen
        if head not in hashes
    ]


def _marker(path: Path) -> dict[str, Any]:
    """The state folder's marker beside a ledger (``site-state.json``), if readable."""
    try:
        raw = json.loads((path.parent / MARKER_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _default_key(path: Path) -> Path | None:
    beside = path.parent / PUBLIC_KEY_FILE
    return beside if beside.is_file() else None


def _audit_one(path: Path, key: Path | None) -> LedgerAudit:
    key = key or _default_key(path)
    try:
        public_key = load_public_key(key) if key else None
    except LedgerError as err:
        return LedgerAudit(path, key, [], [Finding(None, "key", str(err))])
    marker = _marker(path)
    # A state folder without a ledger file: nothing recorded (the heads check tells a
    # site never charged from a deleted ledger).
    entries, findings = verify_ledger(path, public_key, missing_ok=bool(marker))
    identity = key_fingerprint(public_key) if public_key is not None else None
    site = entries[0].site_id if entries else None
    marked = marker.get("site_id")
    if isinstance(marked, str):
        if site is None:
            site = marked
        elif marked != site:
            findings.append(
                Finding(
                    None,
                    "site",
                    f"the ledger's entries are site {site!r}'s but {MARKER_FILE} beside it "
                    f"names {marked!r}",
                )
            )
    marked_key = marker.get("identity")
    if isinstance(marked_key, str) and identity is not None and marked_key != identity:
        findings.append(
            Finding(
                None,
                "re-keyed",
                f"the key the signatures were checked with ({identity[:23]}...) is not the "
                f"identity {MARKER_FILE} recorded when the site was created "
                f"({marked_key[:23]}...)",
            )
        )
    return LedgerAudit(path, key, entries, findings, site, identity)


def verify(
    path: Path, key: Path | None = None, heads: dict[str, list[tuple[int, str]]] | None = None
) -> LedgerAudit:
    """Audit one ledger; without ``key`` the site's identity.pub beside it is used; with
    ``heads`` (``RunSummary.ledger_heads``: what the coordinator saw) the ledger must
    contain them all."""
    audit = _audit_one(path, key)
    if heads is not None and audit.site is not None:
        audit.findings.extend(_match_heads(audit.entries, heads.get(audit.site, []), audit.site))
    return audit


def audit_ledgers(
    paths: Sequence[Path],
    *,
    key: Path | None = None,
    summary: RunSummary | None = None,
    registered: Mapping[str, str] | None = None,
) -> FederationAudit:
    """Audit every ledger, and with the coordinator's ``summary`` and/or its registry
    (``registered``: site -> the ledger key fingerprint recorded at registration) also:

    - every site the summary names with DP and a ledger head or a key must be matched to
      one of the ledgers (a deleted ledger is a finding naming the site);
    - every head the coordinator saw must be in the site's ledger, an empty one too;
    - the ledger's key must be the one the site reported (summary) and was registered
      with (registry): a ledger rewritten under a fresh key is "re-keyed".

    A ledger without entries is matched to its site by the state folder's marker beside
    it, else by its key's fingerprint among those the summary recorded."""
    audits = [_audit_one(path, key) for path in paths]
    loose: list[Finding] = []
    identities = summary.site_identities() if summary is not None else {}
    heads = summary.ledger_heads() if summary is not None else {}
    registered = dict(registered or {})
    by_identity: dict[str, list[str]] = {}
    for name, fp in identities.items():
        by_identity.setdefault(fp, []).append(name)

    matched: dict[str, list[LedgerAudit]] = {}
    for index, audit in enumerate(audits):
        site = audit.site
        if site is None and audit.identity is not None:
            names = by_identity.get(audit.identity, [])
            if len(names) == 1:
                site = names[0]
                audit = LedgerAudit(
                    audit.path, audit.key, audit.entries, audit.findings, site, audit.identity
                )
                audits[index] = audit
        if site is None:
            if summary is not None or registered:
                audit.findings.append(
                    Finding(
                        None,
                        "site",
                        "cannot tell whose ledger this is: no entries, no "
                        f"{MARKER_FILE} beside it, and its key is no identity the "
                        "coordinator recorded",
                    )
                )
            continue
        matched.setdefault(site, []).append(audit)
        if summary is not None:
            audit.findings.extend(_match_heads(audit.entries, heads.get(site, []), site))
        expected = identities.get(site)
        if expected is not None:
            if audit.identity is None:
                audit.findings.append(
                    Finding(
                        None,
                        "re-keyed",
                        f"site {site!r} reported ledger key {expected[:23]}... to the "
                        "coordinator, but no key was found to check this ledger with",
                    )
                )
            elif audit.identity != expected:
                audit.findings.append(
                    Finding(
                        None,
                        "re-keyed",
                        f"the ledger of site {site!r} is checked with key "
                        f"{audit.identity[:23]}..., but the site reported key "
                        f"{expected[:23]}... to the coordinator (rewritten under a new key?)",
                    )
                )
        recorded = registered.get(site)
        if recorded is not None and audit.identity is not None and audit.identity != recorded:
            audit.findings.append(
                Finding(
                    None,
                    "re-keyed",
                    f"the ledger of site {site!r} is checked with key "
                    f"{audit.identity[:23]}..., but the coordinator registered ledger key "
                    f"{recorded[:23]}... for it",
                )
            )

    for site, several in matched.items():
        if len(several) > 1:
            loose.append(
                Finding(
                    None,
                    "site",
                    f"site {site!r} has {len(several)} ledgers: "
                    + ", ".join(str(a.path) for a in several),
                )
            )

    if summary is not None:
        declared = [(s.site, s.dp, bool(s.ledger_head or s.identity)) for s in summary.sites]
        # A site seen only in a private evaluation has heads but no training summary.
        declared += [(site, True, False) for site in heads if site not in {d[0] for d in declared}]
        for site, dp, anchored in declared:
            if not dp:
                continue
            if not (heads.get(site) or anchored):
                continue
            if site not in matched:
                loose.append(
                    Finding(
                        None,
                        "missing",
                        f"site {site!r} spent privacy in this run (the coordinator "
                        "recorded its ledger heads or key) but none of the ledgers given is "
                        "its ledger (deleted?)",
                    )
                )
    for site, recorded in sorted(registered.items()):
        reported = identities.get(site)
        if reported is not None and reported != recorded:
            loose.append(
                Finding(
                    None,
                    "re-keyed",
                    f"site {site!r} reported ledger key {reported[:23]}... to the "
                    f"coordinator, but registered {recorded[:23]}...",
                )
            )
    return FederationAudit(audits, loose)


def audit_against_summary(
    paths: Sequence[Path],
    summary: RunSummary,
    *,
    key: Path | None = None,
    registered: Mapping[str, str] | None = None,
) -> FederationAudit:
    """``audit_ledgers`` with the coordinator's summary (what ``--summary`` checks)."""
    return audit_ledgers(paths, key=key, summary=summary, registered=registered)


def registered_ledger_keys(path: Path) -> dict[str, str]:
    """Site -> ledger key fingerprint from the coordinator's ``sites.json`` (sites
    registered without ``--ledger-key`` are left out). ``LedgerError`` names a bad file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise LedgerError(f"{path}: unreadable site registry ({err})") from None
    if not isinstance(raw, dict):
        raise LedgerError(f"{path}: unreadable site registry (not a JSON object)")
    keys: dict[str, str] = {}
    for site, record in raw.items():
        if not isinstance(record, dict) or record.get("ledger_key") is None:
            continue
        value = record["ledger_key"]
        if not isinstance(value, str) or not FINGERPRINT.fullmatch(value):
            raise LedgerError(f"{path}: site {site!r} has a malformed ledger_key {value!r}")
        keys[str(site)] = value
    return keys


# ---- what was spent -----------------------------------------------------------------


@dataclass(frozen=True)
class SpendRow:
    """One (site, scope, run): the run's own epsilon and, after its last entry, what
    was spent of the scope's budget. Schema 1 rows are per-data-set budgets."""

    site: str
    schema: int
    scope: str  # "site", "data-set:<name>"; schema 1: "data-set-v1:<fingerprint>"
    dataset: str
    run_id: str
    rounds: int  # trained (entries)
    planned_rounds: int | None
    epsilon_run: float
    spent: float  # schema 2: lifetime epsilon (adaptive filter); schema 1: the data set's
    budget: float
    delta: float

    @property
    def budget_kind(self) -> str:
        return "lifetime" if self.schema >= 2 else "per-data-set"

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget - self.spent)

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "schema": self.schema,
            "scope": self.scope,
            "budget_kind": self.budget_kind,
            "dataset": self.dataset,
            "run": self.run_id,
            "rounds": self.rounds,
            "planned_rounds": self.planned_rounds,
            "epsilon_run": self.epsilon_run,
            "epsilon_lifetime": self.spent if self.schema >= 2 else None,
            "epsilon_dataset": self.spent if self.schema < 2 else None,
            "budget": self.budget,
            "remaining": self.remaining,
            "delta": self.delta,
        }


def spend_rows(entries: list[LedgerEntry]) -> list[SpendRow]:
    """One row per (site, scope, run), in ledger order, with the recorded numbers
    (``verify`` re-derives them): the run's epsilon and what was spent of the scope's
    budget after the run's last entry (every earlier run charged to it included)."""
    rows: dict[tuple[str, str, str], SpendRow] = {}
    for e in entries:
        scope = e.budget_scope if e.schema >= 2 else f"data-set-v1:{e.dataset}"
        key = (e.site_id, scope, e.run_id)
        prior = rows.get(key)
        rows[key] = SpendRow(
            site=e.site_id,
            schema=e.schema,
            scope=scope,
            dataset=e.dataset,
            run_id=e.run_id,
            rounds=(prior.rounds if prior else 0) + 1,
            planned_rounds=e.rounds,
            epsilon_run=e.epsilon_run,
            spent=e.spent,
            budget=e.budget,
            delta=e.delta,
        )
    return list(rows.values())


def report_json(rows: Sequence[SpendRow]) -> dict[str, Any]:
    """``fedsilo audit report --json``: the rows, what each epsilon means, the unit."""
    return {
        "privacy_unit": PRIVACY_UNIT,
        "accountants": {
            "epsilon_run": RUN_EPSILON_NOTE,
            "epsilon_lifetime": LIFETIME_EPSILON_NOTE,
            "epsilon_dataset": SCHEMA1_NOTE,
        },
        "rows": [r.to_json() for r in rows],
    }
