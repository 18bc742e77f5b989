"""The ``fedsilo`` command."""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from common.config import ConfigError
from common.data import DataValidationError

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


def main() -> None:
    try:
        cli()
    except (ConfigError, DataValidationError) as err:
        # One plain line (no wrapping, no traceback) for errors the user can fix.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
