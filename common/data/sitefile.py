"""Loader for a site's own labelled text file (CSV or JSON Lines).

Site data is private: errors name the file, line, columns and offending label
(truncated) so the operator can fix the file, but never echo a row's text,
because error messages end up in logs that may leave the site.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.data.dataset import DataValidationError, TextDataset

__all__ = ["SUPPORTED_SUFFIXES", "load_site_file"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".ndjson")
_MAX_SHOWN = 40  # longest label/column name echoed in an error message
_BOM = b"\xef\xbb\xbf"


def _show(value: str) -> str:
    """Quote a label/column name for a message, truncated so a misplaced text cannot leak."""
    if len(value) <= _MAX_SHOWN:
        return repr(value)
    return repr(value[:_MAX_SHOWN]) + "..."


class _Checker:
    """Turns one row's raw text/label into validated values, with file/line context."""

    def __init__(
        self,
        path: Path,
        label_names: tuple[str, ...] | None,
        text_column: str,
        label_column: str,
        group_column: str | None = None,
    ) -> None:
        self.path = path
        # None: the labels are discovered (label ids are fixed once all are known)
        self.discover = label_names is None
        self.label_names = label_names or ()
        self.index = {name: i for i, name in enumerate(self.label_names)}
        self.text_column = text_column
        self.label_column = label_column
        self.group_column = group_column
        self.columns = tuple(c for c in (text_column, label_column, group_column) if c)

    def error(self, line: int | None, problem: str) -> DataValidationError:
        """One-line error naming the file and (if known) the 1-based line."""
        where = f"{self.path}" if line is None else f"{self.path} line {line}"
        return DataValidationError(f"{where}: {problem}")

    def group(self, line: int, value: str) -> str:
        """A non-empty site value (whitespace-stripped)."""
        value = value.strip()
        if not value:
            raise self.error(line, f"empty value in column {_show(str(self.group_column))}")
        return value

    def text(self, line: int, value: str) -> str:
        """Non-blank text, unchanged."""
        if not value.strip():
            raise self.error(line, f"empty text in column {_show(self.text_column)}")
        return value

    def label(self, line: int, value: str) -> int:
        """Label id of a (whitespace-stripped) label string from the declared set."""
        value = value.strip()
        if not value:
            raise self.error(line, f"empty label in column {_show(self.label_column)}")
        if value not in self.index and self.discover:
            self.index[value] = len(self.index)
        if value not in self.index:
            raise self.error(
                line,
                f"label {_show(value)} in column {_show(self.label_column)} "
                f"is not one of the declared labels {list(self.label_names)}",
            )
        return self.index[value]


def _decoded_lines(path: Path, checker: _Checker) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its ending) from strict UTF-8, failing at the bad line."""
    data = path.read_bytes()
    if not data:
        raise checker.error(None, "empty file (0 bytes)")
    data = data.removeprefix(_BOM)
    for line_no, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            yield line_no, raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            raise checker.error(
                line_no, f"not valid UTF-8 (byte {exc.start + 1} of the line)"
            ) from None


def _column_list(columns: Sequence[str]) -> str:
    """Found column names for a message.

    A CSV without its header row makes the first data row look like column
    names, so only short whitespace-free names are echoed; others show as a
    length placeholder.
    """
    shown = [
        repr(c)
        if 0 < len(c) <= _MAX_SHOWN and not any(ch.isspace() for ch in c)
        else f"<{len(c)}-char name not shown>"
        for c in columns
    ]
    return "[" + ", ".join(shown) + "]"


_Rows = tuple[list[str], list[int], list[str]]


def _read_csv(path: Path, checker: _Checker) -> _Rows:
    """Parse a CSV with a mandatory header row."""
    lines = list(_decoded_lines(path, checker))
    reader = csv.reader((text for _, text in lines), strict=True)
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    header: list[str] | None = None
    text_idx = label_idx = group_idx = -1
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            # csv.Error messages describe syntax (quotes, NUL), never field contents.
            raise checker.error(start, f"malformed CSV record ({exc})") from None
        if not row:
            raise checker.error(start, "blank line")
        if header is None:
            header = row
            duplicates = sorted({c for c in header if header.count(c) > 1})
            if duplicates:
                raise checker.error(start, f"duplicate column names {_column_list(duplicates)}")
            for column in checker.columns:
                if column not in header:
                    raise checker.error(
                        start,
                        f"missing column {_show(column)}; columns found: "
                        f"{_column_list(header)} (is the header row missing?)",
                    )
            text_idx = header.index(checker.text_column)
            label_idx = header.index(checker.label_column)
            if checker.group_column:
                group_idx = header.index(checker.group_column)
            continue
        if len(row) != len(header):
            raise checker.error(start, f"expected {len(header)} fields, found {len(row)}")
        texts.append(checker.text(start, row[text_idx]))
        labels.append(checker.label(start, row[label_idx]))
        if group_idx >= 0:
            groups.append(checker.group(start, row[group_idx]))
    if header is None:
        raise checker.error(None, "no header row")
    return texts, labels, groups


def _json_label(checker: _Checker, line: int, value: Any) -> str:
    """JSON label as a string: integers match as their decimal form ("1")."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise checker.error(
        line,
        f"label in column {_show(checker.label_column)} must be a string or integer, "
        f"found {type(value).__name__}",
    )


