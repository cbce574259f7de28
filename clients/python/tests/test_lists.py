"""Customer lists: CSV files, DataFrames and records to the records UploadList carries."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import pytest

from cleanroom_client import LIST_COLUMNS, StderrProgress, UploadProgress, UsageError, dataframe_records, read_list_csv
from cleanroom_client.lists import CsvListSource, RecordsListSource, list_source

EMPTY = dict.fromkeys(LIST_COLUMNS, "")


def write(tmp_path: Path, text: str, name: str = "list.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_raw_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "email,phone,attribute\na@example.jp,,gold\n,090-1234-5678,silver\n")
    assert read_list_csv(path) == [
        {**EMPTY, "email": "a@example.jp", "attribute": "gold"},
        {**EMPTY, "phone": "090-1234-5678", "attribute": "silver"},
    ]


def test_token_columns_from_prep_other_columns_ignored(tmp_path: Path) -> None:
    # The column order of the file does not matter; columns the service does not take are dropped.
    path = write(tmp_path, "note,attribute,phone_token,email_token\nx,KK-10,v1.p,v1.e\n")
    assert read_list_csv(path) == [{**EMPTY, "email_token": "v1.e", "phone_token": "v1.p", "attribute": "KK-10"}]


def test_byte_order_mark_quotes_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, 'email,attribute\r\n"a,b@example.jp",gold\r\n\r\nc@example.jp,\r\n', encoding="utf-8-sig")
    assert read_list_csv(path) == [
        {**EMPTY, "email": "a,b@example.jp", "attribute": "gold"},
        {**EMPTY, "email": "c@example.jp"},
    ]


def test_a_row_that_does_not_match_the_header_names_its_line_not_its_values(tmp_path: Path) -> None:
    path = write(tmp_path, "email,phone,attribute\na@example.jp,,gold\nsecret@example.jp,gold\n")
    with pytest.raises(UsageError, match=r"list.csv: line 3 has 2 fields where the header has 3") as caught:
        read_list_csv(path)
    assert "secret" not in str(caught.value)


def test_text_that_is_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, "email,attribute\na@example.jp,gold\nb@example.jp,gold\n")
    path.write_bytes(path.read_bytes() + "c@example.jp,ゴールド\n".encode("shift_jis"))
    with pytest.raises(UsageError, match=r"list.csv: not UTF-8 text \(save the list as UTF-8\)"):
        read_list_csv(path)


def test_a_header_without_identifiers_is_refused_before_reading(tmp_path: Path) -> None:
    path = write(tmp_path, "name,attribute\nTaro,gold\n")
    with pytest.raises(UsageError, match="none of the columns email, phone, email_token, phone_token"):
        CsvListSource(path)


def test_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list_source(tmp_path / "nope.csv")


def test_files_are_read_in_chunks_with_bytes_read(tmp_path: Path) -> None:
    path = write(tmp_path, "email,attribute\n" + "".join(f"m{i}@example.jp,gold\n" for i in range(5000)))
    source = CsvListSource(path)
    chunks = list(source.chunks(2000))
    assert [len(records) for records, _ in chunks] == [2000, 2000, 1000]
    assert chunks[-1][1] == source.total_bytes == path.stat().st_size
    assert chunks[0][0][0] == {**EMPTY, "email": "m0@example.jp", "attribute": "gold"}
    assert chunks[2][0][-1]["email"] == "m4999@example.jp"
    # Each attempt of an upload reads the file again from its start.
    assert [len(records) for records, _ in source.chunks(2000)] == [2000, 2000, 1000]


def test_dataframe_nulls_are_absent_values_and_the_attribute_becomes_text() -> None:
    frame = pl.DataFrame({
        "email": ["a@example.jp", None],
        "phone": [None, "0312345678"],
        "attribute": [1, 2],
        "other": ["x", "y"],
    })
    assert dataframe_records(frame) == [
        {**EMPTY, "email": "a@example.jp", "attribute": "1"},
        {**EMPTY, "phone": "0312345678", "attribute": "2"},
    ]


def test_dataframe_identifiers_must_be_text() -> None:
    # pl.read_csv reads a phone column as integers: the leading zero is gone.
    frame = pl.read_csv(io.BytesIO(b"phone,attribute\n0312345678,gold\n"))
    with pytest.raises(UsageError, match=r"column phone of the DataFrame is Int64.*schema_overrides"):
        dataframe_records(frame)
    kept = pl.read_csv(io.BytesIO(b"phone,attribute\n0312345678,gold\n"), schema_overrides={"phone": pl.Utf8})
    assert dataframe_records(kept) == [{**EMPTY, "phone": "0312345678", "attribute": "gold"}]


def test_dataframe_without_identifiers() -> None:
    with pytest.raises(UsageError, match="none of the columns"):
        dataframe_records(pl.DataFrame({"attribute": ["gold"]}))


def test_records_and_their_chunks() -> None:
    source = list_source([{"email": f"m{i}@example.jp", "attribute": "gold", "ignored": 1} for i in range(4500)])
    assert isinstance(source, RecordsListSource) and source.total_records == 4500
    assert [len(records) for records, _ in source.chunks(2000)] == [2000, 2000, 500]
    with pytest.raises(UsageError, match="record 1: phone is a int, not text"):
        list_source([{"phone": 312345678}])
    with pytest.raises(UsageError, match="not a mapping"):
        list_source([("a@example.jp", "gold")])  # type: ignore[list-item]
    with pytest.raises(UsageError, match="cannot upload a int"):
        list_source(3)  # type: ignore[arg-type]


def test_stderr_progress_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    show = StderrProgress(out, every=3600)
    show(UploadProgress("list.csv", 2000, bytes_read=50, total_bytes=200))
    show(UploadProgress("list.csv", 4000, bytes_read=100, total_bytes=200))  # within `every`: not shown
    show(UploadProgress("DataFrame", 4982, total_records=4982, attempt=2, done=True))
    assert out.getvalue().splitlines() == [
        "upload list.csv: 2,000 records sent (25%)",
        "upload DataFrame: 4,982 records sent of 4,982 (100%), attempt 2, answered",
    ]
