"""Every durable write, the one progress bar, and notices.

A JSON or report file is replaced whole or not at all (write_*_atomic), so a crash or a reader never sees half of
it; a JSONL log is appended to, fsynced, so existing records are never lost (append_jsonl). Long work shows one tqdm
bar on stderr with ETA (progress_bar). A notice about how a run goes (not about one prompt) shows once per process
on stderr (notice_once), unless --quiet (quiet_notices)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from powersample.errors import PowerSampleError


def write_json_atomic(path: Path, obj: Any, *, sort_keys: bool = True, allow_nan: bool = False) -> None:
    """Write JSON so that readers see the old file or the new one, never a part (see write_bytes_atomic).
    Non-finite numbers are refused unless `allow_nan`: they would make the file invalid JSON. The bench tools keep
    their keys in the order they were built (`sort_keys=False`) and write NaN as they always have."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=allow_nan)
    except ValueError:
        raise PowerSampleError(f"not writing {path}: it would hold a non-finite number") from None
    write_bytes_atomic(path, (text + "\n").encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync it, then rename it over `path`."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise PowerSampleError(f"cannot write {path}: {e.strerror}") from None


def check_writable(path: str | Path) -> None:
    """Fail now, not after an hour of sampling, when a file cannot be written at `path` later (its directory
    missing or read-only, or the path a directory); the file itself is left as it is."""
    parent = Path(path).parent
    if not parent.is_dir() or not os.access(parent, os.W_OK) or Path(path).is_dir():
        raise PowerSampleError(f"cannot write {path}: no such writable directory or it is a directory")


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append rows, flushed and fsynced, so existing records are never lost. Every row is encoded first, and a
    non-finite number refused: a bare Infinity or NaN would make the file invalid JSON. A failed append (a full disk)
    leaves the file as it was (append_durably), and one left torn by a crash gets its next rows on a fresh line."""
    lines = "".join(json_line(row, f"not writing {path}: a record holds a non-finite number") for row in rows)
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)  # read: its last byte
    except OSError as e:
        raise PowerSampleError(f"cannot write {path}: {e.strerror}") from None
    try:
        if lines and not ends_a_line(fd):
            lines = "\n" + lines
        append_durably(fd, lines.encode(), path)
    finally:
        os.close(fd)


def ends_a_line(fd: int) -> bool:
    """Whether the file open on `fd` is empty or ends with a newline (else its last line is torn)."""
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def json_line(row: dict, refusal: str) -> str:
    """One JSONL line; a row holding a non-finite number is refused with the message `refusal`."""
    try:
        return json.dumps(row, allow_nan=False) + "\n"
    except ValueError:
        raise PowerSampleError(refusal) from None


def append_durably(fd: int, data: bytes, path: str | Path) -> None:
    """Append `data` to the file open on `fd` (with O_APPEND) and fsync it, so it is on disk when this returns.
    When that fails (a full disk) the file is cut back to its old end, so no torn line is left behind, and the
    failure is one line. The caller is the file's only writer meanwhile (a lock, or the server's log lock)."""
    end = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, end)
        raise PowerSampleError(f"cannot write {path}: {e.strerror}") from None


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str, *, initial: int = 0, quiet: bool = False) -> Iterator[tqdm | None]:
    """The progress bar of every long job: tqdm on stderr, with ETA; None when quiet."""
    if quiet:
        yield None
        return
    with tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar


class _Notices:
    """What notice_once reads: the notices this process has shown, and whether notices are off (--quiet)."""

    shown: set[str] = set()
    quiet = False


def notice_once(text: str) -> None:
    """`text` as one line on stderr, the first time this process asks (later asks show nothing); nothing while
    notices are quiet."""
    if not _Notices.quiet and text not in _Notices.shown:
        _Notices.shown.add(text)
        print(f"powersample: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_notices(quiet: bool) -> Iterator[None]:
    """Within it, notices show only when not `quiet` (the command line's --quiet; process-wide, as stderr is)."""
    before, _Notices.quiet = _Notices.quiet, quiet
    try:
        yield
    finally:
        _Notices.quiet = before
