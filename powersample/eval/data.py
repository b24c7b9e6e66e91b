"""Reading user-supplied data files (JSON, JSONL, CSV) with one-line errors for every way they can be wrong."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from powersample.errors import PowerSampleError


def read_records(path: str) -> list[dict[str, Any]]:
    """A JSON list of objects, a JSON object holding such a list under "data", or JSONL with one object a line."""
    text = _read_text(path)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = _parse_jsonl(path, text)
    if isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
        parsed = parsed["data"]
    if not isinstance(parsed, list) or not parsed:
        raise PowerSampleError(f"{path}: expected a non-empty list of records")
    for i, row in enumerate(parsed):
        if not isinstance(row, dict):
            raise PowerSampleError(f"{path}: record {i} is not an object")
    return parsed


def read_csv(path: str, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file that must have `columns` (others are kept)."""
    text = _read_text(path)
    try:
        reader = csv.DictReader(text.splitlines())
        rows = list(reader)
    except csv.Error as e:
        raise PowerSampleError(f"{path}: not a valid CSV file ({e})") from None
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise PowerSampleError(f"{path}: missing column(s) {', '.join(map(repr, missing))}")
    if not rows:
        raise PowerSampleError(f"{path}: no rows")
    return rows


def field(row: dict[str, Any], names: Sequence[str], path: str, index: int) -> str:
    """The first of `names` present in row, as a non-empty string."""
    for name in names:
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip():
            return value
    raise PowerSampleError(f"{path}: record {index} has no {' or '.join(map(repr, names))} field")


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise PowerSampleError(f"cannot read data file {path}: {reason}") from None


def _parse_jsonl(path: str, text: str) -> list[Any]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise PowerSampleError(f"{path}: neither JSON nor JSONL (line {n}: {e.msg})") from None
    return rows
