"""A site's session survives being saved and restored between stages (Flower's node
state), and a damaged saved session is refused."""

from __future__ import annotations

import numpy as np
import pytest

from common.secagg.errors import SecAggError
from common.secagg.params import (
    pack_masked,
)
from common.secagg.site import SiteSession
from tests.unit.common.secagg.rounds import (
    SHARES_ROUTED,
    make_params,
    run_round,
)


def test_site_session_json_round_trip_mid_protocol() -> None:
    # Prepare: pause after the shares are routed; each site saves and restores its state.
    out = run_round(make_params(5), until=SHARES_ROUTED)
    routed = out.messages[SHARES_ROUTED]
    restored = {u: SiteSession.from_json(out.sessions[u].to_json()) for u in routed}
    assert restored == {u: out.sessions[u] for u in routed}
    assert {s.stage for s in restored.values()} == {"shared"}

    # Execute
    co = out.co
    masked = {
        u: (
            pack_masked(restored[u].masked_input(routed[u], out.inputs[u]), out.params),
            restored[u].commitment,
        )
        for u in routed
    }
    requests = co.receive_masked(masked)
    replies = {
        u: SiteSession.from_json(restored[u].to_json()).unmask(r) for u, r in requests.items()
    }
    total, alive = co.receive_unmask(replies)

    # Assert
    assert alive == out.params.participants
    assert np.array_equal(total, out.plain_sum(alive))


@pytest.mark.parametrize("text", ["not json", "{}", '{"params": "{}"}'])
def test_site_session_from_malformed_json_is_refused(text: str) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError):
        SiteSession.from_json(text)
