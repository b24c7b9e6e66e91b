"""The one exception type users see: a bad input, explained in one line; and the one way user JSON is parsed."""

from __future__ import annotations

import json
from typing import Any


class PowerSampleError(ValueError):
    """A user error (bad option, bad file, bad prompt). The CLI prints it as one line and exits with code 2."""


def parse_json(text: str | bytes, source: str) -> Any:
    """json.loads for anything a user hands us (a data file, a toy spec, a run's files, a JSONL line).

    Every way it can fail is one PowerSampleError "`source` is not valid JSON (why)": bad syntax, bytes that are
    not UTF-8, nesting deeper than the parser's recursion limit (RecursionError, not a ValueError) and an integer
    past Python's int string-conversion limit (a ValueError that is not a JSONDecodeError).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        why = f"{e.msg}, line {e.lineno} column {e.colno}"
    except UnicodeDecodeError:
        why = "not UTF-8 text"
    except RecursionError:
        why = "nested too deeply"
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion: ...; use sys..."
        why = str(e).split(";")[0].strip() or type(e).__name__
    raise PowerSampleError(f"{source} is not valid JSON ({why})")


def one_line(error: BaseException) -> str:
    """The first non-empty line of an engine's error message, at most 300 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def is_unicode(text: str) -> bool:
    """Whether `text` is Unicode text: JSON may hold a lone surrogate ("\\ud800"), which no encoder can write."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
