"""House rules a machine checks: the import contracts (import-linter, as `make lint`
runs them), and what the contract tool cannot see because it does not look inside
third-party packages: the modules a real process has loaded. In deployment Flower
starts a fresh process for every message a site receives, so a secure-aggregation
stage must not pay for torch; nor may `fedsilo --help`."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from tests.support.runs import ROOT

HEAVY = ("torch", "opacus", "transformers", "matplotlib")


def _loaded_after(script: str) -> dict[str, object]:
    """Run ``script`` in a fresh interpreter; it prints one JSON object last."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("common", "client", "server", "simulations", "cli")


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("common/messages.py", "import torch", "No torch or Opacus"),
        ("server/federation.py", "import flwr", "flwr only at the edge"),
        ("common/config.py", "import server.report", "Layers"),
        ("client/settings.py", "import server.deploy", "Layers"),
        ("server/report.py", "import server.federation", "No import cycles"),
        ("simulations/runner.py", "import simulations.empirical_audit", "empirical audit"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    # Prepare: a copy of the packages and their contracts, with one forbidden import.
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")

    # Execute
    done = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )

    # Assert
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    report = done.stdout.replace("\n", " ")
    assert "1 broken" in report, report[-2000:]
    assert re.search(rf"{re.escape(broken)}[^\n]* BROKEN", report), report[-2000:]


def _imports(node: ast.AST, *, in_function: bool = False) -> list[tuple[str, bool]]:
    """Every module ``node`` imports, and whether the import sits inside a function
    (imports under ``if TYPE_CHECKING:`` never run and are left out)."""
    found: list[tuple[str, bool]] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
            continue
        if isinstance(child, ast.Import):
            found += [(alias.name, in_function) for alias in child.names]
        elif isinstance(child, ast.ImportFrom) and child.module:
            found += [(child.module, in_function)]
            found += [(f"{child.module}.{alias.name}", in_function) for alias in child.names]
        inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
        found += _imports(child, in_function=inside)
    return found


def test_every_import_a_contract_ignores_is_a_lazy_one() -> None:
    # Prepare: the ignored imports of every contract.
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    rules = [r for c in contracts["contracts"] for r in c.get("ignore_imports", [])]
    assert rules

    # Execute / Assert: each is imported, and only inside functions.
    for rule in rules:
        importer, imported = (part.strip() for part in rule.split("->"))
        tree = ast.parse((ROOT / (importer.replace(".", "/") + ".py")).read_text())
        matches = [
            lazy
            for module, lazy in _imports(tree)
            if module == imported or module.startswith(imported + ".")
        ]
        assert matches, f"{rule}: no such import"
        assert all(matches), f"{rule}: imported at module level, not only inside a function"


def test_only_the_local_audit_gives_training_canaries() -> None:
    # The audit's canaries (given per-example gradients) and broken mechanisms must not
    # be reachable from anything a coordinator can send: no site, server or simulation
    # code outside the audit passes canaries to train_dp or builds SparseRows, and no
    # run-config key names a canary or a break.
    offenders = []
    for package in ("client", "server", "simulations", "common"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name in ("empirical_audit.py", "dp_engine.py", "training.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.keyword) and node.arg == "canaries":
                    offenders.append(f"{path}: canaries=")
                if isinstance(node, ast.Name | ast.Attribute) and "SparseRows" in ast.unparse(node):
                    offenders.append(f"{path}: SparseRows")
    assert not offenders
    from common.config import RunConfig

    keys = " ".join(RunConfig.model_fields)
    assert "canar" not in keys and "break" not in keys


def test_fedsilo_help_loads_no_torch() -> None:
    loaded = _loaded_after(
        f"""
        import json, sys
        sys.argv = ["fedsilo", "--help"]
        from cli.main import main
        try:
            main()
        except SystemExit:
            pass
        print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
        """
    )
    assert loaded["heavy"] == []


def test_a_secure_aggregation_stage_at_a_site_loads_no_torch(tmp_path: Path) -> None:
    # Prepare (in the child): a simulated site in a fresh process, as a deployed site's
    # process for each message is; the real ClientApp answers the advertise stage (the
    # first of a secure round: identity, roster, signed keys).
    loaded = _loaded_after(
        f"""
        import json, sys
        from flwr.app import Message, MessageType

        from client.app import app
        from common.codec import decode_stage, encode_stage
        from common.config import RunConfig
        from common.messages import RoundPlan, SecAggSetup, StageMessage
        from common.secagg.params import SecAggParams
        from tests.support.inprocess_grid import NODE_ID_OFFSET, InProcessGrid

        params = SecAggParams.create(range(1, 4), ring_bits=12, vector_length=8, session="s1")
        plan = RoundPlan(1, RunConfig(sites_dir={str(tmp_path)!r}))
        grid = InProcessGrid(
            app, num_nodes=1, node_configs=[{{"partition-id": 0, "num-partitions": 3}}]
        )
        stage = StageMessage("advertise", "s1", plan=plan, setup=SecAggSetup(params, 1, 7))
        message = Message(
            content=encode_stage(stage), dst_node_id=NODE_ID_OFFSET,
            message_type=MessageType.TRAIN, group_id="1/advertise",
        )

        # Execute
        ids = grid.push_messages([message])
        reply = decode_stage(grid.pull_messages(ids)[0].content, expect="advertise")

        print(json.dumps({{
            "error": reply.error,
            "advertised": list(reply.ids),
            "heavy": [m for m in {HEAVY!r} if m in sys.modules],
        }}))
        """
    )

    # Assert: the stage was answered (one signed advert, the site enrolled), without torch.
    assert loaded["error"] == "" and loaded["advertised"] == [1]
    assert (tmp_path / "roster.json").is_file()
    assert loaded["heavy"] == []
