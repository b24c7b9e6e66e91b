"""bench's result file: checked writable before the run (not after an hour of sampling), rewritten atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from powersample.io import check_writable
from powersample.tools.common import write_result_json

__all__ = ["Result", "check_writable", "write_json"]


class Result(Protocol):
    """A bench or bench --engines result."""

    def to_dict(self) -> dict[str, Any]: ...


def write_json(path: str, result: Result) -> None:
    """Write the result atomically (powersample.io): readers see the previous version or this one."""
    write_result_json(Path(path), result.to_dict())
