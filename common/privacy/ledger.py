"""An append-only, hash-chained, signed ledger of a site's privacy spend.

A site appends one line per round *before* it sends its update, so a crash can never
leave spend unrecorded. Each line carries the raw mechanism (sigma, q, steps) next to
the epsilons the site claimed, signed with the site's identity key
(common/privacy/identity.py); the auditor (common/privacy/audit.py) re-derives those
epsilons independently and checks the signatures and the hash chain.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import operator
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from common.privacy.errors import LedgerError, PrivacyError
from common.privacy.events import SubsampledGaussianEvent
from common.privacy.identity import SiteIdentity, fsync_dir

if sys.platform != "win32":
    import fcntl

LEDGER_FILE = "ledger.jsonl"  # in the site's state folder, beside its identity key
SCHEMA_VERSION = 1
ACCOUNTANT = "prv"
ZERO_HASH = "0" * 64

_HEX64 = re.compile(r"[0-9a-f]{64}")


# ---- entries ----------------------------------------------------------------------


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def parse_time(value: str) -> datetime:
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
        parse_time(self.time)

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


def parse_ledger(data: bytes, path: Path) -> tuple[list[tuple[int, LedgerEntry]], list[Finding]]:
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
    entries, findings = parse_ledger(_read_bytes(path, missing_ok=missing_ok), path)
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
            entries, findings = parse_ledger(handle.read(), self.path)
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
                if last is not None and parse_time(time) < parse_time(last.time):
                    time = last.time  # the clock stepped back: keep the ledger ordered
            elif last is not None and parse_time(time) < parse_time(last.time):
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
            fsync_dir(self.path.parent)
        return entry
