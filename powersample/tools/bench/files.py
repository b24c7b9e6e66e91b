"""bench's result file: checked writable before the run (not after an hour of sampling), rewritten atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from powersample.errors import PowerSampleError
from powersample.tools.common import write_result_json


class Result(Protocol):
    """A bench or bench --engines result."""

    def to_dict(self) -> dict[str, Any]: ...


def check_writable(path: str) -> None:
    """Fail now, not after an hour of sampling, when the JSON cannot be written there."""
    parent = Path(path).parent
    if not parent.is_dir() or not os.access(parent, os.W_OK) or Path(path).is_dir():
        raise PowerSampleError(f"cannot write {path}: no such writable directory or it is a directory")


def write_json(path: str, result: Result) -> None:
    """Write the result atomically (powersample.io): readers see the previous version or this one."""
    write_result_json(Path(path), result.to_dict())
