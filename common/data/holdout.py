"""A site's held-out evaluation share: each row chosen by a keyed hash of its text.

The key is the site's secret (its fingerprint key), so nobody else can tell or steer
which rows are held out; the choice of a row depends on its text alone, so it is stable
across runs and file edits (a row does not move when others are added or removed, and
duplicates of a text fall on the same side). Held-out rows are never trained on: the
training rows and the evaluation share are disjoint by construction, which is what lets
the evaluation's privacy spend compose in parallel with training's (docs/privacy.md).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import numpy as np

_DOMAIN = b"fedsilo-holdout-v1\x00"


def held_out(texts: Sequence[str], key: bytes, fraction: float) -> np.ndarray:
    """Boolean mask of the rows in the held-out share (about ``fraction`` of them)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    if len(key) < 16:
        raise ValueError("the held-out share needs a key of at least 16 bytes")
    if fraction == 0:
        return np.zeros(len(texts), dtype=bool)
    cut = int(fraction * 2**64)
    return np.fromiter(
        (
            int.from_bytes(
                hmac.new(key, _DOMAIN + t.encode("utf-8"), hashlib.sha256).digest()[:8], "big"
            )
            < cut
            for t in texts
        ),
        dtype=bool,
        count=len(texts),
    )
