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
    KEYS_ROUTED,
    SHARES_ROUTED,
    make_params,
    run_round,
)


def _again(session: SiteSession) -> SiteSession:
    """The session as the next stage finds it: saved, then restored."""
    restored = SiteSession.from_json(session.to_json())
    assert restored == session
    return restored


def test_site_session_json_round_trip_mid_protocol() -> None:
    # Prepare: pause after the shares are routed; each site saves and restores its state
    # before every later stage (open shares, admit the round's sites, mask, sign, unmask).
    out = run_round(make_params(5), until=SHARES_ROUTED, min_sites=4)
    routed = out.messages[SHARES_ROUTED]
    restored = {u: _again(out.sessions[u]) for u in routed}
    assert {s.stage for s in restored.values()} == {"shared"}
    assert {s.params.graph for s in restored.values()} == {out.co.params.graph}
    assert {s.min_sites for s in restored.values()} == {4}

    # Execute
    co = out.co
    opened = {u: restored[u].open_shares(*routed[u]) for u in routed}
    assert set(opened.values()) == {()}
    members = co.receive_opened(opened)
    restored = {u: _again(restored[u]) for u in members}
    assert {s.stage for s in restored.values()} == {"opened"}
    for u in members:
        restored[u].admit(members)
    restored = {u: _again(restored[u]) for u in members}
    assert {s.stage for s in restored.values()} == {"admitted"}
    assert {s.members for s in restored.values()} == {members}
    assert {s.min_sites for s in restored.values()} == {4}
    masked = {}
    for u in members:
        y = restored[u].masked_input(out.inputs[u])
        masked[u] = (pack_masked(y, restored[u].params), restored[u].commitment)
    survivors = co.receive_masked(masked)
    restored = {u: _again(restored[u]) for u in survivors.alive}
    signatures = co.receive_signatures(
        {u: restored[u].consistency(survivors, out.sign(u)) for u in survivors.alive}
    )
    restored = {u: _again(restored[u]) for u in survivors.alive}
    assert {s.stage for s in restored.values()} == {"signed"}
    assert {s.told for s in restored.values()} == {survivors}
    replies = {u: restored[u].unmask(survivors, signatures, out.sign(u)) for u in restored}
    total, alive = co.receive_unmask(replies)

    # Assert
    assert members == alive == out.params.participants
    assert np.array_equal(total, out.plain_sum(alive))


def test_site_session_json_round_trip_before_the_adverts_are_checked() -> None:
    # Prepare: a session that has only advertised (no graph, no adverts, no seed yet).
    out = run_round(make_params(5), until=KEYS_ROUTED)
    session = out.sessions[1]
    assert session.stage == "advertised" and not session.params.graph

    # Execute
    restored = _again(session)
    restored.check_adverts(out.messages[KEYS_ROUTED][1], out.roster, min_sites=5)

    # Assert
    assert restored.params.graph == out.co.params.graph


@pytest.mark.parametrize("text", ["not json", "{}", '{"params": "{}"}'])
def test_site_session_from_malformed_json_is_refused(text: str) -> None:
    # Execute / Assert
    with pytest.raises(SecAggError):
        SiteSession.from_json(text)
