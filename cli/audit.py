"""``fedsilo audit verify``, ``report`` and ``fingerprint``: a privacy officer's view of
the sites' signed ledgers (common/privacy/audit.py does the checking); and ``empirical``:
a lower bound on epsilon measured from one run of the real code
(simulations/empirical_audit.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from common.config import ConfigError

if TYPE_CHECKING:
    from common.privacy.audit import LedgerAudit
    from common.privacy.ledger import Finding

audit = typer.Typer(help="Check and report sites' signed privacy ledgers.", no_args_is_help=True)


def _ledger_paths(ledgers: list[str], *, states: bool = False) -> list[Path]:
    from common.privacy.audit import find_ledgers

    paths = find_ledgers([Path(p) for p in ledgers], states=states)
    if not paths:
        raise ConfigError(f"no ledger found in {', '.join(ledgers)}")
    return paths


def _ok_line(r: LedgerAudit) -> str:
    """The ledger's entry count and, per budget scope, the last recorded spend."""
    last = {}
    for e in r.entries:
        last[e.budget_scope if e.schema >= 2 else f"data set {e.dataset[:12]}"] = e
    if not last:
        spent = "empty"
    else:
        spent = ", ".join(
            f"lifetime epsilon {e.spent:.3f} of {e.budget:g} ({scope})"
            if e.schema >= 2
            else f"epsilon {e.spent:.3f} of {e.budget:g} ({scope}, schema 1)"
            for scope, e in last.items()
        )
    return f"{r.path}: OK ({len(r.entries)} entries, site {r.site or '-'}, {spent})"


def _finding_line(prefix: object, f: Finding) -> str:
    where = f"entry {f.entry}" if f.entry is not None else "ledger"
    return f"{prefix}: {where}: {f.kind}: {f.message}"


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
            help="the coordinator's summary.json: every site it saw train with DP must have "
            "its ledger here, with every head the coordinator saw and the key it reported"
        ),
    ] = None,
    sites: Annotated[
        str | None,
        typer.Option(
            help="the coordinator's sites.json: each ledger's key must be the ledger key "
            "registered for its site"
        ),
    ] = None,
) -> None:
    """Hash chain, signatures, round order, frozen run plans, epsilons recomputed
    independently of the sites' accountant (Google's PLD for a run, its RDP accountant
    for the lifetime filter), overspend, and (with --summary / --sites) missing ledgers,
    entries removed from the end and re-keyed ledgers. Exit 0 when everything holds,
    1 otherwise."""
    import json

    from common.outputs import read_summary
    from common.privacy.audit import audit_ledgers, registered_ledger_keys

    paths = _ledger_paths(ledgers, states=True)
    result = audit_ledgers(
        paths,
        key=Path(key) if key else None,
        summary=read_summary(Path(summary)) if summary else None,
        registered=registered_ledger_keys(Path(sites)) if sites else None,
    )
    if json_out:
        print(json.dumps(result.to_json(), indent=2))
    else:
        for r in result.ledgers:
            if r.ok:
                print(_ok_line(r))
            for f in r.findings:
                print(_finding_line(r.path, f))
        origin = summary or sites
        for f in result.findings:
            print(_finding_line(origin, f))
    raise typer.Exit(0 if result.ok else 1)


@audit.command("report")
def audit_report(
    ledgers: Annotated[list[str], typer.Argument(help="ledger.jsonl files or run folders")],
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    plot: Annotated[
        str | None, typer.Option(help="write a PNG of epsilon against the budget")
    ] = None,
) -> None:
    """Per site, budget scope and run: rounds, the run's epsilon (PRV, its fixed plan),
    the lifetime epsilon the adaptive filter certifies, the lifetime budget, what
    remains; and the unit of privacy all of it is about."""
    import json

    from rich.table import Table

    from common.privacy.audit import (
        EVAL_SCOPE_NOTE,
        LIFETIME_EPSILON_NOTE,
        PRIVACY_UNIT,
        RUN_EPSILON_NOTE,
        SCHEMA1_NOTE,
        report_json,
        spend_rows,
    )
    from common.privacy.ledger import EVAL_SCOPE, read_ledger

    paths = _ledger_paths(ledgers)
    series = {p: read_ledger(p) for p in paths}
    rows = [row for entries in series.values() for row in spend_rows(entries)]
    if json_out:
        print(json.dumps(report_json(rows), indent=2))
    else:
        table = Table(title="privacy spent (epsilon, as the sites' ledgers record it)")
        for col in (
            "site",
            "scope",
            "run",
            "rounds",
            "run eps (PRV)",
            "lifetime eps (filter)",
            "budget",
            "remaining",
        ):
            table.add_column(col, justify="right")
        for r in rows:
            if r.schema >= 2:
                scope = r.scope
                rounds = f"{r.rounds}/{r.planned_rounds}"
                budget = f"{r.budget:g} lifetime"
            else:
                scope = f"data set {r.dataset[:12]} (schema 1)"
                rounds = str(r.rounds)
                budget = f"{r.budget:g} per data set"
            table.add_row(
                r.site,
                scope,
                r.run_id[:16],
                rounds,
                f"{r.epsilon_run:.3f}",
                f"{r.spent:.3f}",
                budget,
                f"{r.remaining:.3f}",
            )
        console = Console(width=max(120, Console().width))
        console.print(table)
        notes = [RUN_EPSILON_NOTE, LIFETIME_EPSILON_NOTE]
        if any(r.schema < 2 for r in rows):
            notes.append(SCHEMA1_NOTE + " (shown in the lifetime column)")
        if any(r.scope == EVAL_SCOPE for r in rows):
            notes.append(EVAL_SCOPE_NOTE)
        notes.append(f"privacy unit: {PRIVACY_UNIT}")
        for note in notes:
            print(note)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for entries in series.values():
            if entries:
                ax.plot(
                    range(1, len(entries) + 1),
                    [e.spent for e in entries],
                    marker="o",
                    ms=2,
                    lw=1,
                    label=entries[0].site_id,
                )
        for limit in sorted({e.budget for entries in series.values() for e in entries}):
            ax.axhline(limit, color="red", ls="--", lw=1)
        ax.set_xlabel("ledger entry (charged round)")
        ax.set_ylabel("lifetime epsilon spent (adaptive filter)")
        if len(series) <= 12:
            ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
        if not json_out:
            print(f"plot written to {plot}")


