"""A deployed site's node config for tests that drive the ClientApp directly: the state
folder made as ``fedsilo site init`` makes it (keys and marker), a declared public size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.privacy.identity import init_state


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
