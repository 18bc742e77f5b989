"""A site's state folder and its secrets: the Ed25519 identity key that signs the
privacy ledger, and the fingerprint key that keys the ledger's data fingerprints.

Both are created once (mode 0600) and never replaced; the public half of the identity
(``identity.pub``) is what an auditor checks the ledger's signatures with, and its
fingerprint is what the coordinator records. ``fedsilo site init`` creates the folder
with a marker file; a deployed site opens it only if the marker is there, so a missing
or mistyped ``state-dir`` cannot quietly start a new identity and an empty ledger (a
fresh budget).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from common.privacy.errors import LedgerError

KEY_FILE = "identity.key"
PUBLIC_KEY_FILE = "identity.pub"
FINGERPRINT_KEY_FILE = "fingerprint.key"  # 32 secret bytes, never leave the site
MARKER_FILE = "site-state.json"  # written by ``fedsilo site init`` (and simulations)


@dataclass(frozen=True)
class SiteIdentity:
    """The site's signing key: entries signed with it cannot be edited unnoticed."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def public_key_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key)


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """``sha256:<hex>`` of the raw public key: what the coordinator records for a site
    and an auditor compares with the ``identity.pub`` beside a ledger."""
    return "sha256:" + hashlib.sha256(key.public_bytes_raw()).hexdigest()


@dataclass(frozen=True)
class SiteKeys:
    """What a site's rounds need from its state folder."""

    identity: SiteIdentity
    fingerprint_key: bytes


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (made with its folder if missing): one writer
    at a time in a site's state folder (the ledger's charge, the held-out pin)."""
    import fcntl  # POSIX; imported here so that the auditor's imports stay portable

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` atomically, never replacing an existing file.

    Returns False when another writer created ``path`` first. The temp file is made
    with O_EXCL and fsynced; ``os.link`` publishes it only if ``path`` is still absent
    (``os.replace`` alone could clobber a key a concurrent process just wrote)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # A file system without hard links: fall back to a checked replace.
            if path.exists():
                return False
            os.replace(tmp, path)
        fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise LedgerError(f"{path}: unreadable or corrupt site key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A site's public key, for auditors; a bad file names itself."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise LedgerError(f"{path}: unreadable or corrupt public key ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"{path}: not an Ed25519 public key")
    return key


def load_or_create_identity(directory: Path) -> SiteIdentity:
    """The site key in ``directory``, created once and never overwritten afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / KEY_FILE
    pub_path = directory / PUBLIC_KEY_FILE
    if not key_path.exists():
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_new_file(key_path, pem, 0o600)  # a lost race leaves the winner's key
    identity = SiteIdentity(_load_private_key(key_path))
    if not pub_path.exists():
        write_new_file(pub_path, identity.public_key_pem(), 0o644)
    if load_public_key(pub_path).public_bytes_raw() != identity.public_key.public_bytes_raw():
        raise LedgerError(f"{pub_path}: does not match the private key in {key_path}")
    return identity


def load_fingerprint_key(directory: Path) -> bytes:
    path = directory / FINGERPRINT_KEY_FILE
    try:
        key = path.read_bytes()
    except OSError as err:
        raise LedgerError(f"{path}: cannot read the fingerprint key ({err})") from err
    if len(key) != 32:
        raise LedgerError(f"{path}: a fingerprint key is 32 bytes, this file has {len(key)}")
    return key


def init_state(directory: Path, *, site_id: str) -> SiteKeys:
    """Create the state folder's secrets and marker (``fedsilo site init``; simulated
    sites); what already exists is kept, never replaced."""
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        directory.chmod(0o700)
    identity = load_or_create_identity(directory)
    write_new_file(directory / FINGERPRINT_KEY_FILE, secrets.token_bytes(32), 0o600)
    marker = {"site_id": site_id, "identity": identity.fingerprint()}
    write_new_file(directory / MARKER_FILE, (json.dumps(marker) + "\n").encode(), 0o644)
    return open_state(directory)


def open_state(directory: Path) -> SiteKeys:
    """The keys of a state folder ``fedsilo site init`` created; refuses (by name) a
    folder without its marker or a secret, rather than create a new identity."""
    marker = directory / MARKER_FILE
    if not marker.is_file():
        raise LedgerError(
            f"state folder {directory} was not created by `fedsilo site init` (no {MARKER_FILE}): "
            "refusing to start a new identity and an empty ledger there, which would be a "
            "fresh privacy budget; check 'state-dir' in the node config"
        )
    for name in (KEY_FILE, PUBLIC_KEY_FILE, FINGERPRINT_KEY_FILE):
        if not (directory / name).is_file():
            raise LedgerError(
                f"state folder {directory}: {name} is missing; a site's keys are never "
                "recreated (restore it from backup)"
            )
    return SiteKeys(load_or_create_identity(directory), load_fingerprint_key(directory))
