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
import hmac
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
SCHEMA_VERSION = 2  # what this code writes; schema 1 ledgers are still read and audited
ACCOUNTANT = "prv+rdp-filter"  # schema 2: the run's PRV epsilon and the lifetime filter's
ACCOUNTANT_V1 = "prv"
ZERO_HASH = "0" * 64
# The budget an entry is charged to: the whole site (the default), or one data set the
# site declared disjoint from all its others (node config ``disjoint-data-set``).
SITE_SCOPE = "site"
DATA_SET_SCOPE = "data-set:"
# The private federated evaluation's releases (noisy per-class counts of the site's
# held-out share): rows no training round ever touches, by construction
# (common/data/holdout.py), so this scope and every training scope compose in parallel.
EVAL_SCOPE = "eval"
_SCOPE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

_HEX64 = re.compile(r"[0-9a-f]{64}")


def scope_of(disjoint_data_set: str | None) -> str:
    """The budget scope of a site's rounds: the site, or its declared disjoint data set."""
    if disjoint_data_set is None:
        return SITE_SCOPE
    if not _SCOPE_NAME.fullmatch(disjoint_data_set):
        raise LedgerError(
            f"disjoint data set name {disjoint_data_set!r}: use 1-64 letters, digits, '.', '_', '-'"
        )
    return DATA_SET_SCOPE + disjoint_data_set


def _scope_problem(scope: str) -> str | None:
    if scope in (SITE_SCOPE, EVAL_SCOPE):
        return None
    if scope.startswith(DATA_SET_SCOPE) and _SCOPE_NAME.fullmatch(scope[len(DATA_SET_SCOPE) :]):
        return None
    return (
        f"scope must be {SITE_SCOPE!r}, {EVAL_SCOPE!r} or '{DATA_SET_SCOPE}<name>', got {scope!r}"
    )


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
# Fields only one schema has (None in the other).
_V1_FLOATS = ("epsilon_dataset",)
_V2_FLOATS = ("epsilon_target", "epsilon_lifetime")
_V2_INTS = ("rounds", "public_size")
_V2_STRS = ("scope",)
_ONLY = {1: _V1_FLOATS, 2: (*_V2_FLOATS, *_V2_INTS, *_V2_STRS)}


