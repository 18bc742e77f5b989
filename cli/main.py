"""The ``fedsilo`` command: thin commands over the modules that do the work.

Its start-up imports neither torch nor Opacus (``fedsilo --help`` and the audit and
deployment commands stay fast); a command imports what it needs when it runs.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer

from cli.audit import audit
from cli.deploy import coordinator_app, roster_app, site_app
from cli.options import parse_set
from common.config import ConfigError
from common.data.dataset import DataValidationError
from common.outputs import RunOutputError
from common.privacy.errors import LedgerError

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
    data: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="your own data: a CSV/JSONL file, or a folder with one file per site"),
    ] = None,
    task: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="task file (labels, columns); without one, labels are read from --data"),
    ] = None,
    site_column: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="column of --data whose values are the sites (one site per value)"),
    ] = None,
    partition: Annotated[Optional[str], typer.Option(help="natural, iid or dirichlet")] = None,  # noqa: UP045
    alpha: Annotated[Optional[float], typer.Option(help="Dirichlet concentration")] = None,  # noqa: UP045
    no_dp: Annotated[bool, typer.Option("--no-dp", help="baseline without DP (labelled)")] = False,
    set_: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--set", help="any run-config key, e.g. --set learning-rate=0.5"),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="federated, or central: the same model on the pooled training data, "
            "no DP, same number of passes (the ceiling)"
        ),
    ] = "federated",
    resume: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="RUN_DIR of a run that died: a new run takes over after its last finished "
            "round, with its plan and sites (their ledgers keep what was spent)"
        ),
    ] = None,
) -> None:
    """Run a federation of simulated sites on the Flower Simulation Engine (or, with
    --mode central, train the same model centrally without DP)."""
    from simulations.runner import load_scenario, resume_options
    from simulations.runner import simulate as run

    if resume is not None:
        given = {
            "--scenario": scenario, "--rounds": rounds, "--sites": sites, "--epsilon": epsilon,
            "--dataset": dataset, "--data": data, "--task": task, "--site-column": site_column,
            "--partition": partition, "--alpha": alpha, "--no-dp": no_dp or None,
            "--set": set_ or None, "--mode": None if mode == "federated" else mode,
        }  # fmt: skip
        others = [name for name, value in given.items() if value is not None]
        if others:
            raise ConfigError(
                f"--resume takes the dead run's plan; only --out goes with it, not {others[0]}"
            )
        run(resume_options(resume, out))
        return
    if mode not in ("federated", "central"):
        raise ConfigError(f"--mode must be 'federated' or 'central', got {mode!r}")
    if data is not None and dataset is not None:
        raise ConfigError("give --dataset (bundled) or --data (your own), not both")
    options: dict[str, Any] = load_scenario(scenario) if scenario else {}
    flags = {
        "out-dir": out,
        "num-server-rounds": rounds,
        "num-sites": sites,
        "epsilon": epsilon,
        "dataset": data if data is not None else dataset,
        "task": task,
        "site-column": site_column,
        "partition": partition,
        "dirichlet-alpha": alpha,
    }
    options.update({k: v for k, v in flags.items() if v is not None})
    if no_dp:
        options["dp"] = False
    options.update(parse_set(set_ or []))
    if mode == "central":
        from simulations.central import run_central

        run_central(options)
        return
    run(options)


@cli.command()
def sweep(
    scenario: Annotated[
        str | None, typer.Option(help="scenario TOML file or bundled name (default: defaults)")
    ] = None,
    epsilon: Annotated[
        str, typer.Option(help="comma-separated per-site epsilons; inf = federated without DP")
    ] = "1,2,4,8,inf",
    seeds: Annotated[int, typer.Option(help="seeds 0..N-1 per epsilon (and for central)")] = 1,
    out: Annotated[
        str | None, typer.Option(help="output folder (default runs/sweep-<timestamp>)")
    ] = None,
    rounds: Annotated[Optional[int], typer.Option(help="number of rounds")] = None,  # noqa: UP045
    sites: Annotated[Optional[int], typer.Option(help="number of simulated sites")] = None,  # noqa: UP045
    set_: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--set", help="any run-config key, e.g. --set learning-rate=0.5"),
    ] = None,
) -> None:
    """Privacy against utility: a federated run per epsilon and seed, a central no-DP
    run per seed; prints a table, writes sweep.json and privacy_utility.png."""
    from pathlib import Path

    from simulations.runner import load_scenario
    from simulations.sweep import default_out_dir, run_sweep
    from simulations.sweep_results import parse_epsilons

    epsilons = parse_epsilons(epsilon)
    options: dict[str, Any] = load_scenario(scenario) if scenario else {}
    flags = {"num-server-rounds": rounds, "num-sites": sites}
    options.update({k: v for k, v in flags.items() if v is not None})
    options.update(parse_set(set_ or []))
    run_sweep(
        options,
        epsilons,
        seeds,
        Path(out) if out else default_out_dir(),
        scenario=scenario,
    )


@cli.command("check-data")
def check_data(
    path: Annotated[str, typer.Argument(help="a site's CSV or JSONL file")],
    dataset: Annotated[
        str, typer.Option(help="the federation's dataset (its label set)")
    ] = "rotten-tomatoes",
    text_column: Annotated[str, typer.Option(help="column holding the text")] = "text",
    label_column: Annotated[str, typer.Option(help="column holding the label")] = "label",
    task: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="a task file (or bundled task): its labels and columns, instead of "
            "--dataset and the column options"
        ),
    ] = None,
) -> None:
    """Validate a site's data file with the loader the ClientApp uses; print counts only."""
    if task is not None:
        from common.data import load_site_file
        from common.task import resolve_task

        declared = resolve_task(task)
        data = load_site_file(
            path,
            label_names=declared.labels,
            text_column=declared.text_column,
            label_column=declared.label_column,
        )
    else:
        from client.settings import read_site_file

        data = read_site_file(path, dataset, text_column, label_column)
    counts = ", ".join(f"{k}: {v}" for k, v in data.label_counts().items())
    # Plain print: a long path must not wrap, nor its brackets read as markup.
    print(f"{path}: {len(data)} rows ok ({counts})")


