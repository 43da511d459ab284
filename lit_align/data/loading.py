"""Loading prompt / demonstration tables from local files or the hub, with row validation.

Errors name the file, the line or row, and the column, and are raised before any training.
Files are only ever parsed as data: nothing named in a config is imported or executed here
(a ``.py`` path is refused, and hub data sets load without remote code).
"""

from __future__ import annotations

import json
from pathlib import Path

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
MAX_REPORTED = 10
"""At most this many problems are spelled out in one report; the rest are counted."""
CHAT_ROLES = ("system", "user", "assistant", "tool")
"""The roles a message may have: TRL's (``trl.data_utils.prepare_multimodal_messages`` refuses others) and those
the Hugging Face chat templates render as turns. Templates that print any role (ChatML) would render a misspelt
one ("assistent", "User") as a turn the model never sees in use."""


class DataError(ValueError):
    """A data file or row is unusable; the message says where."""


def _decode_lines(path: Path):
    """(line number, text) of every line, failing on the first line that is not UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _bad_unicode(value, where: str) -> str | None:
    """A message if a parsed JSON value holds a lone surrogate (``"\\ud800"``), which no encoder accepts."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{where} holds an unpaired surrogate escape ({value[e.start]!r}), which is not valid Unicode"
    elif isinstance(value, dict):
        return next(filter(None, (_bad_unicode(v, f"{where}[{k!r}]") for k, v in value.items())), None)
    elif isinstance(value, list):
        return next(filter(None, (_bad_unicode(v, f"{where}[{i}]") for i, v in enumerate(value))), None)
    return None


def _check_text(path: Path, json_lines: bool) -> None:
    """Every line must be UTF-8; for JSONL, also a JSON object with valid Unicode strings."""
    for lineno, line in _decode_lines(path):
        if not json_lines or not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {lineno} is a JSON {type(row).__name__}, expected an object")
        for column, value in row.items():
            problem = _bad_unicode(value, f"column {column!r}")
            if problem:
                raise DataError(f"{path}: line {lineno}, {problem}")


def _check_parquet(path: Path) -> None:
    """String columns must hold UTF-8 (Arrow does not check it when reading)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path}: could not be read as parquet: {e}") from e
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
            for i, raw in enumerate(column.cast(binary).to_pylist(), start=1):
                if raw is None:
                    continue
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}: row {i}, column {name!r} is not valid UTF-8 ({e.reason} at byte {e.start})"
                    ) from None


def _root_cause(e: BaseException) -> str:
    """The innermost exception's message (datasets wraps parser errors in generic ones)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}"


def load_table(source: str, split: str = "train") -> tuple[list[dict], str]:
    """Rows of a local JSON/JSONL/Parquet/CSV file, or of a hub data set ``name``, ``name:split`` or
    ``name:config:split`` (``openai/gsm8k:main:train``).

    Returns the rows and a label for error messages.
    """
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise DataError(f"data file {source} does not exist")
        if path.suffix == ".parquet":
            _check_parquet(path)
        else:
            _check_text(path, json_lines=path.suffix == ".jsonl")
        try:
            ds = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as e:  # datasets wraps parser errors; keep the cause, name the file
            raise DataError(f"{source}: could not be read as {LOCAL_FORMATS[path.suffix]}: {_root_cause(e)}") from e
        label = str(path)
    elif path.exists() or path.suffix == ".py":
        raise DataError(f"{source}: unsupported data file type {path.suffix!r}; use one of {sorted(LOCAL_FORMATS)}")
    else:
        parts = source.split(":")
        if len(parts) > 3 or not all(parts):
            raise DataError(f"data {source!r}: a hub data set is 'name', 'name:split' or 'name:config:split'")
        name, config, name_split = (
            parts[0],
            parts[1] if len(parts) == 3 else None,
            parts[-1] if len(parts) > 1 else split,
        )
        try:
            ds = datasets.load_dataset(name, config, split=name_split)
        except Exception as e:
            raise DataError(
                f"data {source!r} is neither an existing local file nor a loadable hub data set: {e}"
            ) from e
        label = source
    rows = ds.to_list()
    if not rows:
        raise DataError(f"{label}: the data set is empty")
    return rows, label


