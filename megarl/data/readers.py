"""Read dataset rows with their 1-based row numbers, so every report can point at a row.

A jsonl row is a line (blank lines are skipped but counted, so row numbers are line numbers). A line
that cannot be a row (not UTF-8, not JSON, not a JSON object) is yielded as a `BadRow` with a one-line
reason and reading goes on: normalisation rejects it like any other bad row, so `data check` reports
it and training skips it (`data.on_bad_row: reject`) or stops (`fail`). Only a dataset that cannot be
read at all (missing, a directory, not a parquet file) raises, as one `DatasetError` naming the path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class BadRow:
    """A line that is not a row: `kind` (bad_encoding, bad_json, not_an_object), a one-line
    `detail`, and the line's `text` (undecodable bytes replaced) for the rejected-rows file."""

    kind: str
    detail: str
    text: str


def dataset_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    if path.endswith((".jsonl", ".json")):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    raise DatasetError(f"{path}: cannot tell the format from the extension; set data.format (jsonl or parquet)")


def _check_readable(path: str) -> None:
    if os.path.isdir(path):
        raise DatasetError(f"{path}: is a directory; expected a .jsonl or .parquet file")
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise DatasetError(f"{path}: cannot be read (permission denied)")


def parse_line(raw: bytes, first: bool = False) -> dict | BadRow | None:
    """One jsonl line -> a row dict, a BadRow saying why it is not one, or None for a blank line."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        return BadRow("bad_encoding", f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)",
                      raw.decode("utf-8", errors="replace").rstrip("\r\n"))
    if not line.strip():
        return None
    text = line.rstrip("\r\n")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return BadRow("bad_json", f"not valid JSON ({e.msg} at column {e.colno})", text)
    except (ValueError, RecursionError) as e:  # e.g. nesting deeper than the parser's recursion limit
        return BadRow("bad_json", f"not valid JSON ({type(e).__name__}: {str(e)[:80]})", text)
    if not isinstance(row, dict):
        what = "null" if row is None else type(row).__name__
        return BadRow("not_an_object", f"a JSON {what}, expected a JSON object (one row per line)", text)
    where = _lone_surrogate(row)
    if where:
        return BadRow("bad_encoding", f"{where} holds a lone surrogate escape (\\ud800-\\udfff unpaired): not "
                      "Unicode text, and no tokenizer can encode it", text)
    return row


def _lone_surrogate(value, path: str = "") -> str | None:
    """The field path of the first string in `value` that JSON decoded to an unpaired surrogate
    (valid JSON, invalid text), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "the row"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip("."))
        if found:
            return found
    return None


def _read_jsonl(path: str) -> Iterator[tuple[int, dict | BadRow]]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror or e})") from None
    with f:
        for n, raw in enumerate(f, start=1):
            row = parse_line(raw, first=n == 1)
            if row is not None:
                yield n, row


def _read_parquet(path: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    n = 0
    try:
        source = pq.ParquetFile(path)
        for batch in source.iter_batches():
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types; name the file and the cause
        where = f" after row {n}" if n else ""
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DatasetError(f"{path}: not a readable parquet file{where} ({reason})") from None


def read_rows(path: str, fmt: str = "auto") -> Iterator[tuple[int, dict | BadRow]]:
    """Yield (row number, row dict or BadRow). Raises DatasetError only when the file as a whole
    cannot be read; a bad line is a BadRow, never an exception."""
    _check_readable(path)
    fmt = dataset_format(path, fmt)
    if fmt == "jsonl":
        yield from _read_jsonl(path)
    elif fmt == "parquet":
        yield from _read_parquet(path)
    else:
        raise DatasetError(f"{path}: unknown data.format {fmt!r} (jsonl or parquet)")
