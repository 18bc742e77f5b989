"""``fedsilo audit verify`` and ``fedsilo audit report``: a privacy officer's view of
the sites' signed ledgers (common/privacy/audit.py does the checking)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from common.config import ConfigError

audit = typer.Typer(help="Check and report sites' signed privacy ledgers.", no_args_is_help=True)


@audit.command("verify")
def audit_verify(
    ledgers: Annotated[list[str], typer.Argument(help="ledger.jsonl files or run folders")],
    key: Annotated[
        str | None,
        typer.Option(help="the site's public key (default: identity.pub beside the ledger)"),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    summary: Annotated[
        str | None,
        typer.Option(
            help="the coordinator's summary.json: every ledger head it saw must be in the ledger"
        ),
    ] = None,
) -> None:
    """Hash chain, signatures, round order, epsilons recomputed independently (Google's
    PLD accountant), overspend, and (with --summary) entries removed from the end.
    Exit 0 when everything holds, 1 otherwise."""
    import json
    from pathlib import Path

    from common.outputs import read_summary
    from common.privacy.audit import find_ledgers, verify

    paths = find_ledgers([Path(p) for p in ledgers])
    if not paths:
        raise ConfigError(f"no ledger found in {', '.join(ledgers)}")
    heads = read_summary(Path(summary)).ledger_heads() if summary else None
    results = [verify(p, Path(key) if key else None, heads) for p in paths]
    if json_out:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        for r in results:
            if r.ok:
                last = r.entries[-1] if r.entries else None
                spent = (
                    f"epsilon {last.epsilon_dataset:.3f} of {last.budget:g}" if last else "empty"
                )
                print(
                    f"{r.path}: OK ({len(r.entries)} entries, site {last.site_id if last else '-'}, {spent})"
                )
            for f in r.findings:
                where = f"entry {f.entry}" if f.entry is not None else "ledger"
                print(f"{r.path}: {where}: {f.kind}: {f.message}")
    raise typer.Exit(0 if all(r.ok for r in results) else 1)


@audit.command("report")
def audit_report(
    ledgers: Annotated[list[str], typer.Argument(help="ledger.jsonl files or run folders")],
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    plot: Annotated[
        str | None, typer.Option(help="write a PNG of epsilon against the budget")
    ] = None,
) -> None:
    """Per site, data set and run: epsilon spent, budget, remaining."""
    import json
    from pathlib import Path

    from rich.table import Table

    from common.privacy.audit import find_ledgers, spend_rows
    from common.privacy.ledger import read_ledger

    paths = find_ledgers([Path(p) for p in ledgers])
    if not paths:
        raise ConfigError(f"no ledger found in {', '.join(ledgers)}")
    series = {p: read_ledger(p) for p in paths}
    rows = [row for entries in series.values() for row in spend_rows(entries)]
    if json_out:
        print(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        table = Table(title="privacy spent (epsilon, from the sites' ledgers)")
        for col in (
            "site",
            "data set",
            "run",
            "rounds",
            "eps run",
            "eps data set",
            "budget",
            "remaining",
        ):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(
                r.site,
                r.dataset[:12],
                r.run_id[:16],
                str(r.rounds),
                f"{r.epsilon_run:.3f}",
                f"{r.epsilon_dataset:.3f}",
                f"{r.budget:g}",
                f"{r.remaining:.3f}",
            )
        Console(width=max(120, Console().width)).print(table)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for entries in series.values():
            if entries:
                ax.plot(
                    range(1, len(entries) + 1),
                    [e.epsilon_dataset for e in entries],
                    marker="o",
                    ms=2,
                    lw=1,
                    label=entries[0].site_id,
                )
        for budget in sorted({e.budget for entries in series.values() for e in entries}):
            ax.axhline(budget, color="red", ls="--", lw=1)
        ax.set_xlabel("ledger entry (trained round)")
        ax.set_ylabel("epsilon spent on the data set")
        if len(series) <= 12:
            ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
        if not json_out:
            print(f"plot written to {plot}")