@audit.command("fingerprint")
def audit_fingerprint(
    datafile: Annotated[Path, typer.Argument(help="the data file to fingerprint")],
    state: Annotated[
        Path,
        typer.Option(help="the site's state folder (its secret fingerprint.key is read)"),
    ],
) -> None:
    """The fingerprint a deployed site's ledger records for DATAFILE (the ``dataset``
    field): an HMAC of the file's bytes with the site's secret fingerprint key, so
    only someone given that key can check which file a round was spent on."""
    from common.privacy.identity import load_fingerprint_key
    from common.privacy.ledger import dataset_fingerprint, file_digest

    key = load_fingerprint_key(state)
    try:
        digest = file_digest(datafile)
    except OSError as err:
        raise ConfigError(f"{datafile}: cannot read the data file ({err.strerror})") from None
    print(dataset_fingerprint(key, digest))


@audit.command("empirical")
def audit_empirical(
    scenario: Annotated[
        str | None, typer.Option(help="scenario TOML file or bundled name (default: defaults)")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="any run-config key, e.g. --set epsilon=2"),
    ] = None,
    canaries: Annotated[int, typer.Option(help="number of canaries (m)")] = 1000,
    mode: Annotated[
        str,
        typer.Option(
            help="whitebox (every step of the site's DP-SGD), pipeline (the coordinator's "
            "decoded secure sum) or blackbox (the final model only; weak bounds)"
        ),
    ] = "whitebox",
    break_: Annotated[
        list[str] | None,
        typer.Option(
            "--break",
            help="run a deliberately broken mechanism to see the audit catch it: "
            "noise=FACTOR (noise scaled) or sample-rate=FACTOR (sampling FACTOR times the "
            "rate the accountant is told); local to this command only",
        ),
    ] = None,
    epsilon: Annotated[
        str | None, typer.Option(help="comma-separated epsilons to audit one by one (a sweep)")
    ] = None,
    site: Annotated[int, typer.Option(help="the simulated site to audit")] = 0,
    seed: Annotated[
        int | None,
        typer.Option(min=0, help="coins, canaries, sampling, noise and rounding (default: fresh)"),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="output folder (default runs/audit-<timestamp>)")
    ] = None,
) -> None:
    """Insert canaries by secret coins into one simulated site, train its whole schedule
    once with the real code, guess the coins, and print the epsilon that the guesses
    certify (Steinke et al. 2023 and the tighter f-DP bound, 95% confidence) beside
    the accountant's claim; writes audit.json and audit.png. Exit 1 when the Steinke
    bound, valid for every DP mechanism, is above the claim (the code leaks more than
    the accountant says; each audit of a sweep is a 5% false alarm on its own)."""
    import warnings
    from datetime import datetime

    from cli.options import parse_set
    from simulations.empirical_audit import MODES, Breaks, run_audits
    from simulations.runner import check_options, load_scenario
    from simulations.sweep_results import parse_epsilons

    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    options = load_scenario(scenario) if scenario else {}
    options.update(parse_set(set_ or []))
    cfg, num_sites = check_options(options)
    epsilons = parse_epsilons(epsilon) if epsilon else []
    if any(e == float("inf") for e in epsilons):
        raise ConfigError("--epsilon: inf means no DP, which the audit has nothing to measure")
    breaks = Breaks.parse(break_ or [])
    out_dir = Path(out) if out else Path("runs") / datetime.now().strftime("audit-%Y%m%d-%H%M%S")
    try:  # before the audit runs: a bad folder is found in a second, not minutes
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out_dir}: {err.strerror or err}") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        results = run_audits(
            cfg,
            epsilons,
            out_dir=out_dir,
            mode=mode,
            canaries=canaries,
            breaks=breaks,
            seed=seed,
            site=site,
            num_sites=num_sites,
        )
    print(f"wrote {out_dir / 'audit.json'} and {out_dir / 'audit.png'}")
    raise typer.Exit(1 if any(r.above_claim for r in results) else 0)