@dataclass(frozen=True)
class LedgerEntry:
    """One round's spend, with the epsilons claimed for it; signed and chained.

    Schema 2 (written now) is charged BEFORE the round touches the site's data, and
    also freezes the run's plan: the first entry of a run fixes sigma, q, steps per
    round, the planned rounds and the run's target; later rounds must match it.
    Schema 1 entries (per-data-set budgets, written after training) are still read,
    verified and composed, conservatively, into every budget of the site."""

    schema: int
    site_id: str
    dataset: str  # schema 2: HMAC of the data with the site's secret key (never sent)
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    accountant: str
    epsilon_run: float  # PRV epsilon of this run's entries so far (a fixed history)
    budget: float  # schema 2: the scope's lifetime budget; schema 1: the data set's
    code_version: str
    time: str
    prev_hash: str
    signature: str
    epsilon_dataset: float | None = None  # schema 1 only
    scope: str | None = None  # schema 2 only, and below
    rounds: int | None = None  # the run's planned rounds
    public_size: int | None = None  # the examples the site declared public
    epsilon_target: float | None = None  # the run's target epsilon (PRV)
    epsilon_lifetime: float | None = None  # the adaptive filter over the whole scope

    def __post_init__(self) -> None:
        if isinstance(self.schema, bool) or self.schema not in _ONLY:
            raise LedgerError(f"unknown schema {self.schema!r}; this code reads 1 and 2")
        own = _ONLY[self.schema]
        other = [n for s, names in _ONLY.items() if s != self.schema for n in names]
        ints = _INT_FIELDS + tuple(n for n in _V2_INTS if n in own)
        floats = _FLOAT_FIELDS + tuple(n for n in (*_V1_FLOATS, *_V2_FLOATS) if n in own)
        strs = _STR_FIELDS + tuple(n for n in _V2_STRS if n in own)
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise LedgerError(f"{name} must be an integer, got {value!r}")
        for name in floats:
            value = getattr(self, name)
            if not isinstance(value, float) or not math.isfinite(value):
                raise LedgerError(f"{name} must be a finite float, got {value!r}")
        for name in strs:
            if not isinstance(getattr(self, name), str):
                raise LedgerError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in other:
            if getattr(self, name) is not None:
                raise LedgerError(f"schema {self.schema} has no field {name}")
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
        expected = ACCOUNTANT if self.schema == 2 else ACCOUNTANT_V1
        if self.accountant != expected:
            raise LedgerError(f"accountant must be {expected!r}, got {self.accountant!r}")
        if self.epsilon_run < 0 or self.spent < 0:
            raise LedgerError("epsilons must be >= 0")
        if self.budget <= 0:
            raise LedgerError(f"budget must be > 0, got {self.budget}")
        if self.schema == 2:
            problem = _scope_problem(str(self.scope))
            if problem:
                raise LedgerError(problem)
            if self.rounds is None or self.rounds < 1 or self.round > self.rounds:
                raise LedgerError(f"round {self.round} is not within the planned {self.rounds}")
            if self.public_size is None or self.public_size < 1:
                raise LedgerError(f"public_size must be >= 1, got {self.public_size}")
            if self.epsilon_target is None or self.epsilon_target <= 0:
                raise LedgerError(f"epsilon_target must be > 0, got {self.epsilon_target}")
        parse_time(self.time)

    @property
    def event(self) -> SubsampledGaussianEvent:
        return SubsampledGaussianEvent(self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def spent(self) -> float:
        """What the site claimed spent of its budget after this entry: schema 2 the
        lifetime filter's epsilon over the scope, schema 1 the data set's PRV epsilon."""
        value = self.epsilon_lifetime if self.schema == 2 else self.epsilon_dataset
        assert value is not None  # __post_init__ checked it
        return value

    @property
    def budget_scope(self) -> str:
        """Schema 1 entries have no scope: they count against every budget of the site."""
        return self.scope if self.scope is not None else SITE_SCOPE

    def body(self) -> dict[str, Any]:
        """The fields this entry's schema has (what is written and hashed)."""
        skip = {n for s, names in _ONLY.items() if s != self.schema for n in names}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def signed_bytes(self) -> bytes:
        """The canonical bytes the signature covers: every field but the signature."""
        body = self.body()
        del body["signature"]
        return _canonical(body)

    def to_line(self) -> str:
        return _canonical(self.body()).decode()

    def entry_hash(self) -> str:
        return hashlib.sha256(self.to_line().encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerEntry:
        """Strict: every field of the entry's schema present, none unknown, JSON
        integers allowed as floats. Malformed values raise LedgerError, never crash."""
        schema = data.get("schema")
        if isinstance(schema, bool) or schema not in _ONLY:
            raise LedgerError(f"unknown schema {schema!r}; this code reads 1 and 2")
        skip = {n for s, names in _ONLY.items() if s != schema for n in names}
        names = [f.name for f in fields(cls) if f.name not in skip]
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
        for name in (*_FLOAT_FIELDS, *_V1_FLOATS, *_V2_FLOATS):
            value = values.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                try:
                    values[name] = float(value)
                except OverflowError:
                    raise LedgerError(f"{name} is an integer too large for a float") from None
        return cls(**values)


def row_digest(texts: Sequence[str], labels: Sequence[int]) -> bytes:
    """The content of a data set, whatever order the rows come in: the digests of the
    (text, label) rows, sorted, hashed together (simulated sites' partitions)."""
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
    return outer.digest()


def file_digest(path: Path) -> bytes:
    """The bytes of a site's data file, hashed (read, not parsed: nothing about the
    content can make this fail before the round is charged)."""
    digest = hashlib.sha256(b"fedsilo-file-v1\n")
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


def dataset_fingerprint(key: bytes, digest: bytes) -> str:
    """What the ledger records of the data a round spent on: an HMAC-SHA256 of its
    digest with the site's secret fingerprint key (common/privacy/identity.py), so the
    ledger heads the coordinator receives cannot be tested against guessed data sets;
    an auditor given the key checks it (``fedsilo audit fingerprint``)."""
    if len(key) < 32:
        raise LedgerError("a fingerprint key has at least 32 bytes")
    return hmac.new(key, b"fedsilo-dataset-v2\n" + digest, hashlib.sha256).hexdigest()


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
        except RecursionError:  # nested too deeply to be an entry
            findings.append(Finding(number, "parse", f"{path} line {number}: nested too deeply"))
            continue
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
    """Schema 1's budget: everything spent on ``dataset`` by any run (how a schema 1
    entry's ``epsilon_dataset`` was computed, which the auditor re-derives)."""
    return [entry.event for entry in entries if entry.dataset == dataset]


def charges(entry: LedgerEntry, scope: str) -> bool:
    """Whether ``entry`` counts against budget ``scope``: the site's budget composes
    every training entry; a declared disjoint data set its own and every site-wide one
    (schema 1 included); the evaluation scope only its own, and no training scope
    composes it: held-out rows are never trained on, so the two compose in parallel."""
    if (entry.budget_scope == EVAL_SCOPE) != (scope == EVAL_SCOPE):
        return False
    return scope in (SITE_SCOPE, EVAL_SCOPE) or entry.budget_scope in (scope, SITE_SCOPE)


def charged_to(entries: Sequence[LedgerEntry], scope: str) -> list[LedgerEntry]:
    """The entries a budget scope composes (``charges``), in ledger order."""
    return [e for e in entries if charges(e, scope)]


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
        rounds: int,
        public_size: int,
        epsilon_target: float,
        epsilon_run: float,
        epsilon_lifetime: float,
        budget: float,
        code_version: str,
        scope: str = SITE_SCOPE,
        time: str | None = None,
    ) -> LedgerEntry:
        """Sign, chain and durably append one (schema 2) entry. Refuses a ledger that
        does not parse (it is never repaired here), another site's ledger, a round that
        does not follow the run's last one and a time before the last entry's."""
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
            done = [e.round for e in existing if e.run_id == run_id]
            if done and round <= done[-1]:
                raise LedgerError(
                    f"run {run_id!r} already recorded round {done[-1]}; round {round} "
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
                budget=float(budget),
                scope=scope,
                rounds=rounds,
                public_size=public_size,
                epsilon_target=float(epsilon_target),
                epsilon_lifetime=float(epsilon_lifetime),
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