def messages_problem(value) -> str | None:
    """Why ``value`` is unusable as a list of chat messages (TRL's conversational format: ``[{"role": ...,
    "content": ...}, ...]``), or None. Keys a row lacks and Arrow filled with None count as absent."""
    if not isinstance(value, list) or not value:
        return (
            "is an empty conversation" if isinstance(value, list) else f"expected messages, got {type(value).__name__}"
        )
    for k, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            return f"holds a conversation whose message {k} is a {type(message).__name__}, not a mapping with role and content"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            return f"holds a conversation whose message {k} has no 'role'"
        if role not in CHAT_ROLES:
            hint = f" (roles are lower case: {role.lower()!r})" if role.lower() in CHAT_ROLES else ""
            return (
                f"holds a conversation whose message {k} has role {role!r}, not one of "
                f"{', '.join(repr(r) for r in CHAT_ROLES)}{hint}"
            )
        if not isinstance(content, str):
            what = "no 'content'" if content is None else f"a 'content' that is a {type(content).__name__}, not text"
            return f"holds a conversation whose message {k} ({role}) has {what}"
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            return (
                f"holds a conversation whose message {k} ({role}) holds an unpaired surrogate ({content[e.start]!r}), "
                f"which is not valid Unicode"
            )
    return None


def _cell_problem(row: dict, column: str, messages: bool = False) -> str | None:
    """Why ``row[column]`` is unusable as text (or, with ``messages``, as a list of chat messages), or None
    (numbers and UTF-8 bytes become strings in place)."""
    if column not in row or row[column] is None:
        return "is missing"
    value = row[column]
    if messages and isinstance(value, list):
        return messages_problem(value)
    if isinstance(value, bytes):
        try:
            row[column] = value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"is not valid UTF-8 ({e.reason} at byte {e.start})"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        row[column] = value = str(value)  # CSV/Parquet readers infer numbers
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not value.strip():
        return "is empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds an unpaired surrogate ({value[e.start]!r}), which is not valid Unicode"
    return None


def report(label: str, problems: list[str], what: str) -> str:
    """One message for many problems: the first :data:`MAX_REPORTED` spelled out, the rest counted."""
    shown = "\n  ".join(problems[:MAX_REPORTED])
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    return f"{label}: {len(problems)} {what}:\n  {shown}{more}"


def validate_rows(
    rows: list[dict],
    label: str,
    columns: dict[str, str],
    invalid_rows: str = "error",
    flags: dict[str, str] | None = None,
    messages: tuple[str, ...] = (),
    skip: frozenset[int] = frozenset(),
) -> tuple[list[tuple[int, dict]], list[str]]:
    """Check that each ``role -> column`` holds a non-empty string (or a number) in every row; the roles in
    ``messages`` may hold a list of chat messages instead (TRL's conversational rows, see :func:`messages_problem`).

    ``label`` names the source; row numbers count from 1 (the line number in a JSONL file
    without blank lines). With ``invalid_rows="error"`` any bad row raises one :class:`DataError`
    listing the bad rows; with ``"skip"`` they are dropped. Returns the kept ``(row number, row)``
    pairs and one ``row N, column 'c' ...`` line per problem. A column
    absent from every row, or no usable row at all, is always an error; its message names the data
    module's argument that sets it (``flags[role]``, default ``<role>_column``). Rows numbered in ``skip`` (already
    reported by the caller) are left out, unchecked, and do not count towards a column's presence.
    """
    present = set().union(*(r for i, r in enumerate(rows, start=1) if i not in skip)) if rows else set()
    for role, column in columns.items():
        if column not in present:
            raise DataError(
                f"{label}: missing column {column!r} (the {role} column); columns found: {sorted(present)}. "
                f"Set the data module's {(flags or {}).get(role, f'{role}_column')} to the right name."
            )
    kept, problems = [], []
    for i, row in enumerate(rows, start=1):
        if i in skip:
            continue
        found = [(c, _cell_problem(row, c, role in messages)) for role, c in columns.items()]
        found = [f"row {i}, column {c!r} {why}" for c, why in found if why]
        if found:
            problems.extend(found)
        else:
            kept.append((i, row))
    if problems and invalid_rows == "error":
        raise DataError(
            report(label, problems, f"invalid fields in {len(rows) - len(skip) - len(kept)} of {len(rows)} rows")
            + "\nFix the rows, or set data.invalid_rows=skip to drop them (they are counted and logged)."
        )
    if not kept:
        raise DataError(report(label, problems, f"invalid fields: none of the {len(rows)} rows is usable"))
    return kept, problems
