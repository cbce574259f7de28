"""Customer lists to upload: a CSV file, a Polars DataFrame or records, read a chunk at a time.

The columns are those `cleanroom upload-list` reads: `email`, `phone` and `attribute` (raw
identifiers, normalized and hashed by the service on arrival), or `email_token`, `phone_token` and
`attribute` (tokens written by `cleanroom prep`, so raw identifiers never leave the partner). Other
columns are ignored; an empty cell is an absent value. Errors name the file and the line, never a
value read from it.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, TextIO, Union

import polars as pl

from .errors import UsageError
from .models import UploadProgress

#: Columns that identify a customer: at least one must be there.
IDENTIFIER_COLUMNS = ("email", "phone", "email_token", "phone_token")
#: Every column a list record has.
LIST_COLUMNS = IDENTIFIER_COLUMNS + ("attribute",)
#: Records per streamed message, as the Rust client sends them.
CHUNK_RECORDS = 2000

#: One customer record: the five columns, "" where absent.
Record = dict[str, str]
#: What `Client.upload_list` takes.
ListInput = Union[str, os.PathLike[str], pl.DataFrame, Iterable[Mapping[str, Any]]]
#: A chunk of records, and the bytes of the file read so far (None when not a file).
Chunk = tuple[list[Record], Optional[int]]


class ListSource:
    """Records to upload, readable again from the start for each attempt."""

    #: What is uploaded, for progress and errors.
    name: str = "records"
    total_records: Optional[int] = None
    total_bytes: Optional[int] = None

    def chunks(self, size: int = CHUNK_RECORDS) -> Iterator[Chunk]:
        raise NotImplementedError


class CsvListSource(ListSource):
    """A CSV file with a header row, read a chunk at a time (any length, bounded memory)."""

    def __init__(self, path: Union[str, os.PathLike[str]]) -> None:
        self.path = Path(path)
        self.name = str(path)
        self.total_bytes = self.path.stat().st_size
        with _OpenCsv(self.path) as (_, text):
            self.header = _header(self.name, self._next(csv.reader(text)) or [])

    def chunks(self, size: int = CHUNK_RECORDS) -> Iterator[Chunk]:
        with _OpenCsv(self.path) as (raw, text):
            reader = csv.reader(text)
            header = _header(self.name, self._next(reader) or [])
            positions = [(column, header.index(column)) for column in LIST_COLUMNS if column in header]
            records: list[Record] = []
            while True:
                row = self._next(reader)
                if row is None:
                    break
                if not row:
                    continue  # a blank line, as the csv crate skips it
                if len(row) != len(header):
                    raise UsageError(
                        f"{self.name}: line {reader.line_num} has {len(row)} fields where the header has {len(header)}"
                    )
                record = dict.fromkeys(LIST_COLUMNS, "")
                for column, at in positions:
                    record[column] = row[at]
                records.append(record)
                if len(records) == size:
                    yield records, raw.tell()
                    records = []
            if records:
                yield records, raw.tell()

    def _next(self, reader: Any) -> Optional[list[str]]:
        """The next row, None at the end; a file that is not UTF-8 text or not CSV is a UsageError
        naming the line, not its content."""
        try:
            row: Optional[list[str]] = next(reader, None)
            return row
        except UnicodeDecodeError:
            raise UsageError(f"{self.name}: not UTF-8 text (save the list as UTF-8)") from None
        except csv.Error as error:
            raise UsageError(f"{self.name}: line {reader.line_num}: {error}") from None


class _OpenCsv:
    """A CSV file opened for reading text, with the binary file under it (for the bytes read)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> tuple[io.BufferedReader, TextIO]:
        self.raw = open(self.path, "rb")  # noqa: SIM115 - closed in __exit__
        # utf-8-sig: a byte order mark (as spreadsheet programs write) is not part of the header.
        self.text = io.TextIOWrapper(self.raw, encoding="utf-8-sig", newline="")
        return self.raw, self.text

    def __exit__(self, *exc: object) -> None:
        self.text.close()


def _header(name: str, header: Sequence[str]) -> list[str]:
    columns = [c.strip() for c in header]
    if not any(c in IDENTIFIER_COLUMNS for c in columns):
        raise UsageError(
            f"{name}: the header has none of the columns {', '.join(IDENTIFIER_COLUMNS)} "
            "(a list is email,phone,attribute or email_token,phone_token,attribute)"
        )
    return columns


