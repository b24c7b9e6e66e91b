"""Reading user-supplied data files (JSON, JSONL, CSV) with one-line errors for every way they can be wrong."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from powersample.errors import PowerSampleError, parse_json


class Place(NamedTuple):
    """Where a row is in its file, counting from 1: ("line", 3) of JSONL, ("record", 3) of a JSON list, ("row", 3)
    of a CSV file (its header is row 1)."""

    unit: str
    number: int

    def __str__(self) -> str:
        return f"{self.unit} {self.number}"


def read_records(path: str) -> list[tuple[Place, dict[str, Any]]]:
    """A JSON list of objects, a JSON object holding such a list under "data", or JSONL with one object a line;
    each object with its place in the file, for error messages."""
    text = _read_text(path)
    try:
        parsed = parse_json(text, path)
    except PowerSampleError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
        parsed = parsed["data"]
    if isinstance(parsed, list):
        parsed = [(Place("record", i), row) for i, row in enumerate(parsed, 1)]
    else:  # JSONL (one object alone is JSONL of one line)
        parsed = _parse_jsonl(path, text)
    if not isinstance(parsed, list) or not parsed:
        raise PowerSampleError(f"{path}: expected a non-empty list of records")
    for place, row in parsed:
        if not isinstance(row, dict):
            raise PowerSampleError(f"{path}: {place} is not an object")
    return parsed


def check_unique_ids(source: str, ids: Iterable[tuple[Place, str]]) -> None:
    """Refuse two problems with one id, whether given or a row's index standing in for a missing one: their
    records would share (problem id, seed), so the second would be skipped as done. No silent renaming either:
    an id names the same problem in every run."""
    first: dict[str, Place] = {}
    for place, pid in ids:
        if pid in first:
            was = first[pid]
            where = f"{was.unit}s {was.number} and {place.number}" if was.unit == place.unit else f"{was} and {place}"
            raise PowerSampleError(f"{source}: duplicate problem id {pid!r} ({where}); give every problem its own id")
        first[pid] = place


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


def field(row: dict[str, Any], names: Sequence[str], path: str, place: Place) -> str:
    """The first of `names` present in row, as a non-empty string."""
    for name in names:
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip():
            return value
    raise PowerSampleError(f"{path}: {place} has no {' or '.join(map(repr, names))} field")


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise PowerSampleError(f"cannot read data file {path}: {reason}") from None


def _parse_jsonl(path: str, text: str) -> list[tuple[Place, Any]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((Place("line", n), parse_json(line, f"line {n}")))
        except PowerSampleError as e:
            raise PowerSampleError(f"{path}: neither JSON nor JSONL: {e}") from None
    return rows
