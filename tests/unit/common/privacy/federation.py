"""A small federation to audit: sites' state folders with their ledgers, and the
summary.json the coordinator would have written of their run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.outputs import LedgerHead, RoundRecord, RunSummary, SiteSummary, final_record
from common.privacy.identity import SiteIdentity, init_state
from common.privacy.ledger import LEDGER_FILE, Ledger, read_ledger
from tests.support.runs import SMALL_RUN
from tests.unit.common.privacy.ledgers import DELTA, append

SITES = ("site-1", "site-2")


@dataclass(frozen=True)
class Site:
    name: str
    state: Path
    identity: SiteIdentity

    @property
    def ledger(self) -> Path:
        return self.state / LEDGER_FILE


def site_state(root: Path, name: str) -> Site:
    """A site's state folder (``fedsilo site init``'s keys and marker) whose ledger
    holds two rounds of one run."""
    state = root / name
    keys = init_state(state, site_id=name)
    ledger = Ledger(state / LEDGER_FILE, keys.identity)
    for rnd in (1, 2):
        append(ledger, "run-a", rnd, site_id=name)
    return Site(name, state, keys.identity)


def run_summary(sites: list[Site]) -> RunSummary:
    """What the coordinator recorded of a two-round run of ``sites``."""
    ledgers = {s.name: read_ledger(s.ledger) for s in sites}
    rounds = tuple(
        RoundRecord(
            round=r,
            sites_asked=len(sites),
            trained=len(sites),
            accuracy=0.5,
            loss=0.7,
            ledger_heads={
                name: LedgerHead(
                    hash=entries[r - 1].entry_hash(),
                    signature=entries[r - 1].signature,
                    epsilon=entries[r - 1].epsilon_run,
                )
                for name, entries in ledgers.items()
            },
        )
        for r in (1, 2)
    )
    summaries = tuple(
        SiteSummary(
            site=s.name,
            num_examples=1000,
            epsilon=ledgers[s.name][-1].epsilon_run,
            delta=DELTA,
            budget=ledgers[s.name][-1].budget,
            lifetime_epsilon=ledgers[s.name][-1].spent,
            identity=s.identity.fingerprint(),
            rounds_trained=2,
            ledger_head=ledgers[s.name][-1].entry_hash(),
        )
        for s in sites
    )
    return RunSummary(
        dp=True,
        mode="federated-dp",
        config={**SMALL_RUN},
        rounds=rounds,
        sites=summaries,
        final=final_record(rounds, summaries),
    )