task_app = typer.Typer(
    help="Tasks: what a federation agrees to train (public).", no_args_is_help=True
)


@task_app.command("show")
def task_show(
    task: Annotated[str, typer.Argument(help="a task file (.toml) or a bundled task's name")],
) -> None:
    """Print a task and the digest a site pins when it agrees to it."""
    from common.task import resolve_task

    t = resolve_task(task)
    print(f"task {t.name}: {len(t.labels)} labels, digest {t.digest()}")
    print(f"  labels        {', '.join(t.labels)}")
    print(f"  columns       text {t.text_column!r}, label {t.label_column!r}")
    print(f"  max length    {t.max_length} tokens; model preset {t.model_preset}")
    print(f"  test file     {t.test_file or '- (evaluation only at the sites)'}")


@cli.command("export")
def export(
    run_dir: Annotated[str, typer.Argument(help="a run folder (summary.json, model/)")],
    out: Annotated[str | None, typer.Option(help="output folder (default RUN_DIR/export)")] = None,
) -> None:
    """Write the run's final model as fp32 and int8 files, with a model card."""
    from common.export import export_run

    card = export_run(run_dir, out)
    acc, size, lat = card.accuracy, card.size_bytes, card.latency_ms
    where = out if out is not None else f"{run_dir.rstrip('/')}/export"
    if not card.dp:
        print("NO DIFFERENTIAL PRIVACY: this model comes from a baseline run without DP")
    if card.task is not None:
        print(f"task      {card.task['name']}: labels {', '.join(card.task['labels'])}")
    if acc["fp32"] is not None and acc["int8"] is not None:
        print(f"accuracy  fp32 {acc['fp32']:.4f}  int8 {acc['int8']:.4f}")
    else:
        print("accuracy  no public test set (the card shows the private federated evaluation)")
    if card.private_eval is not None:
        ev = card.private_eval
        print(
            f"private   accuracy {ev['accuracy']:.4f}, macro-F1 {ev['macro_f1']:.4f} "
            f"(noise std {ev['noise_std']:.2f} per count)"
        )
    print(
        f"size      fp32 {size['fp32'] / 2**20:.2f} MiB  int8 {size['int8'] / 2**20:.2f} MiB"
        f"  ({size['ratio']:.2f}x)"
    )
    print(
        f"latency   batch of {lat['batch_size']}: fp32 {lat['fp32_batch']:.2f} ms, int8 "
        f"{lat['int8_batch']:.2f} ms; one text: fp32 {lat['fp32_single']:.2f} ms, int8 "
        f"{lat['int8_single']:.2f} ms (1 thread, {lat['cpu_cores']} cores)"
    )
    print(f"written to {where} (MODEL_CARD.md, model_card.json)")


@cli.command("predict")
def predict(
    model_dir: Annotated[str, typer.Argument(help="an export folder (fedsilo export)")],
    texts: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(help="texts to classify"),
    ] = None,
    file: Annotated[str | None, typer.Option(help="a UTF-8 file with one text per line")] = None,
    int8: Annotated[bool, typer.Option("--int8/--fp32", help="which model to run")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Label texts with the exported model; prints each label's probability."""
    import json
    from pathlib import Path

    from common.export import predict as run_predict

    items = list(texts or [])
    if file is not None:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{file}: cannot read ({err})") from None
        items += [line for line in lines if line.strip()]
    if not items:
        raise ConfigError("no text to classify: give TEXT arguments or --file")
    results = run_predict(model_dir, items, int8=int8)
    if json_out:
        rows = [
            {"text": t, "label": lab, "probabilities": p}
            for t, (lab, p) in zip(items, results, strict=True)
        ]
        print(json.dumps(rows, indent=2))
        return
    for text, (label, probs) in zip(items, results, strict=True):
        top = sorted(probs.items(), key=lambda kv: -kv[1])[:3]
        shown = ", ".join(f"{name} {p:.3f}" for name, p in top)
        print(f"{label}\t{shown}\t{text}")


cli.add_typer(coordinator_app, name="coordinator")
cli.add_typer(site_app, name="site")
cli.add_typer(roster_app, name="roster")
cli.add_typer(audit, name="audit")
cli.add_typer(task_app, name="task")


def main() -> None:
    try:
        cli()
    except (ConfigError, DataValidationError, LedgerError, RunOutputError) as err:
        # One plain line (no wrapping, no traceback) for errors the user can fix.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
