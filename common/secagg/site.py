"""A site's side of a secure round, as a small state machine whose state is kept
between the stages (Flower's node state): fresh keys, shares of its secrets sealed to
its holders, its masked input, and one answer to one unmask request."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from common.quantize import RingArray
from common.secagg import crypto, shamir
from common.secagg.errors import SecAggAbort, SecAggError
from common.secagg.params import (
    INDEX_BYTES,
    SEALED_BYTES,
    PublicKeys,
    SecAggParams,
    UnmaskRequest,
    commitment,
    pair_info,
    pair_mask,
    ring_mask,
    share_ad,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


@dataclass
class SiteSession:
    """A site's secrets and progress through one secure round (kept in node state)."""

    params: SecAggParams
    index: int
    stage: str
    c_private: bytes
    s_private: bytes
    b_seed: bytes = b""
    keys: dict[int, PublicKeys] = field(default_factory=dict)
    received: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # (b, s) shares

    @classmethod
    def start(cls, params: SecAggParams, index: int) -> tuple[SiteSession, PublicKeys]:
        """Stage 1: fresh key pairs for this round."""
        if index not in params.participants:
            raise SecAggError(f"site {index} is not a participant of this round")
        c, s = crypto.generate_keypair(), crypto.generate_keypair()
        session = cls(params, index, "advertised", c.private, s.private)
        return session, PublicKeys(c.public, s.public)

    def _expect(self, stage: str, action: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"{action} is not allowed at stage '{self.stage}'")

    def share_keys(self, keys: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        """Stage 2: shares of ``b`` and ``s`` for every holder whose keys arrived."""
        self._expect("advertised", "share keys")
        holders = set(self.params.holders(self.index))
        unexpected = set(keys) - holders
        if unexpected:
            raise SecAggError(f"keys from sites that are not neighbours: {sorted(unexpected)}")
        own = keys.get(self.index)
        if (
            own is None
            or own.c != crypto.public_from_private(self.c_private)
            or (own.s != crypto.public_from_private(self.s_private))
        ):
            raise SecAggError("the coordinator did not return this site's own public keys")
        seen: set[bytes] = set()
        for v, pk in keys.items():
            if pk.c in seen or pk.s in seen:
                raise SecAggError(f"site {v} advertised a public key already in use")
            seen.update((pk.c, pk.s))
        if len(keys) < self.params.threshold:
            raise SecAggAbort(
                f"only {len(keys)} of {len(holders)} holders advertised keys, "
                f"threshold is {self.params.threshold}"
            )
        self.keys = dict(keys)
        self.b_seed = os.urandom(crypto.KEY_BYTES)
        holders_now = sorted(keys)
        t = self.params.threshold
        b_shares = shamir.split(self.b_seed, threshold=t, holders=holders_now)
        s_shares = shamir.split(self.s_private, threshold=t, holders=holders_now)
        sealed: dict[int, bytes] = {}
        for v in holders_now:
            if v == self.index:
                self.received[v] = (b_shares[v], s_shares[v])
                continue
            key = crypto.agree(
                self.c_private, keys[v].c, info=pair_info(self.params, self.index, v, "seal")
            )
            plaintext = (
                self.index.to_bytes(INDEX_BYTES, "big")
                + v.to_bytes(INDEX_BYTES, "big")
                + b_shares[v]
                + s_shares[v]
            )
            sealed[v] = crypto.seal(
                key, plaintext, associated_data=share_ad(self.params, self.index, v)
            )
        self.stage = "shared"
        return sealed

    def masked_input(self, sealed: Mapping[int, bytes], encoded: RingArray) -> RingArray:
        """Stage 3: open the shares sent to this site, then mask ``encoded``."""
        self._expect("shared", "masked input")
        unexpected = set(sealed) - (set(self.keys) - {self.index})
        if unexpected:
            raise SecAggError(f"shares from sites that advertised no keys: {sorted(unexpected)}")
        if encoded.shape != (self.params.vector_length,) or encoded.dtype != np.uint64:
            raise SecAggError(
                f"encoded update must be {self.params.vector_length} uint64 ring elements"
            )
        for u, blob in sorted(sealed.items()):
            if not isinstance(blob, bytes) or len(blob) != SEALED_BYTES:
                raise SecAggError(f"sealed shares from site {u} must be {SEALED_BYTES} bytes")
            key = crypto.agree(
                self.c_private, self.keys[u].c, info=pair_info(self.params, u, self.index, "seal")
            )
            try:
                plain = crypto.open_sealed(
                    key, blob, associated_data=share_ad(self.params, u, self.index)
                )
            except SecAggError as err:
                raise SecAggError(f"sealed shares from site {u}: {err}") from None
            sender = int.from_bytes(plain[:INDEX_BYTES], "big")
            receiver = int.from_bytes(plain[INDEX_BYTES : 2 * INDEX_BYTES], "big")
            if (sender, receiver) != (u, self.index):
                raise SecAggError(f"sealed shares from site {u} name the wrong sender/receiver")
            body = plain[2 * INDEX_BYTES :]
            self.received[u] = (body[: shamir.SHARE_BYTES], body[shamir.SHARE_BYTES :])
        if len(self.received) < self.params.threshold:
            raise SecAggAbort(
                f"only {len(self.received)} holders shared keys with this site, "
                f"threshold is {self.params.threshold}"
            )
        mask = ring_mask(self.params.ring_bits)
        if encoded.size and int(encoded.max()) > int(mask):
            raise SecAggError(f"encoded update has values >= 2^{self.params.ring_bits}")
        total = encoded + crypto.expand_mask(
            self.b_seed, self.params.vector_length, self.params.ring_bits
        )
        for v in sorted(self.received):
            if v == self.index:
                continue
            pair = pair_mask(self.params, self.s_private, self.keys[v].s, self.index, v)
            total = total + pair if self.index < v else total - pair
        self.stage = "masked"
        masked: RingArray = total & mask
        return masked

    @property
    def commitment(self) -> bytes:
        """Sent with the masked input: binds the self-mask seed (see ``commitment``)."""
        if not self.b_seed:
            raise SecAggError("no self-mask seed before share keys")
        return commitment(self.params, self.index, self.b_seed)

    def unmask(self, request: UnmaskRequest) -> dict[int, bytes]:
        """Stage 4, once: the ``b`` share of each alive holder-peer, the ``s`` share of
        each dropped one. A second request of the round is refused."""
        self._expect("masked", "unmask")
        alive, dropped = set(request.alive), set(request.dropped)
        if alive & dropped:
            raise SecAggError(f"sites both alive and dropped: {sorted(alive & dropped)}")
        if self.index not in alive:
            raise SecAggError("the unmask request does not count this site as alive")
        unknown = (alive | dropped) - set(self.params.participants)
        if unknown:
            raise SecAggError(f"unmask request names unknown sites: {sorted(unknown)}")
        if len(alive) < self.params.threshold:
            raise SecAggAbort(
                f"only {len(alive)} masked inputs, threshold is {self.params.threshold}"
            )
        pieces = self.params.pieces(alive)
        if pieces > 1:  # checked here too: the coordinator is the party guarded against
            raise SecAggAbort(
                f"the alive sites' neighbour graph falls into {pieces} pieces: revealing "
                "shares would unmask each piece on its own"
            )
        self.stage = "done"
        out: dict[int, bytes] = {}
        for v, (b_share, s_share) in sorted(self.received.items()):
            if v in alive:
                out[v] = b_share
            elif v in dropped:
                out[v] = s_share
        return out

    # Persistence between the stages (Flower keeps it in the node's context state).
    def to_json(self) -> str:
        return json.dumps(
            {
                "params": self.params.to_json(),
                "index": self.index,
                "stage": self.stage,
                "c": _b64(self.c_private),
                "s": _b64(self.s_private),
                "b": _b64(self.b_seed),
                "keys": {str(v): [_b64(k.c), _b64(k.s)] for v, k in self.keys.items()},
                "received": {str(v): [_b64(b), _b64(s)] for v, (b, s) in self.received.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SiteSession:
        try:
            raw = json.loads(text)
            return cls(
                params=SecAggParams.from_json(raw["params"]),
                index=int(raw["index"]),
                stage=str(raw["stage"]),
                c_private=_unb64(raw["c"]),
                s_private=_unb64(raw["s"]),
                b_seed=_unb64(raw["b"]),
                keys={
                    int(v): PublicKeys(_unb64(c), _unb64(s)) for v, (c, s) in raw["keys"].items()
                },
                received={int(v): (_unb64(b), _unb64(s)) for v, (b, s) in raw["received"].items()},
            )
        except (ValueError, KeyError, TypeError) as err:
            raise SecAggError(f"saved secagg session is unreadable: {err}") from None
