"""What a privacy officer asks of ledgers, without trusting the coordinator.

``verify`` checks each ledger (chain, signatures, order, epsilons recomputed with an
accountant independent of the one that wrote them, overspend); ``report`` says per
site, data set and run how much epsilon was spent of which budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.privacy.ledger import (
    Finding,
    LedgerEntry,
    LedgerError,
    load_public_key,
    verify_ledger,
)

LEDGER_NAME = "ledger.jsonl"
PUBLIC_KEY_NAME = "identity.pub"


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
            found.extend(sorted(path.rglob(LEDGER_NAME)))
        else:
            found.append(path)
    return found


def coordinator_heads(summary: dict[str, Any]) -> dict[str, list[tuple[int, str]]]:
    """Per site, the (round, ledger head) pairs the coordinator recorded in summary.json."""
    heads: dict[str, list[tuple[int, str]]] = {}
    for row in summary.get("rounds", []):
        for site, head in row.get("ledger_heads", {}).items():
            heads.setdefault(site, []).append((int(row["round"]), str(head["hash"])))
    return heads


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
    ``heads`` (from the coordinator's summary.json) the ledger must contain them all."""
    key = key or (
        path.parent / PUBLIC_KEY_NAME if (path.parent / PUBLIC_KEY_NAME).is_file() else None
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
