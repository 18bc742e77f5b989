"""The federation's roster as files: ``fedsilo roster make`` / ``show``, and what
``fedsilo site roster`` / ``site check`` need to install and check it at a site.

A roster (common/secagg/roster.py) maps each site's name (its site-id) to its Ed25519
identity public key, the key that signs its privacy ledger (``state/identity.pub``).
The sites' operators agree on it out of band, never through the coordinator: one of
them makes it from the ``identity.pub`` files the others sent, every site compares its
fingerprint (a phone call, a signed e-mail), then installs it in its state folder.

Errors are ``DeployError`` (one ``error:`` line from ``fedsilo``), naming the entry.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.messages import SITE_NAME
from common.pki import DeployError
from common.privacy.errors import LedgerError
from common.privacy.identity import PUBLIC_KEY_FILE, fsync_dir, key_fingerprint, load_public_key
from common.secagg.roster import ROSTER_FILE, Roster, RosterError

# A roster smaller than this cannot carry a secure sum (a site's secagg-min-sites is at
# least 2).
MIN_ROSTER_SITES = 2


def parse_site_entry(item: str) -> tuple[str, Path]:
    """``NAME=PATH`` of ``roster make --site``."""
    name, sep, path = item.partition("=")
    name = name.strip()
    if not sep or not name or not path.strip():
        raise DeployError(
            f"--site {item!r}: expected NAME=PATH, a site's name and its state/{PUBLIC_KEY_FILE}"
        )
    if not SITE_NAME.fullmatch(name):
        raise DeployError(
            f"--site {item!r}: site name {name!r}: use 1-64 letters, digits, '.', '_', '-' "
            "(the site's site-id)"
        )
    return name, Path(path.strip()).expanduser()


def make_roster(entries: Sequence[str]) -> Roster:
    """The roster of ``--site NAME=PATH`` entries; a repeated name, a repeated key, or a
    file that is not an Ed25519 public key is refused, naming the entry."""
    sites: dict[str, bytes] = {}
    for item in entries:
        name, path = parse_site_entry(item)
        if name in sites:
            raise DeployError(f"--site {item!r}: site {name} is listed twice")
        try:
            raw = load_public_key(path).public_bytes_raw()
        except LedgerError as err:
            raise DeployError(
                f"--site {item!r}: {err} (expected the site's state/{PUBLIC_KEY_FILE}, as "
                "`fedsilo site init` wrote it)"
            ) from None
        twin = next((n for n, k in sites.items() if k == raw), None)
        if twin is not None:
            raise DeployError(
                f"--site {item!r}: the same identity key as site {twin} (each site has its own)"
            )
        sites[name] = raw
    if len(sites) < MIN_ROSTER_SITES:
        raise DeployError(
            f"a roster lists at least {MIN_ROSTER_SITES} sites (--site NAME=PATH, repeated); "
            f"got {len(sites)}"
        )
    try:
        return Roster(sites)
    except RosterError as err:  # names and keys were checked above; kept as a guard
        raise DeployError(str(err)) from None


def read_roster(path: Path) -> Roster:
    """A roster file, checked as a site reads it (``Roster.from_json``)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DeployError(f"roster {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DeployError(f"roster {path}: unreadable ({err})") from None
    try:
        return Roster.from_json(text, str(path))
    except RosterError as err:
        message = str(err)  # a key's or a name's problem does not name the file
        raise DeployError(message if str(path) in message else f"{path}: {message}") from None


def write_roster(path: Path, roster: Roster, *, force: bool = False) -> None:
    """Write ``roster`` (its canonical JSON, what the fingerprint hashes) to ``path``
    atomically; an existing file is replaced only with ``force``."""
    if path.exists() and not force:
        raise DeployError(f"{path} exists; use --force to replace it")
    _write_atomic(path, roster.to_json() + "\n")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        raise DeployError(f"{path}: cannot write the roster ({err.strerror or err})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def site_key_fingerprint(raw: bytes) -> str:
    """``sha256:<hex>`` of a raw identity key: what `site init` printed for that site."""
    return key_fingerprint(Ed25519PublicKey.from_public_bytes(raw))


def describe_roster(roster: Roster) -> list[str]:
    """The roster's fingerprint and each site's key fingerprint, one per line: what the
    sites compare out of band."""
    width = max((len(n) for n in roster.sites), default=0)
    return [f"roster fingerprint {roster.fingerprint()} ({len(roster.sites)} sites)"] + [
        f"  {name:<{width}}  {site_key_fingerprint(roster.sites[name])}"
        for name in sorted(roster.sites)
    ]


def own_entry_problem(roster: Roster, site_id: str, identity: bytes) -> str | None:
    """Why this site (``site_id``, raw identity key ``identity``) is not on ``roster``
    as itself; None when it is."""
    listed = roster.sites.get(site_id)
    if listed == identity:
        return None
    own = site_key_fingerprint(identity)
    other = roster.name_of(identity)
    if listed is None and other is None:
        return (
            f"this site ({site_id}, identity key {own}) is not on the roster: hand its "
            f"state/{PUBLIC_KEY_FILE} to whoever makes the roster"
        )
    if listed is None:
        return (
            f"the roster lists this site's identity key ({own}) as {other!r}, not as its "
            f"site-id {site_id!r}"
        )
    also = f", and this site's own as {other!r}" if other is not None else ""
    return (
        f"the roster lists {site_id} with another identity key ({site_key_fingerprint(listed)}) "
        f"than this site's own ({own}){also}"
    )


def size_problem(roster: Roster, min_sites: int) -> str | None:
    """A roster smaller than the site's ``secagg-min-sites`` refuses every secure round."""
    if len(roster.sites) >= min_sites:
        return None
    return (
        f"the roster lists {len(roster.sites)} sites, fewer than this site's secagg-min-sites "
        f"{min_sites}: every secure round would be refused"
    )


@dataclass(frozen=True)
class Installed:
    """What ``install_roster`` did."""

    path: Path
    roster: Roster
    previous: str | None  # the fingerprint it replaced; "unreadable"; None: there was none

    @property
    def changed(self) -> bool:
        return self.previous != self.roster.fingerprint()


def install_roster(state_dir: Path, roster: Roster) -> Installed:
    """Put ``roster`` in the site's state folder (``state/roster.json``, where the
    ClientApp reads it), replacing any roster there; the caller has checked it."""
    path = state_dir / ROSTER_FILE
    previous: str | None = None
    if path.exists():
        try:
            previous = Roster.load(path).fingerprint()
        except RosterError:
            previous = "unreadable"
    if previous != roster.fingerprint():
        _write_atomic(path, roster.to_json() + "\n")
    return Installed(path, roster, previous)