class RecordsListSource(ListSource):
    """Records in memory: a Polars DataFrame, or mappings with the list's column names."""

    def __init__(self, records: Union[pl.DataFrame, Iterable[Mapping[str, Any]]]) -> None:
        if isinstance(records, pl.DataFrame):
            self.name = "DataFrame"
            self.records = dataframe_records(records)
        else:
            self.name = "records"
            self.records = [_record(i + 1, row) for i, row in enumerate(records)]
        self.total_records = len(self.records)

    def chunks(self, size: int = CHUNK_RECORDS) -> Iterator[Chunk]:
        for start in range(0, len(self.records), size):
            yield self.records[start:start + size], None


def list_source(source: Union[ListInput, ListSource]) -> ListSource:
    """The source for what `Client.upload_list` was given (a file is checked for its header now)."""
    if isinstance(source, ListSource):
        return source
    if isinstance(source, (str, os.PathLike)):
        return CsvListSource(source)
    if isinstance(source, pl.DataFrame):
        return RecordsListSource(source)
    if isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
        return RecordsListSource(source)
    raise UsageError(f"cannot upload a {type(source).__name__}: give a CSV file's path, a Polars DataFrame or records")


def read_list_csv(path: Union[str, os.PathLike[str]]) -> list[Record]:
    """Every record of a list file at once (small files; `Client.upload_list` streams a path)."""
    return [record for records, _ in CsvListSource(path).chunks() for record in records]


def dataframe_records(frame: pl.DataFrame) -> list[Record]:
    """A DataFrame's list columns as records. Identifier columns must be text (a phone number
    read as an integer has lost its leading zero: read the file with
    `schema_overrides={"phone": pl.Utf8}`); the attribute may be of any type and is sent as
    text. Nulls are absent values."""
    present = [c for c in LIST_COLUMNS if c in frame.columns]
    if not any(c in IDENTIFIER_COLUMNS for c in present):
        raise UsageError(
            f"the DataFrame has none of the columns {', '.join(IDENTIFIER_COLUMNS)} (its columns: "
            f"{', '.join(frame.columns)})"
        )
    selected = []
    for column in present:
        dtype = frame.schema[column]
        if column in IDENTIFIER_COLUMNS and dtype not in (pl.Utf8, pl.Null):
            raise UsageError(
                f"column {column} of the DataFrame is {dtype}, not text: an identifier read as a number "
                f"loses leading zeros (read it with schema_overrides={{{column!r}: pl.Utf8}})"
            )
        selected.append(pl.col(column).cast(pl.Utf8).fill_null(""))
    rows = frame.select(selected).iter_rows(named=True)
    return [{**dict.fromkeys(LIST_COLUMNS, ""), **row} for row in rows]


def _record(index: int, row: Mapping[str, Any]) -> Record:
    if not isinstance(row, Mapping):
        raise UsageError(f"record {index} is a {type(row).__name__}, not a mapping of column names to values")
    record = dict.fromkeys(LIST_COLUMNS, "")
    for column in LIST_COLUMNS:
        value = row.get(column)
        if value is None:
            continue
        if column in IDENTIFIER_COLUMNS and not isinstance(value, str):
            raise UsageError(f"record {index}: {column} is a {type(value).__name__}, not text")
        record[column] = str(value)
    return record


# ---------------------------------------------------------------------------------------------
# Progress

ProgressCallback = Callable[[UploadProgress], None]


class StderrProgress:
    """Progress on standard error: one line rewritten in place on a terminal, else a line every
    `every` seconds and a last one when the service has answered."""

    def __init__(self, stream: Optional[TextIO] = None, every: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # None until the first line: the monotonic clock starts near 0 at boot, so "0.0" would
        # hide the first line on a machine up for less than `every` seconds.
        self.last: Optional[float] = None

    def __call__(self, progress: UploadProgress) -> None:
        now = time.monotonic()
        recent = self.last is not None and now - self.last < self.every
        if not progress.done and not self.tty and recent:
            return
        self.last = now
        text = f"upload {progress.source}: {progress.records_sent:,} records sent"
        fraction = progress.fraction()
        if progress.total_records is not None:
            text += f" of {progress.total_records:,}"
        if fraction is not None:
            text += f" ({fraction:.0%})"
        if progress.attempt > 1:
            text += f", attempt {progress.attempt}"
        if progress.done:
            text += ", answered"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if progress.done else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def progress_callback(progress: Union[bool, ProgressCallback, None]) -> Optional[ProgressCallback]:
    """`True`: a StderrProgress; a callable: itself; `False`/None: no progress."""
    if progress is True:
        return StderrProgress()
    if not progress:
        return None
    if callable(progress):
        return progress
    raise UsageError("progress must be True, False or a callable taking an UploadProgress")
