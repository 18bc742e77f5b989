"""Site file loading: valid files parse; every bad input fails loudly without leaking text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.data import DataValidationError, load_site_file

LABELS = ("neg", "pos")
SECRET = "xyzzy-patient-4471 confidential diagnosis"
SECRET_MARK = "xyzzy"


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def _jsonl(*objs: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def _load_error(path: Path) -> str:
    """Load expecting failure; return the message after the checks every error must pass."""
    with pytest.raises(DataValidationError) as info:
        load_site_file(path, label_names=LABELS)
    message = str(info.value)
    assert path.name in message
    assert "\n" not in message
    assert SECRET_MARK not in message
    return message


# --- valid files -------------------------------------------------------------


def test_csv_loads_texts_labels_and_name(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path / "site_a.csv", "id,text,label\n1,good film,pos\n2,bad film,neg\n")

    # Execute
    ds = load_site_file(path, label_names=LABELS)

    # Assert
    assert ds.name == "site_a"
    assert ds.texts == ("good film", "bad film")
    assert ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [1, 0]
    assert ds.label_names == LABELS
    assert ds.groups is None


def test_csv_custom_columns_crlf_bom_and_explicit_name(tmp_path: Path) -> None:
    # Prepare
    content = '\ufeffbody,y\r\n"multi\r\nline, quoted",neg\r\nplain,pos\r\n'
    path = _write(tmp_path / "d.csv", content)

    # Execute
    ds = load_site_file(path, label_names=LABELS, text_column="body", label_column="y", name="x")

    # Assert
    assert ds.name == "x"
    assert ds.texts == ("multi\r\nline, quoted", "plain")
    assert ds.labels.tolist() == [0, 1]


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson", ".JSONL"])
def test_jsonl_loads_and_matches_integer_labels_as_strings(tmp_path: Path, suffix: str) -> None:
    # Prepare
    path = _write(
        tmp_path / f"d{suffix}",
        _jsonl({"text": "a", "label": 1}, {"text": "b", "label": "0", "extra": None}),
    )

    # Execute
    ds = load_site_file(path, label_names=("0", "1"))

    # Assert
    assert ds.texts == ("a", "b")
    assert ds.labels.tolist() == [1, 0]


def test_jsonl_without_trailing_newline_is_fine(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path / "d.jsonl", _jsonl({"text": "a", "label": "pos"}).rstrip())

    # Execute
    ds = load_site_file(path, label_names=LABELS)

    # Assert
    assert len(ds) == 1


# --- file-level errors -------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "absent.csv"

    # Execute
    message = _load_error(path)

    # Assert
    assert "not found" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "folder.csv"
    path.mkdir()

    # Execute
    message = _load_error(path)

    # Assert
    assert "directory" in message


@pytest.mark.parametrize("suffix", [".parquet", ".txt", ""])
def test_unsupported_suffix_names_supported_ones(tmp_path: Path, suffix: str) -> None:
    # Prepare
    path = _write(tmp_path / f"data{suffix}", "text,label\nx,pos\n")

    # Execute
    message = _load_error(path)

    # Assert
    assert ".csv" in message and ".jsonl" in message and ".ndjson" in message
    assert "Parquet is not supported" in message
    if suffix:
        assert suffix in message


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_zero_byte_file(tmp_path: Path, suffix: str) -> None:
    # Prepare
    path = _write(tmp_path / f"empty{suffix}", b"")

    # Execute
    message = _load_error(path)

    # Assert
    assert "empty file" in message


def test_csv_header_only_has_no_rows(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path / "hdr.csv", "text,label\n")

    # Execute
    message = _load_error(path)

    # Assert
    assert "no data rows" in message


def test_wrong_label_names_argument_type(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path / "d.csv", "text,label\nx,pos\n")

    # Execute / Assert
    with pytest.raises(TypeError, match="label_names"):
        load_site_file(path, label_names="pos")


# --- row-level errors: file name + line number, never the text ----------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_undecodable_bytes_report_line(tmp_path: Path, suffix: str) -> None:
    # Prepare
    if suffix == ".csv":
        good = b"text,label\nok,pos\n"
        bad = SECRET.encode() + b" \xff\xfe,neg\n"
    else:
        good = _jsonl({"text": "ok", "label": "pos"}, {"text": "ok", "label": "neg"}).encode()
        bad = b'{"text": "' + SECRET.encode() + b' \xff", "label": "neg"}\n'
    path = _write(tmp_path / f"enc{suffix}", good + bad)

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 3:" in message
    assert "UTF-8" in message


def test_csv_missing_column_lists_found_columns(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path / "cols.csv", f"body,label\n{SECRET},pos\n")

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 1:" in message
    assert "'text'" in message
    assert "'body'" in message and "'label'" in message


def test_jsonl_missing_key_lists_found_keys(tmp_path: Path) -> None:
    # Prepare
    path = _write(
        tmp_path / "cols.jsonl",
        _jsonl({"text": "ok", "label": "pos"}, {"text": SECRET, "lbl": "neg"}),
    )

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 2:" in message
    assert "'label'" in message and "'lbl'" in message


@pytest.mark.parametrize("blank", ["", "   \t"])
def test_csv_empty_text(tmp_path: Path, blank: str) -> None:
    # Prepare
    path = _write(tmp_path / "t.csv", f"text,label\n{SECRET},pos\n{SECRET},neg\n{blank},pos\n")

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 4: empty text in column 'text'" in message


def test_jsonl_empty_text(tmp_path: Path) -> None:
    # Prepare
    path = _write(
        tmp_path / "t.jsonl",
        _jsonl({"text": SECRET, "label": "pos"}, {"text": " ", "label": "neg"}),
    )

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 2: empty text" in message


def test_csv_empty_label(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path / "l.csv", f"text,label\n{SECRET},pos\n{SECRET},\n")

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 3: empty label in column 'label'" in message


@pytest.mark.parametrize("label", [None, ""])
def test_jsonl_missing_label_value(tmp_path: Path, label: object) -> None:
    # Prepare
    path = _write(tmp_path / "l.jsonl", _jsonl({"text": SECRET, "label": label}))

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 1: empty label" in message


def test_label_outside_declared_set_names_label_and_set(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path / "l.csv", f"text,label\n{SECRET},pos\n{SECRET},neutral\n")

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 3:" in message
    assert "'neutral'" in message
    assert "'neg'" in message and "'pos'" in message


def test_offending_label_is_truncated_to_40_chars(tmp_path: Path) -> None:
    # Prepare: columns swapped by mistake, so the "label" is a long text.
    long_label = "L" * 40 + SECRET
    path = _write(tmp_path / "swap.jsonl", _jsonl({"text": "ok", "label": long_label}))

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 1:" in message
    assert "L" * 40 in message


@pytest.mark.parametrize("label", [1.5, True, ["pos"]])
def test_jsonl_label_of_wrong_type(tmp_path: Path, label: object) -> None:
    # Prepare
    path = _write(
        tmp_path / "l.jsonl",
        _jsonl({"text": "ok", "label": "pos"}, {"text": SECRET, "label": label}),
    )

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 2:" in message
    assert "string or integer" in message


def test_jsonl_invalid_json(tmp_path: Path) -> None:
    # Prepare
    content = _jsonl({"text": "ok", "label": "pos"}) + f'{{"text": "{SECRET}", "label": pos}}\n'
    path = _write(tmp_path / "bad.jsonl", content)

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 2: invalid JSON" in message


@pytest.mark.parametrize("value", [[SECRET, "pos"], SECRET, 3])
def test_jsonl_line_not_an_object(tmp_path: Path, value: object) -> None:
    # Prepare
    path = _write(tmp_path / "arr.jsonl", _jsonl({"text": "ok", "label": "pos"}, value))

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 2: expected a JSON object" in message


@pytest.mark.parametrize("text", [42, [SECRET], {"t": SECRET}])
def test_jsonl_text_not_a_string(tmp_path: Path, text: object) -> None:
    # Prepare
    path = _write(
        tmp_path / "t.jsonl",
        _jsonl({"text": "ok", "label": "pos"}, {"text": text, "label": "neg"}),
    )

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 2: text in column 'text' must be a string" in message


@pytest.mark.parametrize("blank", ["\n", "  \n"])
def test_jsonl_blank_line_in_middle(tmp_path: Path, blank: str) -> None:
    # Prepare
    row = _jsonl({"text": SECRET, "label": "pos"})
    path = _write(tmp_path / "gap.jsonl", row + blank + row)

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 2: blank line" in message


def test_csv_wrong_field_count(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path / "f.csv", f"text,label\n{SECRET},pos\n{SECRET},pos,extra\n")

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 3: expected 2 fields, found 3" in message


def test_csv_line_numbers_count_physical_lines_of_quoted_fields(tmp_path: Path) -> None:
    # Prepare: record 1 spans lines 2-4, so the bad record starts on line 5.
    path = _write(tmp_path / "m.csv", f'text,label\n"{SECRET}\nmore\nmore",pos\n{SECRET},bogus\n')

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 5:" in message


def test_csv_unterminated_quote_is_malformed(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path / "q.csv", f'text,label\nok,pos\n"{SECRET},pos\n')

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 3: malformed CSV" in message


def test_error_on_last_row_aborts_whole_load(tmp_path: Path) -> None:
    # Prepare
    rows = "".join(f"row {i},pos\n" for i in range(1000))
    path = _write(tmp_path / "big.csv", f"text,label\n{rows}{SECRET},nope\n")

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 1002:" in message


def test_csv_without_header_does_not_echo_first_row_as_columns(tmp_path: Path) -> None:
    # Prepare: the header row is missing, so row 1 is read as column names.
    path = _write(tmp_path / "nohdr.csv", f"{SECRET},pos\nother text,neg\n")

    # Execute
    message = _load_error(path)

    # Assert
    assert "line 1: missing column 'text'" in message
    assert "'pos'" in message
    assert "header row missing" in message
