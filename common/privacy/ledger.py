"""An append-only, hash-chained, signed ledger of a site's privacy spend.

A site appends one line per round *before* it sends its update, so a crash can never
leave spend unrecorded. Each line carries the raw mechanism (sigma, q, steps) next to
the epsilons the site claimed; an auditor re-derives those epsilons with Google's
dp_accounting PLD accountant, independent of the Opacus PRV accountant that wrote them,
and checks the Ed25519 signatures and the hash chain, so edits, deletions, reorderings
and understated epsilons all show up as findings.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import math
import operator
import os
import re
import secrets
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from common.privacy.accounting import (
    PRV_EPS_ERROR,
    PRV_MAX_EPSILON,
    PrivacyError,
    SubsampledGaussianEvent,
    merged_history,
)

if sys.platform != "win32":
    import fcntl

SCHEMA_VERSION = 1
ACCOUNTANT = "prv"
ZERO_HASH = "0" * 64
KEY_FILE = "identity.key"
PUBLIC_KEY_FILE = "identity.pub"
# PLD's grid: the same as the tests' reference accountant.
PLD_DISCRETIZATION = 1e-3
# Opacus PRV may be off by PRV_EPS_ERROR and PLD's grid adds its own; small epsilons
# (a few hundredths) would otherwise fail a purely relative comparison.
ABSOLUTE_SLACK = 2 * PRV_EPS_ERROR

_HEX64 = re.compile(r"[0-9a-f]{64}")


class LedgerError(ValueError):
    """A ledger or identity file that cannot be trusted as it stands."""


# ---- site identity ----------------------------------------------------------------


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


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_file(path: Path, data: bytes, mode: int) -> bool:
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
        _fsync_dir(path.parent)
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
        _write_new_file(key_path, pem, 0o600)  # a lost race leaves the winner's key
    identity = SiteIdentity(_load_private_key(key_path))
    if not pub_path.exists():
        _write_new_file(pub_path, identity.public_key_pem(), 0o644)
    if load_public_key(pub_path).public_bytes_raw() != identity.public_key.public_bytes_raw():
        raise LedgerError(f"{pub_path}: does not match the private key in {key_path}")
    return identity


# ---- entries ----------------------------------------------------------------------


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as err:
        raise LedgerError(f"time {value!r} is not ISO-8601") from err
    offset = parsed.utcoffset()
    if offset is None or offset.total_seconds() != 0:
        raise LedgerError(f"time {value!r} is not in UTC")
    return parsed


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


_FLOAT_FIELDS = (
    "noise_multiplier",
    "sample_rate",
    "clip_norm",
    "delta",
    "epsilon_run",
    "epsilon_dataset",
    "budget",
)
_INT_FIELDS = ("schema", "round", "steps")
_STR_FIELDS = (
    "site_id",
    "dataset",
    "run_id",
    "accountant",
    "code_version",
    "time",
    "prev_hash",
    "signature",
)


@dataclass(frozen=True)
class LedgerEntry:
    """One round's spend, with the epsilons claimed for it; signed and chained."""

    schema: int
    site_id: str
    dataset: str
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    accountant: str
    epsilon_run: float
    epsilon_dataset: float
    budget: float  # the site's epsilon budget for this data set when the entry was made
    code_version: str
    time: str
    prev_hash: str
    signature: str

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise LedgerError(f"{name} must be an integer, got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, float) or not math.isfinite(value):
                raise LedgerError(f"{name} must be a finite float, got {value!r}")
        for name in _STR_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise LedgerError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.schema != SCHEMA_VERSION:
            raise LedgerError(f"unknown schema {self.schema}; this code reads {SCHEMA_VERSION}")
        if not self.site_id or not self.run_id:
            raise LedgerError("site_id and run_id must not be empty")
        for name in ("dataset", "prev_hash"):
            if not _HEX64.fullmatch(getattr(self, name)):
                raise LedgerError(f"{name} must be 64 lowercase hex digits")
        if self.round < 0:
            raise LedgerError(f"round must be >= 0, got {self.round}")
        try:
            SubsampledGaussianEvent(self.noise_multiplier, self.sample_rate, self.steps)
        except PrivacyError as err:
            raise LedgerError(str(err)) from err
        if self.clip_norm <= 0:
            raise LedgerError(f"clip_norm must be > 0, got {self.clip_norm}")
        if not 0 < self.delta < 1:
            raise LedgerError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant != ACCOUNTANT:
            raise LedgerError(f"accountant must be {ACCOUNTANT!r}, got {self.accountant!r}")
        if self.epsilon_run < 0 or self.epsilon_dataset < 0:
            raise LedgerError("epsilons must be >= 0")
        if self.budget <= 0:
            raise LedgerError(f"budget must be > 0, got {self.budget}")
        _parse_time(self.time)

    @property
    def event(self) -> SubsampledGaussianEvent:
        return SubsampledGaussianEvent(self.noise_multiplier, self.sample_rate, self.steps)

    def signed_bytes(self) -> bytes:
        """The canonical bytes the signature covers: every field but the signature."""
        body = asdict(self)
        del body["signature"]
        return _canonical(body)

    def to_line(self) -> str:
        return _canonical(asdict(self)).decode()

    def entry_hash(self) -> str:
        return hashlib.sha256(self.to_line().encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerEntry:
        """Strict: every field present, none unknown, JSON integers allowed as floats."""
        names = [f.name for f in fields(cls)]
        missing = sorted(set(names) - data.keys())
        unknown = sorted(data.keys() - set(names))
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing fields {missing}")
            if unknown:
                parts.append(f"unknown fields {unknown}")
            raise LedgerError("; ".join(parts))
        values = dict(data)
        for name in _FLOAT_FIELDS:
            value = values[name]
            if isinstance(value, int) and not isinstance(value, bool):
                values[name] = float(value)
        return cls(**values)


def dataset_fingerprint(texts: Sequence[str], labels: Sequence[int]) -> str:
    """Which data set was spent on, whatever order the rows come in: the digests of
    the (text, label) rows are sorted before they are hashed together."""
    if len(texts) != len(labels):
        raise LedgerError(f"{len(texts)} texts but {len(labels)} labels")
    rows = sorted(
        hashlib.sha256(
            json.dumps([str(text), operator.index(label)], separators=(",", ":")).encode()
        ).digest()
        for text, label in zip(texts, labels, strict=True)
    )
    outer = hashlib.sha256(b"fedsilo-dataset-v1\n")
    for row in rows:
        outer.update(row)
    return outer.hexdigest()


# ---- reading ----------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """Something an audit found wrong; ``entry`` is the 1-based line, if any."""

    entry: int | None
    kind: str
    message: str


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse(data: bytes, path: Path) -> tuple[list[tuple[int, LedgerEntry]], list[Finding]]:
    """Entries with their line numbers, and a finding for every line that is not one."""
    if not data:
        return [], []
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    if complete:
        lines.pop()
    entries: list[tuple[int, LedgerEntry]] = []
    findings: list[Finding] = []
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        torn = Finding(
            number,
            "parse",
            f"{path} line {number}: torn or incomplete entry (the site may have crashed "
            "while writing); it is not dropped — inspect and repair by hand",
        )
        if last and not complete:
            findings.append(torn)
            continue
        try:
            obj = json.loads(
                raw.decode("utf-8"),
                parse_constant=_reject_constant,
                object_pairs_hook=_unique_keys,
            )
        except ValueError as err:  # UnicodeDecodeError and JSONDecodeError included
            findings.append(
                torn
                if last
                else Finding(number, "parse", f"{path} line {number}: not valid JSON ({err})")
            )
            continue
        if not isinstance(obj, dict):
            findings.append(Finding(number, "parse", f"{path} line {number}: not a JSON object"))
            continue
        try:
            entries.append((number, LedgerEntry.from_dict(obj)))
        except (LedgerError, TypeError) as err:
            findings.append(Finding(number, "schema", f"{path} line {number}: {err}"))
    return entries, findings


def _read_bytes(path: Path, *, missing_ok: bool) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        if missing_ok:
            return b""
        raise LedgerError(f"{path}: no ledger file") from err
    except OSError as err:
        raise LedgerError(f"{path}: cannot read the ledger ({err})") from err


def read_ledger(path: Path, *, missing_ok: bool = False) -> list[LedgerEntry]:
    """Every entry, or LedgerError at the first line that is not a valid entry."""
    entries, findings = _parse(_read_bytes(path, missing_ok=missing_ok), path)
    if findings:
        raise LedgerError(findings[0].message)
    return [entry for _, entry in entries]


def spent_events(entries: Sequence[LedgerEntry], dataset: str) -> list[SubsampledGaussianEvent]:
    """Everything spent on ``dataset`` by any run: a restarted site starts from this."""
    return [entry.event for entry in entries if entry.dataset == dataset]


# ---- writing ----------------------------------------------------------------------


@contextlib.contextmanager
def _locked(handle: IO[bytes]) -> Iterator[None]:
    """Serialise appenders, so two of them cannot chain onto the same last entry."""
    if sys.platform == "win32":
        yield
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class Ledger:
    """A site's ledger file; ``append`` returns only once the entry is on disk."""

    def __init__(self, path: Path, identity: SiteIdentity) -> None:
        self.path = path
        self.identity = identity

    def entries(self) -> list[LedgerEntry]:
        return read_ledger(self.path, missing_ok=True)

    def append(
        self,
        *,
        site_id: str,
        dataset: str,
        run_id: str,
        round: int,
        event: SubsampledGaussianEvent,
        clip_norm: float,
        delta: float,
        epsilon_run: float,
        epsilon_dataset: float,
        budget: float,
        code_version: str,
        time: str | None = None,
    ) -> LedgerEntry:
        """Sign, chain and durably append one entry. Refuses a ledger that does not
        parse (it is never repaired here), another site's ledger, a round that does not
        follow the run's last one and a time before the last entry's."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with self.path.open("a+b") as handle, _locked(handle):
            handle.seek(0)
            entries, findings = _parse(handle.read(), self.path)
            if findings:
                raise LedgerError(f"refusing to append: {findings[0].message}")
            existing = [entry for _, entry in entries]
            last = existing[-1] if existing else None
            if last is not None and last.site_id != site_id:
                raise LedgerError(f"{self.path} belongs to site {last.site_id!r}, not {site_id!r}")
            rounds = [e.round for e in existing if e.run_id == run_id]
            if rounds and round <= rounds[-1]:
                raise LedgerError(
                    f"run {run_id!r} already recorded round {rounds[-1]}; round {round} "
                    "must come after it"
                )
            if time is None:
                time = _utc_now()
                if last is not None and _parse_time(time) < _parse_time(last.time):
                    time = last.time  # the clock stepped back: keep the ledger ordered
            elif last is not None and _parse_time(time) < _parse_time(last.time):
                raise LedgerError(f"time {time} is before the last entry's {last.time}")
            unsigned = LedgerEntry(
                schema=SCHEMA_VERSION,
                site_id=site_id,
                dataset=dataset,
                run_id=run_id,
                round=round,
                noise_multiplier=float(event.noise_multiplier),
                sample_rate=float(event.sample_rate),
                steps=event.steps,
                clip_norm=float(clip_norm),
                delta=float(delta),
                accountant=ACCOUNTANT,
                epsilon_run=float(epsilon_run),
                epsilon_dataset=float(epsilon_dataset),
                budget=float(budget),
                code_version=code_version,
                time=time,
                prev_hash=last.entry_hash() if last is not None else ZERO_HASH,
                signature="",
            )
            signature = self.identity.sign(unsigned.signed_bytes())
            entry = replace(unsigned, signature=base64.b64encode(signature).decode("ascii"))
            handle.write(entry.to_line().encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            _fsync_dir(self.path.parent)
        return entry


# ---- auditing ---------------------------------------------------------------------


@lru_cache(maxsize=256)
def _pld_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    # dp_accounting is imported here so that writing a ledger does not need it.
    try:
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant
    except ImportError as err:
        raise ImportError("auditing epsilons needs the dp-accounting package") from err
    accountant = pld_privacy_accountant.PLDAccountant(
        value_discretization_interval=PLD_DISCRETIZATION
    )
    for sigma, q, steps in history:
        accountant.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps,
            )
        )
    return float(accountant.get_epsilon(delta))


def recompute_epsilon(events: Sequence[SubsampledGaussianEvent], delta: float) -> float:
    """Epsilon of ``events`` by Google's PLD accountant, independent of Opacus."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    history = tuple(merged_history(events))
    if not history:
        return 0.0
    return _pld_epsilon(history, delta)


def _epsilon_finding(
    number: int, kind: str, recorded: float, reference: float, tolerance: float
) -> Finding | None:
    """Above PRV_MAX_EPSILON the writer records an RDP upper bound: only too low is wrong."""
    slack = tolerance * reference + ABSOLUTE_SLACK
    if recorded > PRV_MAX_EPSILON:
        wrong = recorded < reference - slack
    else:
        wrong = abs(recorded - reference) > slack
    if not wrong:
        return None
    return Finding(
        number,
        kind,
        f"line {number}: recorded {kind.replace('-', '_')} {recorded:.6g} but the "
        f"independent PLD accountant gives {reference:.6g} (tolerance {tolerance:.0%})",
    )


def verify_ledger(
    path: Path, public_key: Ed25519PublicKey | None = None, *, tolerance: float = 0.02
) -> tuple[list[LedgerEntry], list[Finding]]:
    """Audit a ledger: parse, schema, signatures, hash chain, order, one site, every
    claimed epsilon re-derived independently, and no spend above the recorded budget.
    Bad content gives findings, never raises."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise LedgerError(f"tolerance must be a non-negative number, got {tolerance}")
    try:
        data = path.read_bytes()
    except OSError as err:
        return [], [Finding(None, "parse", f"{path}: cannot read the ledger ({err})")]
    numbered, findings = _parse(data, path)

    if public_key is None:
        findings.append(Finding(None, "no-key", "no public key given: signatures not checked"))
    else:
        for number, entry in numbered:
            try:
                signature = base64.b64decode(entry.signature, validate=True)
                public_key.verify(signature, entry.signed_bytes())
            except (binascii.Error, InvalidSignature):
                findings.append(
                    Finding(number, "signature", f"line {number}: signature does not verify")
                )

    by_line = dict(numbered)
    for number, entry in numbered:
        if number == 1:
            expected: str | None = ZERO_HASH
        else:
            before = by_line.get(number - 1)
            expected = before.entry_hash() if before is not None else None  # already flagged
        if expected is not None and entry.prev_hash != expected:
            findings.append(
                Finding(
                    number,
                    "chain",
                    f"line {number}: prev_hash does not match the entry before it "
                    "(an entry was deleted, inserted, reordered or edited)",
                )
            )

    last_round: dict[str, int] = {}
    last_time: datetime | None = None
    for number, entry in numbered:
        previous = last_round.get(entry.run_id)
        if previous is not None and entry.round <= previous:
            findings.append(
                Finding(
                    number,
                    "order",
                    f"line {number}: run {entry.run_id!r} round {entry.round} follows "
                    f"round {previous}",
                )
            )
        last_round[entry.run_id] = max(entry.round, previous if previous is not None else -1)
        moment = _parse_time(entry.time)
        if last_time is not None and moment < last_time:
            findings.append(
                Finding(number, "order", f"line {number}: time {entry.time} goes backwards")
            )
        last_time = moment if last_time is None else max(last_time, moment)

    if numbered:
        site = numbered[0][1].site_id
        for number, entry in numbered:
            if entry.site_id != site:
                findings.append(
                    Finding(
                        number,
                        "site",
                        f"line {number}: site {entry.site_id!r} in the ledger of {site!r}",
                    )
                )

    for index, (number, entry) in enumerate(numbered):
        upto = [e for _, e in numbered[: index + 1]]
        run_events = [e.event for e in upto if e.run_id == entry.run_id]
        dataset_events = spent_events(upto, entry.dataset)
        for kind, recorded, events in (
            ("epsilon-run", entry.epsilon_run, run_events),
            ("epsilon-dataset", entry.epsilon_dataset, dataset_events),
        ):
            try:
                reference = recompute_epsilon(events, entry.delta)
            except (ValueError, ArithmeticError) as err:  # absurd values: report them
                findings.append(
                    Finding(number, kind, f"line {number}: cannot recompute epsilon ({err})")
                )
                continue
            finding = _epsilon_finding(number, kind, recorded, reference, tolerance)
            if finding is not None:
                findings.append(finding)
            if kind == "epsilon-dataset" and max(recorded, reference) > entry.budget * (
                1 + tolerance
            ):
                findings.append(
                    Finding(
                        number,
                        "overspend",
                        f"line {number}: epsilon {max(recorded, reference):.4f} on data set "
                        f"{entry.dataset[:12]}... exceeds the budget {entry.budget:g}",
                    )
                )

    findings.sort(key=lambda f: f.entry if f.entry is not None else 0)
    return [entry for _, entry in numbered], findings
