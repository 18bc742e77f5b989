"""``fedsilo coordinator ...``, ``fedsilo site ...`` and ``fedsilo roster ...``: thin
typer wrappers around server/deploy.py (the coordinator), client/deploy.py (a data
site) and client/roster.py (the federation's roster). Errors are ``DeployError`` (a
ConfigError), which ``fedsilo`` prints as one ``error:`` line with exit code 2."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

coordinator_app = typer.Typer(
    help="Coordinator: CA, SuperLink certificate and command, site registration, status.",
    no_args_is_help=True,
)
site_app = typer.Typer(
    help="Data site: keys and node config, roster, checks, start and stop the SuperNode.",
    no_args_is_help=True,
)
roster_app = typer.Typer(
    help="The federation's roster: the sites' identity keys, agreed out of band, that "
    "secure aggregation authenticates every site with.",
    no_args_is_help=True,
)


@coordinator_app.command("init")
def coordinator_init(
    directory: Annotated[Path, typer.Argument(help="coordinator folder to create")],
    host: Annotated[
        list[str],
        typer.Option(help="name or IP address sites use to reach the SuperLink (repeatable)"),
    ],
    port: Annotated[int, typer.Option(help="SuperLink port (Fleet, Control, Runtime)")] = 8000,
    force: Annotated[
        bool,
        typer.Option("--force", help="replace an existing CA and keys (sites need the new CA)"),
    ] = False,
) -> None:
    """A CA, the SuperLink's TLS certificate (SANs: each --host, 127.0.0.1, ::1,
    localhost), the Flower CLI connection, and the next steps."""
    from server.deploy import init_coordinator, next_steps

    coord = init_coordinator(directory, host, port=port, force=force)
    print(next_steps(coord))


@coordinator_app.command("start")
def coordinator_start(
    directory: Annotated[Path, typer.Argument(help="coordinator folder")] = Path("."),
    bind: Annotated[
        str,
        typer.Option(
            help="address to listen on; 127.0.0.1 when a reverse proxy on this machine "
            "is the sites' only way in"
        ),
    ] = "0.0.0.0",
) -> None:
    """Start the SuperLink with TLS, node authentication and a persistent database, as
    a child whose output passes through and whose PID is in DIR/superlink.pid (runs are
    written under DIR/runs/); SIGTERM/SIGINT are passed on, its exit status is ours."""
    from common.flower_cli import exit_as
    from server.deploy import (
        Coordinator,
        claim_superlink,
        run_superlink,
        start_coordinator,
    )

    cmd = start_coordinator(directory, bind=bind)
    coord = Coordinator.load(directory)
    pid_file = claim_superlink(coord)
    print(shlex.join(cmd), flush=True)
    ended = run_superlink(coord, cmd, pid_file)
    if ended.cause:
        print(f"error: {ended.cause}", file=sys.stderr, flush=True)
    exit_as(ended.returncode)


@coordinator_app.command("stop")
def coordinator_stop(
    directory: Annotated[Path, typer.Argument(help="coordinator folder")] = Path("."),
) -> None:
    """Stop the SuperLink DIR/superlink.pid names (SIGTERM, only if it is this folder's
    flower-superlink) and wait until it is gone."""
    from server.deploy import stop_coordinator

    print(stop_coordinator(directory))


@coordinator_app.command("status")
def coordinator_status(
    directory: Annotated[Path, typer.Option("--dir", help="coordinator folder")] = Path("."),
) -> None:
    """The sites registered in DIR/sites.json: node id, online or not (from the running
    SuperLink), and the budget each reported in its newest run (DIR/runs/*/summary.json)."""
    from server.deploy import coordinator_status as status

    print("\n".join(status(directory)))


@coordinator_app.command("register")
def coordinator_register(
    public_key: Annotated[Path, typer.Argument(help="the site's node.pub")],
    name: Annotated[str, typer.Option(help="the site's name (its site-id)")],
    directory: Annotated[Path, typer.Option("--dir", help="coordinator folder")] = Path("."),
    ledger_key: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="the site's ledger key (its state/identity.pub): its fingerprint is recorded "
            "in sites.json for `fedsilo audit verify --sites`"
        ),
    ] = None,
) -> None:
    """Register a site's node key with the running SuperLink (`flwr supernode
    register`) and, with --ledger-key, record the key that signs its privacy ledger;
    registering the same values again changes nothing, another ledger key for a
    registered site is refused."""
    from server.deploy import register_site

    reg = register_site(directory, public_key, name, ledger_key=ledger_key)
    node = f"node {reg.node_id}" if reg.node_id is not None else "its node"
    ledger = f", ledger key {reg.ledger_key[:23]}..." if reg.ledger_key else ""
    if reg.created:
        print(
            f"registered site {reg.name} as {node} (key SHA-256 {reg.key_fingerprint[:16]}..."
            f"{ledger})"
        )
    elif reg.ledger_key_added:
        print(f"site {reg.name} was already registered as {node}: recorded its{ledger[1:]}")
    else:
        print(f"site {reg.name} was already registered as {node}: nothing changed")


@site_app.command("init")
def site_init(
    directory: Annotated[Path, typer.Argument(help="site folder to create")],
    site_id: Annotated[str, typer.Option(help="this site's name in the federation")],
    data: Annotated[Path, typer.Option(help="the site's CSV or JSONL data file")],
    ca: Annotated[Path, typer.Option(help="the federation's CA certificate (ca.crt)")],
    superlink: Annotated[str, typer.Option(help="the SuperLink's HOST:PORT")],
    epsilon: Annotated[
        float, typer.Option(help="this site's lifetime epsilon budget, over every run")
    ] = 8.0,
    delta: Annotated[float, typer.Option(help="this site's delta")] = 1e-5,
    dataset: Annotated[
        str, typer.Option(help="the federation's data set (its label names)")
    ] = "rotten-tomatoes",
    text_column: Annotated[str, typer.Option(help="column holding the text")] = "text",
    label_column: Annotated[str, typer.Option(help="column holding the label")] = "label",
    data_size: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="the number of examples this site declares public (sample rate, weight); "
            "default: the file's row count"
        ),
    ] = None,
    disjoint_data_set: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="opt in to a budget of its own for this file, declaring it disjoint from "
            "every other data set of this site (shown to auditors)"
        ),
    ] = None,
    secagg_min_sites: Annotated[
        int,
        typer.Option(
            help="the fewest sites of its roster (itself included) this site joins a secure "
            "sum with; at least 2 (with 2, the other site learns this one's update): keep 3+"
        ),
    ] = 3,
    roster: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="install the federation's roster too, as `fedsilo site roster` does (a "
            "re-init with --force: the site's identity key must already be on it)"
        ),
    ] = None,
    task: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="the task file the federation agreed on: its labels and columns are used, its "
            "digest pinned (the site refuses a plan whose task differs)"
        ),
    ] = None,
    eval_fraction: Annotated[
        float,
        typer.Option(
            help="the share of the site's rows held out of training for the private "
            "evaluation (chosen by a keyed hash, pinned at the first round)"
        ),
    ] = 0.2,
    eval_epsilon: Annotated[
        float,
        typer.Option(help="this site's evaluation budget (a run may ask less, never more)"),
    ] = 1.0,
    epsilon_reserve: Annotated[
        float,
        typer.Option(
            help="what the site keeps of its lifetime budget: it refuses a run that would "
            "leave less (the coordinator cannot lower it)"
        ),
    ] = 0.0,
    force: Annotated[
        bool, typer.Option("--force", help="rewrite an existing site's settings (keys are kept)")
    ] = False,
) -> None:
    """The site's node key, ledger key, node config and budget; prints the public key
    to hand to the coordinator and the ledger key to hand to whoever makes the roster."""
    from client.deploy import init_site, init_summary

    site = init_site(
        directory,
        site_id=site_id,
        data=data,
        ca=ca,
        superlink=superlink,
        epsilon=epsilon,
        delta=delta,
        dataset=dataset,
        text_column=text_column,
        label_column=label_column,
        data_size=data_size,
        disjoint_data_set=disjoint_data_set,
        min_secure_sites=secagg_min_sites,
        roster=roster,
        task=task,
        eval_fraction=eval_fraction,
        eval_epsilon=eval_epsilon,
        reserve=epsilon_reserve,
        force=force,
    )
    print(init_summary(site))


@site_app.command("roster")
def site_roster(
    file: Annotated[Path, typer.Argument(help="the federation's roster (`fedsilo roster make`)")],
    directory: Annotated[Path, typer.Argument(help="site folder")] = Path("."),
) -> None:
    """Check the federation's roster (this site on it under its site-id, with its own
    identity key) and install it in the site's state folder, replacing any roster
    there; prints the fingerprint to compare with the other sites out of band."""
    from client.deploy import install_site_roster, roster_summary

    print(roster_summary(install_site_roster(directory, file)))


def _print_report(directory: Path, *, connect: bool = False) -> list[str]:
    from client.deploy import check_site

    report = check_site(directory, connect=connect)
    for line in report.lines:
        print(line)
    return report.problems


@site_app.command("check")
def site_check(
    directory: Annotated[Path, typer.Argument(help="site folder")] = Path("."),
    connect: Annotated[
        bool,
        typer.Option(
            "--connect",
            help="then meet the SuperLink: a TLS handshake checked against ca.crt, and "
            "whether it knows this node's key (the node is not brought online)",
        ),
    ] = False,
) -> None:
    """Keys, CA, node config, ledger, and the data file loaded by the ClientApp's own
    loader; prints counts only, nothing leaves the machine (with --connect: a TLS
    handshake and one signed request to the SuperLink, no data)."""
    from common.pki import DeployError

    problems = _print_report(directory, connect=connect)
    if problems:
        raise DeployError(f"site check failed: {problems[0]}" + _more(problems))
    print("site check passed")


def _more(problems: list[str]) -> str:
    return f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""


@site_app.command("start")
def site_start(
    directory: Annotated[Path, typer.Argument(help="site folder")] = Path("."),
    port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="local runtime API port (default: a free one)"),
    ] = None,
) -> None:
    """Run the checks, then flower-supernode (TLS, node key, node config, a local
    runtime port of its own) as a child: its output passes through, its PID is in
    DIR/supernode.pid, SIGTERM/SIGINT are passed on, its exit status is ours, and when
    it fails the cause is said in one `error:` line."""
    from client.deploy import Site, claim_supernode, prepare_start, run_supernode
    from common.flower_cli import exit_as
    from common.pki import DeployError

    pid_file = claim_supernode(Site.load(directory))  # one SuperNode per folder
    try:
        report, cmd, env = prepare_start(directory, port=port)
        for line in report.lines:
            print(line)
        if report.problems:
            raise DeployError(f"not starting: {report.problems[0]}" + _more(report.problems))
        site = Site.load(directory)
    except BaseException:
        pid_file.release()
        raise
    print(shlex.join(cmd), flush=True)
    ended = run_supernode(site, cmd, env, pid_file)
    if ended.cause:
        print(f"error: {ended.cause}", file=sys.stderr, flush=True)
    exit_as(ended.returncode)


@site_app.command("stop")
def site_stop(
    directory: Annotated[Path, typer.Argument(help="site folder")] = Path("."),
) -> None:
    """Stop the SuperNode DIR/supernode.pid names (SIGTERM, only if it is this folder's
    flower-supernode): it tells the SuperLink it leaves, so it can start again at once."""
    from client.deploy import stop_supernode

    print(stop_supernode(directory))


@roster_app.command("make")
def roster_make(
    out: Annotated[Path, typer.Argument(help="the roster file to write (JSON)")],
    site: Annotated[
        list[str],
        typer.Option(
            help="NAME=PATH: a site's site-id and its state/identity.pub, as `fedsilo site "
            "init` wrote it (repeat for every site)"
        ),
    ],
    force: Annotated[bool, typer.Option("--force", help="replace an existing OUT")] = False,
) -> None:
    """Write the roster of the federation's sites from their identity keys (received out
    of band, not through the coordinator); prints its fingerprint and each site's key
    fingerprint for every site to compare."""
    from client.roster import describe_roster, make_roster, write_roster

    made = make_roster(site)
    write_roster(out, made, force=force)
    print(f"wrote {out}")
    print("\n".join(describe_roster(made)))
    print(
        "every site compares these fingerprints out of band, then installs it: "
        f"fedsilo site roster {shlex.quote(str(out))} SITE_DIR"
    )


@roster_app.command("show")
def roster_show(
    file: Annotated[Path, typer.Argument(help="a roster file")],
) -> None:
    """A roster's fingerprint and its sites with their identity key fingerprints."""
    from client.roster import describe_roster, read_roster

    print("\n".join(describe_roster(read_roster(file))))
