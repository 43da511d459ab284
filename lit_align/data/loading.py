"""Loading prompt / demonstration tables from local files or the hub, with row validation.

Errors name the file, the line or row, and the column, and are raised before any training.
"""
from __future__ import annotations

import json
from pathlib import Path

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A data file or row is unusable; the message says where."""


def _check_jsonl(path: Path) -> None:
    """Parse every line so a malformed one is reported with its line number."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno} is a JSON {type(row).__name__}, expected an object")


def load_table(source: str, split: str = "train") -> tuple[list[dict], str]:
    """Rows of a local JSON/JSONL/Parquet/CSV file, or of a hub data set ``name`` or ``name:split``.

    Returns the rows and a label for error messages.
    """
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise DataError(f"data file {source} does not exist")
        if path.suffix == ".jsonl":
            _check_jsonl(path)
        try:
            ds = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as e:  # datasets wraps parser errors; keep the cause, name the file
            raise DataError(f"{source}: could not be read as {LOCAL_FORMATS[path.suffix]}: {e}") from e
        label = str(path)
    elif path.exists():
        raise DataError(f"{source}: unsupported file type {path.suffix!r}; use one of {sorted(LOCAL_FORMATS)}")
    else:
        name, _, name_split = source.partition(":")
        try:
            ds = datasets.load_dataset(name, split=name_split or split)
        except Exception as e:
            raise DataError(f"data {source!r} is neither an existing local file nor a loadable hub data set: {e}") from e
        label = source
    rows = ds.to_list()
    if not rows:
        raise DataError(f"{label}: the data set is empty")
    return rows, label


def validate_rows(rows: list[dict], label: str, columns: dict[str, str]) -> None:
    """Each ``role -> column`` must exist and hold a non-empty string (or a number) in every row.

    ``label`` names the source; row numbers count from 1 (the line number in a JSONL file
    without blank lines).
    """
    present = set(rows[0])
    for role, column in columns.items():
        if column not in present:
            raise DataError(
                f"{label}: missing column {column!r} (the {role} column); columns found: {sorted(present)}. "
                f"Set the data module's {role}_column to the right name."
            )
    for i, row in enumerate(rows, start=1):
        for role, column in columns.items():
            value = row.get(column)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[column] = value = str(value)  # CSV/Parquet readers infer numbers
            if not isinstance(value, str):
                raise DataError(f"{label}: row {i}, column {column!r}: expected a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{label}: row {i}, column {column!r} is empty")
