"""The ``fedsilo`` command."""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from common.config import ConfigError
from common.data import DataValidationError
from common.privacy.ledger import LedgerError

cli = typer.Typer(
    name="fedsilo",
    help="Federated, differentially private text classification on Flower.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@cli.callback()
def _root() -> None:
    """Federated, differentially private text classification on Flower."""


def _parse_set(items: list[str]) -> dict[str, Any]:
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare string
    return out


@cli.command()
def simulate(
    scenario: Annotated[str | None, typer.Option(help="scenario TOML file or bundled name")] = None,
    out: Annotated[
        str | None, typer.Option(help="output folder (default runs/<timestamp>)")
    ] = None,
    rounds: Annotated[Optional[int], typer.Option(help="number of rounds")] = None,  # noqa: UP045
    sites: Annotated[Optional[int], typer.Option(help="number of simulated sites")] = None,  # noqa: UP045
    epsilon: Annotated[Optional[float], typer.Option(help="per-site epsilon budget")] = None,  # noqa: UP045
    dataset: Annotated[Optional[str], typer.Option(help="rotten-tomatoes or 20newsgroups")] = None,  # noqa: UP045
    partition: Annotated[Optional[str], typer.Option(help="natural, iid or dirichlet")] = None,  # noqa: UP045
    alpha: Annotated[Optional[float], typer.Option(help="Dirichlet concentration")] = None,  # noqa: UP045
    no_dp: Annotated[bool, typer.Option("--no-dp", help="baseline without DP (labelled)")] = False,
    set_: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--set", help="any run-config key, e.g. --set learning-rate=0.5"),
    ] = None,
) -> None:
    """Run a federation of simulated sites on the Flower Simulation Engine."""
    from simulations.runner import load_scenario
    from simulations.runner import simulate as run

    options: dict[str, Any] = load_scenario(scenario) if scenario else {}
    flags = {
        "out-dir": out,
        "num-server-rounds": rounds,
        "num-sites": sites,
        "epsilon": epsilon,
        "dataset": dataset,
        "partition": partition,
        "dirichlet-alpha": alpha,
    }
    options.update({k: v for k, v in flags.items() if v is not None})
    if no_dp:
        options["dp"] = False
    options.update(_parse_set(set_ or []))
    run(options)


@cli.command("check-data")
def check_data(
    path: Annotated[str, typer.Argument(help="a site's CSV or JSONL file")],
    dataset: Annotated[
        str, typer.Option(help="the federation's dataset (its label set)")
    ] = "rotten-tomatoes",
    text_column: Annotated[str, typer.Option(help="column holding the text")] = "text",
    label_column: Annotated[str, typer.Option(help="column holding the label")] = "label",
) -> None:
    """Validate a site's data file with the loader the ClientApp uses; print counts only."""
    from common.data import builtin_label_names, load_site_file

    data = load_site_file(
        path,
        label_names=builtin_label_names(dataset),
        text_column=text_column,
        label_column=label_column,
    )
    counts = ", ".join(f"{k}: {v}" for k, v in data.label_counts().items())
    Console().print(f"{path}: {len(data)} rows ok ({counts})")


audit = typer.Typer(help="Check and report sites' signed privacy ledgers.", no_args_is_help=True)
cli.add_typer(audit, name="audit")


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

    from common.privacy.audit import coordinator_heads, find_ledgers, verify

    paths = find_ledgers([Path(p) for p in ledgers])
    if not paths:
        raise ConfigError(f"no ledger found in {', '.join(ledgers)}")
    heads = None
    if summary:
        try:
            heads = coordinator_heads(json.loads(Path(summary).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{summary}: not a readable summary.json ({err})") from None
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


def main() -> None:
    try:
        cli()
    except (ConfigError, DataValidationError, LedgerError) as err:
        # One plain line (no wrapping, no traceback) for errors the user can fix.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
