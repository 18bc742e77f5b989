"""What the coordinator keeps of a round and of each site: whatever a reply may declare
(the codec lets through any non-negative finite number) fits the typed summary, so no
site can keep the coordinator from writing it."""

from __future__ import annotations

import math
from pathlib import Path

from common.config import RunConfig
from common.messages import SiteReport
from common.outputs import RunSummary, final_record, read_summary, write_summary
from server.federation import DeclaredSite, RoundTally


def test_odd_but_well_formed_declarations_fit_the_summary(tmp_path: Path) -> None:
    # Prepare: numbers no honest site declares, but the codec accepts.
    odd = SiteReport.of(
        "ok", "", "site-7", epsilon=1e300, delta=5.0, sample_rate=3.0, noise_multiplier=0.0,
        budget=0.0, num_examples=10**12, total_steps=2**40, ledger_head="a" * 64,
    )  # fmt: skip
    no_dp = SiteReport.of("ok", "", "site-8", dp=False, epsilon=math.nan, delta=math.nan)
    cfg = RunConfig()

    # Execute
    sites = tuple(DeclaredSite(r.site, r, rounds_trained=1).summary(cfg) for r in (odd, no_dp))
    silent = DeclaredSite("node-1234", rounds_failed=2).summary(cfg)
    row = RoundTally(round=1, sites_asked=3, trained=2)
    row.note("node-1234", "failed", "site went offline (Flower error 3)")
    record = row.record(accuracy=0.5, loss=0.7, seconds=1.0)
    summary = RunSummary(
        dp=True,
        mode="federated-dp",
        config=cfg.to_user_config(),
        rounds=(record,),
        sites=(*sites, silent),
        final=final_record((record,), (*sites, silent)),
    )

    # Assert: written and read back as declared.
    assert read_summary(write_summary(tmp_path, summary)) == summary
    assert sites[0].delta == 5.0 and sites[0].ledger_head == "a" * 64
    assert sites[1].epsilon is None and sites[1].dp is False
    assert silent.epsilon is None and silent.rounds_failed == 2
    assert summary.final.epsilon_max == 1e300
