"""A site's identity key: the Ed25519 key that signs its privacy ledger.

Created once in the site's state folder (mode 0600) and never replaced; the public
half (``identity.pub``) is what an auditor checks the ledger's signatures with.
"""

from __future__ import annotations

import contextlib
import os
import secrets
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