def _read_jsonl(path: Path, checker: _Checker) -> _Rows:
    """Parse JSON Lines: one object per line, no blank lines except the final newline."""
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    for line_no, line in _decoded_lines(path, checker):
        if not line.strip():
            raise checker.error(line_no, "blank line")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            # exc.msg is the parser's description only; exc.doc (the line) is never shown.
            raise checker.error(
                line_no, f"invalid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise checker.error(line_no, f"expected a JSON object, found {type(obj).__name__}")
        for column in checker.columns:
            if column not in obj:
                raise checker.error(
                    line_no,
                    f"missing column {_show(column)}; columns found: {_column_list(list(obj))}",
                )
        text = obj[checker.text_column]
        if not isinstance(text, str):
            raise checker.error(
                line_no,
                f"text in column {_show(checker.text_column)} must be a string, found {type(text).__name__}",
            )
        texts.append(checker.text(line_no, text))
        labels.append(
            checker.label(line_no, _json_label(checker, line_no, obj[checker.label_column]))
        )
        if checker.group_column:
            value = obj[checker.group_column]
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise checker.error(
                    line_no,
                    f"value in column {_show(checker.group_column)} must be a string or "
                    f"integer, found {type(value).__name__}",
                )
            groups.append(checker.group(line_no, str(value)))
    return texts, labels, groups


def load_site_file(
    path: str | Path,
    *,
    label_names: Sequence[str] | None,
    text_column: str = "text",
    label_column: str = "label",
    name: str | None = None,
    group_column: str | None = None,
) -> TextDataset:
    """Load and fully validate a site's labelled text file; any problem aborts the whole load.

    ``.csv`` needs a header row; ``.jsonl``/``.ndjson`` hold one JSON object per
    line. Labels are matched as (whitespace-stripped) strings against
    ``label_names``, whose order defines the label ids. ``label_names=None`` reads
    the label set from the file instead (sorted): only a simulation does that, once,
    before it writes the run's task file. ``group_column`` (simulation's
    ``site-column``) fills the data set's groups.
    """
    if isinstance(label_names, str):
        raise TypeError("label_names must be a sequence of label strings, not a single string")
    declared = None if label_names is None else tuple(label_names)
    if declared is not None and (
        not declared or any(not isinstance(n, str) or not n.strip() for n in declared)
    ):
        raise ValueError("label_names must be a non-empty sequence of non-empty strings")
    if declared is not None and len(set(declared)) != len(declared):
        raise ValueError("label_names must be unique")
    if text_column == label_column:
        raise ValueError(f"text_column and label_column must differ, both are {text_column!r}")
    if group_column is not None and group_column in (text_column, label_column):
        raise ValueError(f"the site column {group_column!r} must differ from text and label")

    file_path = Path(path)
    checker = _Checker(file_path, declared, text_column, label_column, group_column)
    if not file_path.exists():
        raise checker.error(None, "file not found")
    if file_path.is_dir():
        raise checker.error(None, "is a directory, expected a data file")
    suffix = file_path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise checker.error(
            None,
            f"unsupported file type {suffix or '(no suffix)'!r}; supported: "
            f"{', '.join(SUPPORTED_SUFFIXES)} (Parquet is not supported; convert to CSV or JSON Lines)",
        )
    try:
        texts, labels, groups = (_read_csv if suffix == ".csv" else _read_jsonl)(file_path, checker)
    except OSError as exc:
        raise checker.error(
            None, f"cannot read file ({exc.strerror or type(exc).__name__})"
        ) from None
    if not texts:
        raise checker.error(None, "no data rows")
    ids = np.asarray(labels, dtype=np.int64)
    names = tuple(checker.index)
    if checker.discover:  # sorted names, so the order does not depend on the rows' order
        names = tuple(sorted(names))
        remap = np.asarray([names.index(n) for n in checker.index], dtype=np.int64)
        ids = remap[ids]
    return TextDataset(
        name=name if name is not None else file_path.stem,
        texts=tuple(texts),
        labels=ids,
        label_names=names,
        groups=tuple(groups) if group_column else None,
    )
