"""A realistic ledger to test against: what the ledger, audit and budget tests share.

``append`` writes schema 2 entries as a site does: the run's PRV epsilon over the run's
entries, and the lifetime epsilon of the adaptive filter (``filter_epsilon``) over every
entry charged to the entry's scope. ``append_v1`` writes a schema 1 entry (ledgers
from before lifetime budgets), signed and chained.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from functools import cache
from pathlib import Path

from common.privacy.accounting import compute_epsilon, filter_epsilon
from common.privacy.events import SubsampledGaussianEvent
from common.privacy.identity import SiteIdentity
from common.privacy.ledger import (
    ACCOUNTANT_V1,
    SITE_SCOPE,
    ZERO_HASH,
    Finding,
    Ledger,
    LedgerEntry,
    charged_to,
    dataset_fingerprint,
    read_ledger,
    row_digest,
)

DELTA = 1e-5
EVENT = SubsampledGaussianEvent(1.5, 0.25, 4)
FINGERPRINT_KEY = bytes(range(32))  # the site's secret fingerprint key, in tests
DATASET = dataset_fingerprint(FINGERPRINT_KEY, row_digest(["good film", "bad film"], [1, 0]))
SITE = "site-1"
# (run_id, round) of the clean ledger: two runs on one data set.
PLAN = [("run-a", 1), ("run-a", 2), ("run-a", 3), ("run-b", 1), ("run-b", 2)]
ROUNDS = 3  # every run of the clean ledger plans three rounds
PUBLIC_SIZE = 1000
TARGET = 4.0  # the runs' target epsilon
BUDGET = 8.0  # the site's lifetime budget


@cache
def prv_epsilon(rounds: int) -> float:
    """Opacus PRV, as a site computes it, for ``rounds`` rounds of EVENT."""
    return compute_epsilon([EVENT] * rounds, DELTA)


@cache
def lifetime_epsilon(rounds: int) -> float:
    """The adaptive filter's epsilon, as a site computes it, for ``rounds`` rounds of
    EVENT charged to one scope."""
    return filter_epsilon([EVENT] * rounds, DELTA)


def stamp(second: int) -> str:
    return f"2025-01-01T00:00:{second:02d}.000000+00:00"


def append(
    ledger: Ledger,
    run_id: str,
    rnd: int,
    *,
    dataset_rounds: int | None = None,
    **kw: object,
) -> LedgerEntry:
    """Append a realistic schema 2 entry; ``kw`` overrides any argument of
    ``Ledger.append`` (epsilons not given are computed from the ledger so far, with
    the event, delta and scope given). ``dataset_rounds`` only sets the entry's time
    (second ``dataset_rounds``); by default it is the entry's position."""
    existing = ledger.entries()
    event = kw.get("event", EVENT)
    delta = kw.get("delta", DELTA)
    scope = kw.get("scope", SITE_SCOPE)
    assert isinstance(event, SubsampledGaussianEvent)
    assert isinstance(delta, float) and isinstance(scope, str)
    run = [e.event for e in existing if e.run_id == run_id]
    charged = [e.event for e in charged_to(existing, scope)]
    values: dict[str, object] = {
        "site_id": SITE,
        "dataset": DATASET,
        "run_id": run_id,
        "round": rnd,
        "event": event,
        "clip_norm": 1.0,
        "delta": delta,
        "rounds": ROUNDS,
        "public_size": PUBLIC_SIZE,
        "epsilon_target": TARGET,
        "budget": BUDGET,
        "scope": scope,
        "code_version": "test",
        "time": stamp(dataset_rounds if dataset_rounds is not None else len(existing) + 1),
    }
    values.update(kw)
    if "epsilon_run" not in kw:
        values["epsilon_run"] = compute_epsilon([*run, event], delta)
    if "epsilon_lifetime" not in kw:
        values["epsilon_lifetime"] = filter_epsilon([*charged, event], delta)
    return ledger.append(**values)  # type: ignore[arg-type]


def append_v1(
    path: Path,
    signer: SiteIdentity,
    run_id: str,
    rnd: int,
    *,
    dataset: str = "a" * 64,
    **changes: object,
) -> LedgerEntry:
    """Append a schema 1 entry (a per-data-set budget, PRV epsilons), signed by
    ``signer`` and chained onto the file's last entry, as an older fedsilo wrote it."""
    existing = read_ledger(path, missing_ok=True)
    run = [e.event for e in existing if e.run_id == run_id]
    on_dataset = [e.event for e in existing if e.dataset == dataset]
    entry = LedgerEntry(
        schema=1,
        site_id=SITE,
        dataset=dataset,
        run_id=run_id,
        round=rnd,
        noise_multiplier=EVENT.noise_multiplier,
        sample_rate=EVENT.sample_rate,
        steps=EVENT.steps,
        clip_norm=1.0,
        delta=DELTA,
        accountant=ACCOUNTANT_V1,
        epsilon_run=compute_epsilon([*run, EVENT], DELTA),
        epsilon_dataset=compute_epsilon([*on_dataset, EVENT], DELTA),
        budget=BUDGET,
        code_version="test-v1",
        time=stamp(len(existing) + 1),
        prev_hash=existing[-1].entry_hash() if existing else ZERO_HASH,
        signature="",
    )
    entry = forge(entry, signer, **changes)
    with path.open("a") as handle:
        handle.write(entry.to_line() + "\n")
    return entry


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
