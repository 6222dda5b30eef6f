"""Read dataset rows with their 1-based row numbers, so every report can point at a row."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator


class DatasetError(ValueError):
    pass


def dataset_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    if path.endswith((".jsonl", ".json")):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    raise DatasetError(f"{path}: cannot tell the format from the extension; set data.format (jsonl or parquet)")


def read_rows(path: str, fmt: str = "auto") -> Iterator[tuple[int, dict]]:
    """Yield (row number, row dict). A row that is not a JSON object is an error naming the row."""
    if not os.path.isfile(path):
        raise DatasetError(f"dataset not found: {path}")
    fmt = dataset_format(path, fmt)
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}: row {n} is not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise DatasetError(f"{path}: row {n} is a {type(row).__name__}, expected a JSON object")
                yield n, row
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for n, row in enumerate(table.to_pylist(), start=1):
            yield n, row
