"""A deployed site's node config for tests that drive the ClientApp directly: the state
folder made as ``fedsilo site init`` makes it (keys and marker), a declared public size;
and the federation's roster, shared by deployed and simulated sites of one test."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.privacy.identity import init_state
from common.secagg.roster import ROSTER_FILE, Roster


def deployed_node(
    data: Path, state: Path, *, site_id: str, epsilon: float, data_size: int, **extra: Any
) -> dict[str, Any]:
    init_state(state, site_id=site_id)
    return {
        "data-path": str(data),
        "site-id": site_id,
        "epsilon": epsilon,
        "data-size": data_size,
        "state-dir": str(state),
        **extra,
    }


def install_roster(states: Mapping[str, Path], *, into: Iterable[Path]) -> Roster:
    """Every named site's state folder (made if missing) on one roster, written as
    ``roster.json`` into each folder of ``into`` (a deployed site's state folder, the
    simulated sites' shared folder): the out-of-band exchange a federation makes."""
    roster = Roster(
        {
            name: init_state(state, site_id=name).identity.public_key.public_bytes_raw()
            for name, state in states.items()
        }
    )
    for folder in into:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ROSTER_FILE).write_text(roster.to_json())
    return roster
