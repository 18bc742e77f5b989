"""A realistic ledger to test against: what the ledger, audit and budget tests share."""

from __future__ import annotations

import base64
from dataclasses import replace
from functools import cache
from pathlib import Path

from common.privacy.accounting import compute_epsilon
from common.privacy.events import SubsampledGaussianEvent
from common.privacy.identity import SiteIdentity
from common.privacy.ledger import Finding, Ledger, LedgerEntry, dataset_fingerprint

DELTA = 1e-5
EVENT = SubsampledGaussianEvent(1.5, 0.25, 4)
DATASET = dataset_fingerprint(["good film", "bad film"], [1, 0])
SITE = "site-1"
# (run_id, round) of the clean ledger: two runs on one data set.
PLAN = [("run-a", 1), ("run-a", 2), ("run-a", 3), ("run-b", 1), ("run-b", 2)]


@cache
def prv_epsilon(rounds: int) -> float:
    """Opacus PRV, as a site computes it, for ``rounds`` rounds of EVENT."""
    return compute_epsilon([EVENT] * rounds, DELTA)


def stamp(second: int) -> str:
    return f"2025-01-01T00:00:{second:02d}.000000+00:00"


def append(ledger: Ledger, run_id: str, rnd: int, *, dataset_rounds: int, **kw: object) -> None:
    run_rounds = sum(1 for e in ledger.entries() if e.run_id == run_id) + 1
    values: dict[str, object] = {
        "site_id": SITE,
        "dataset": DATASET,
        "run_id": run_id,
        "round": rnd,
        "event": EVENT,
        "clip_norm": 1.0,
        "delta": DELTA,
        "epsilon_run": prv_epsilon(run_rounds),
        "epsilon_dataset": prv_epsilon(dataset_rounds),
        "budget": 8.0,
        "code_version": "test",
        "time": stamp(dataset_rounds),
    }
    values.update(kw)
    ledger.append(**values)  # type: ignore[arg-type]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write_lines(path: Path, content: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in content))


def forge(entry: LedgerEntry, signer: SiteIdentity, **changes: object) -> LedgerEntry:
    """An entry changed and then validly signed by ``signer``."""
    changed = replace(entry, **changes)  # type: ignore[arg-type]
    signature = base64.b64encode(signer.sign(changed.signed_bytes())).decode()
    return replace(changed, signature=signature)


def kinds(findings: list[Finding]) -> set[str]:
    return {f.kind for f in findings}
