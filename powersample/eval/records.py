"""A run directory: what was asked (run.json) and what is done (records*.jsonl).

    run.json                       the run's identity (task, data digest, sampler config, backend, prompt format,
                                   grading limits) and when it was created; written once, atomically
    records.jsonl                  one JSON record per (problem, seed), appended, flushed and fsynced one by one
    records.shard-I-of-N.jsonl     the same, for `--shard I/N` (shards may run at once into one directory)

Resuming reads every records file and skips the (problem, seed) pairs already there. A killed run loses at most
the record in flight: its torn last line is ignored, and cut off before the next append. Each records file has one
writer at a time (an exclusive lock; a second process on the same shard is refused). A directory whose
run.json names a different identity is refused, so records of different configs never mix; seeds, --limit and
--shard are not part of the identity (they only choose which records to make), so a run can be extended.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from powersample.errors import PowerSampleError

RUN_FILE = "run.json"
SCHEMA = 1  # bump when records change meaning; part of the identity


def identity_hash(identity: dict[str, Any]) -> str:
    """A short hash of the identity, for default directory names."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def open_run(run_dir: Path, identity: dict[str, Any], meta: dict[str, Any]) -> None:
    """Create the run directory with its run.json, or check that an existing one has the same identity."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PowerSampleError(f"cannot create output directory {run_dir}: {e.strerror}") from None
    path = run_dir / RUN_FILE
    if not path.exists():
        write_json_atomic(path, {"schema": SCHEMA, "identity": identity, **meta})
    check_identity(run_dir, read_run(run_dir).get("identity"), identity)


def read_run(run_dir: Path) -> dict[str, Any]:
    """The parsed run.json of a run directory."""
    path = run_dir / RUN_FILE
    try:
        header = json.loads(path.read_text())
    except OSError as e:
        raise PowerSampleError(f"{run_dir} is not a run directory (cannot read {RUN_FILE}: {e.strerror})") from None
    except json.JSONDecodeError:
        raise PowerSampleError(f"{path} is not valid JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("identity"), dict):
        raise PowerSampleError(f"{path} has no run identity")
    return header


def check_identity(run_dir: Path, have: Any, want: dict[str, Any]) -> None:
    """A one-line error naming the first settings that differ, unless `have` is `want`."""
    if have == want:
        return
    old, new = _flatten(have if isinstance(have, dict) else {}), _flatten(want)
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = "; ".join(f"{k}: {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} now" for k in diffs[:3])
    raise PowerSampleError(f"{run_dir} holds a run with a different config ({shown}); use another --output-dir")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def records_path(run_dir: Path, shard: tuple[int, int] | None) -> Path:
    """This process's records file (one per shard, so concurrent shards never share a file)."""
    return run_dir / ("records.jsonl" if shard is None else f"records.shard-{shard[0]}-of-{shard[1]}.jsonl")


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete record of the run, the first one per (problem, seed); torn or foreign lines are skipped."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for path in sorted(run_dir.glob("records*.jsonl")):
        for record in _read_lines(path):
            seen.setdefault(record_key(record), record)
    return list(seen.values())


def record_key(record: dict[str, Any]) -> tuple[str, int]:
    return str(record["problem_id"]), int(record["seed"])


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):  # torn: the writer was killed mid-line (or is writing it now)
                break
            try:
                record = json.loads(line)
                record_key(record)
            except (ValueError, KeyError, TypeError):
                continue
            yield record


def repair_tail(path: Path) -> None:
    """Cut a torn last line off our own records file, so the next append starts on a fresh line."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


class RecordWriter:
    """Appends records one line at a time: write, flush, fsync, so a kill loses at most the line in flight."""

    def __init__(self, path: Path):
        try:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (closed by close())
        except OSError as e:
            raise PowerSampleError(f"cannot write {path}: {e.strerror}") from None
        # One writer per file: a second process on the same shard would cut our lines as "torn". A POSIX lock,
        # not flock: forked children (the math grader's worker) inherit flocks but not POSIX locks.
        try:
            fcntl.lockf(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            raise PowerSampleError(f"another eval is writing {path}; wait for it or use another --shard") from None
        repair_tail(path)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a part (see write_bytes_atomic)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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
