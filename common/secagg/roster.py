"""The federation's roster: the identity public keys of the sites, obtained out of
band (not through the coordinator). A site joins a secure round only with sites on
its roster: their adverts, dealing records and survivor signatures must verify under
a key the roster lists.

Deployed sites install the roster the consortium agreed on (``fedsilo roster make``,
then ``fedsilo site roster``; every site compares its fingerprint). Simulated sites
all run on one machine: each enrols its own key in a roster file in the simulation's
sites folder before it advertises, which stands in for the out-of-band exchange.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.secagg import crypto
from common.secagg.errors import SecAggError

ROSTER_FILE = "roster.json"
FORMAT = "fedsilo-roster/1"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RosterError(SecAggError):
    """The roster is missing, unreadable or inconsistent; the text names the problem."""


@dataclass(frozen=True)
class Roster:
    """Site name -> raw Ed25519 identity public key (32 bytes)."""

    sites: Mapping[str, bytes]

    def __post_init__(self) -> None:
        seen: dict[bytes, str] = {}
        for name, key in self.sites.items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise RosterError(f"roster site name {name!r} must be 1-64 letters, digits, ._-")
            if not isinstance(key, bytes) or len(key) != crypto.KEY_BYTES:
                raise RosterError(f"roster key of {name} must be a raw 32-byte Ed25519 key")
            if crypto.weak_identity(key):
                raise RosterError(
                    f"roster key of {name} is a point of small order: anyone could sign as it"
                )
            if key in seen:
                raise RosterError(f"roster lists one key for both {seen[key]} and {name}")
            seen[key] = name

    def name_of(self, identity: bytes) -> str | None:
        return next((n for n, k in self.sites.items() if k == identity), None)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "sites": [
                    {"name": n, "identity": base64.b64encode(self.sites[n]).decode()}
                    for n in sorted(self.sites)
                ],
            },
            indent=1,
        )

    def fingerprint(self) -> str:
        """``sha256:`` of the canonical roster: what every site compares out of band."""
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str, source: str = "roster") -> Roster:
        try:
            raw = json.loads(text)
        except ValueError as err:
            raise RosterError(f"{source} is not JSON: {err}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise RosterError(f"{source} is not a {FORMAT} file")
        entries = raw.get("sites")
        if not isinstance(entries, list):
            raise RosterError(f"{source}: 'sites' must be a list of {{name, identity}}")
        sites: dict[str, bytes] = {}
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) != {"name", "identity"}:
                raise RosterError(f"{source}: each site is exactly {{name, identity}}")
            name, key = entry["name"], entry["identity"]
            if not isinstance(name, str) or name in sites:
                raise RosterError(f"{source}: site {name!r} is listed twice or badly named")
            try:
                sites[name] = base64.b64decode(str(key), validate=True)
            except ValueError:
                raise RosterError(f"{source}: identity of {name} is not base64") from None
        return cls(sites)

    @classmethod
    def load(cls, path: Path) -> Roster:
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise RosterError(
                f"no roster at {path}: a site joins secure aggregation only with the sites "
                "its roster lists (install it with `fedsilo site roster`)"
            ) from None
        except OSError as err:
            raise RosterError(f"roster {path} is unreadable: {err.strerror}") from None
        return cls.from_json(text, str(path))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def enrol(path: Path, name: str, identity: bytes) -> Roster:
    """Simulation only: add this site's key to the shared roster file (a site already
    listed must list the same key) and return the roster."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        roster = Roster.load(path) if path.exists() else Roster({})
        known = roster.sites.get(name)
        if known == identity:
            return roster
        if known is not None:
            raise RosterError(f"roster {path} lists another key for {name}")
        roster = Roster({**roster.sites, name: identity})
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(roster.to_json())
        os.replace(tmp, path)
        return roster
