"""A run directory: what was asked (run.json) and what is done (records*.jsonl).

    run.json                       the run's identity (task, data digest, sampler config, backend, prompt format,
                                   grading limits) and when it was created; written once, atomically
    records.jsonl                  one JSON record per (problem, seed), appended, flushed and fsynced one by one
    records.shard-I-of-N.jsonl     the same, for `--shard I/N` (shards may run at once into one directory)

Resuming reads every records file and skips the (problem, seed) pairs already there. A killed run loses at most
the record in flight: its torn last line is ignored, and cut off before the next append; a failed append (a full
disk) is cut back at once. Each records file has one writer at a time: an exclusive flock on its
`<records file>.lock`, held from before resuming reads the records until the run ends, refuses a second writer of
the same shard, in another process or this one. run.json and the records files are created, checked and taken back
under the directory's own flock (run_lock), so two first runs cannot both write their run.json. A directory whose
run.json names a different identity is refused, so records of different configs never mix; seeds, --limit and
--shard are not part of the identity (they only choose which records to make), so a run can be extended. A run
that fails before its first record takes back the directory, run.json and records file it created (discard_opened).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError, parse_json
from powersample.io import append_durably, json_line, write_json_atomic

RUN_FILE = "run.json"
SCHEMA = 1  # bump when records change meaning; part of the identity

# The schema of a record: what the runner writes (runner.grade_record checks each record against it) and what the
# report reads back (checked again there, so that a damaged or foreign line is a one-line error naming it). A type,
# or a tuple of types where None means the field may be null or absent. The sample's own fields (SampleRecord's)
# come first, then the grading's.
NUMBER = (int, float)
RECORD_FIELDS = {
    "problem_id": (str, int),
    "tokens": list,
    "wall_seconds": NUMBER,
    "proposals": int,
    "accepted": int,
    "tokens_generated": int,
    "correct": (bool, None),
    "logp_per_token": (*NUMBER, None),
    "confidence": (*NUMBER, None),
    "finish_reason": (str, None),
    "answer": (str, None),  # what grading extracted; what a majority vote counts (eval.voting)
    "vote": (dict, None),  # --vote-match: the vote this record's answer won (VOTE_FIELDS)
    "swaps": (list, None),  # power-pt: [swaps attempted, accepted] per pair of adjacent rungs
}
# A --vote-match record's vote: its budget (the matched record's tokens_generated), the winning group's votes, and
# every sample drawn, in draw order (VOTE_SAMPLE_FIELDS; their tokens add up to the record's tokens_generated).
VOTE_FIELDS = {"budget": int, "votes": int, "groups": int, "tie_break": bool, "samples": list}
VOTE_SAMPLE_FIELDS = {
    "answer": (str, None),
    "correct": (bool, None),
    "tokens": list,
    "logp_per_token": (*NUMBER, None),
    "finish_reason": str,
}


def graded_fields(plan: Any, problem: Any, grade: Any, seconds: float) -> dict[str, Any]:
    """What every eval record says about its problem and its grade (plan: runner.EvalPlan, problem: tasks.Problem,
    grade: tasks.Grade; not imported, since both import this module), in the records' order."""
    return dict(
        task=plan.task.name,
        problem_id=problem.id,
        gold=problem.gold,
        chat=plan.chat,
        answer=grade.answer,
        correct=grade.correct,
        grade_detail=grade.detail,
        grade_seconds=seconds,
    )


def check_record(record: dict[str, Any], where: str) -> None:
    """A one-line error naming `where` and the first field of the record (or of its vote) that is missing or bad."""
    check_fields(record, RECORD_FIELDS, where, "record")
    vote = record.get("vote")
    if vote is not None:
        check_fields(vote, VOTE_FIELDS, where, "record's vote")
        for i, sample in enumerate(vote["samples"]):
            if not isinstance(sample, dict):
                raise PowerSampleError(f"{where}: record's vote sample {i} is not an object")
            check_fields(sample, VOTE_SAMPLE_FIELDS, where, f"record's vote sample {i}")


def check_fields(obj: dict[str, Any], fields: dict[str, Any], where: str, what: str) -> None:
    """A one-line error naming `where` and the first field of `obj` that is missing or of the wrong type."""
    for key, kinds in fields.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        value = obj.get(key)
        if value is None and None in kinds:
            continue
        types = tuple(k for k in kinds if k is not None)
        wrong_bool = isinstance(value, bool) and bool not in types
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        sane = not number or abs(value) <= MAX_MAGNITUDE  # False for inf and NaN too; no float conversion
        if value is None or not isinstance(value, types) or wrong_bool or not sane:
            shown = [k for k in kinds if not (k is int and float in kinds)]  # int or float: "a number"
            names = " or ".join("null" if k is None else _TYPE_NAMES[k] for k in shown)
            problem = "has no" if key not in obj else "has a bad"
            raise PowerSampleError(f"{where}: {what} {problem} {key!r} (expected {names})")


MAX_MAGNITUDE = 2**53  # numbers beyond are no measurement: sums and means of them would overflow floats
_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true/false",
    list: "a list",
    dict: "an object",
}


def identity_hash(identity: dict[str, Any]) -> str:
    """A short hash of the identity, for default directory names."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def open_run(run_dir: Path, identity: dict[str, Any], meta: dict[str, Any], path: Path) -> tuple[RecordWriter, Opened]:
    """Create the run directory with its run.json, or check that an existing one has the same identity; then become
    the one writer of its records file `path`. All of it under the directory's lock (run_lock), so of two first runs
    with different identities exactly one creates run.json and the other is refused. Returns the writer, and what
    this call created (for discard_opened)."""
    with run_lock(run_dir, create=True) as made:
        run_file = run_dir / RUN_FILE
        opened = Opened(made, not run_file.exists())
        try:
            if opened.run_file:
                write_json_atomic(run_file, {"schema": SCHEMA, "identity": identity, **meta})
            check_identity(run_dir, read_run(run_dir).get("identity"), identity)
            return RecordWriter(path), opened
        except BaseException:
            _take_back(run_dir, path, opened)
            raise


@contextlib.contextmanager
def run_lock(run_dir: Path, *, create: bool = False) -> Iterator[bool]:
    """Hold the run directory's lock: an exclusive flock on the directory itself, taken while run.json and records
    files are created (open_run) or taken back (discard_opened), moments each, so waiting for it is fine. With
    `create`, the directory is made first; yields whether this call made it. FileNotFoundError without `create`
    when the directory is not there."""
    for _ in range(100):  # the directory can be taken back while we wait for its lock: then make it again
        made = create and _make_directory(run_dir)
        try:
            fd = _lock_directory(run_dir)
            break
        except FileNotFoundError:
            if not create:
                raise
        except OSError as e:
            raise PowerSampleError(f"cannot lock {run_dir}: {e.strerror}") from None
    else:
        raise PowerSampleError(f"cannot lock {run_dir}: it keeps being removed")
    _HELD_LOCKS.add(fd)
    try:
        yield made
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)


def _make_directory(run_dir: Path) -> bool:
    """Make the run directory (and its parents); whether it was not there before."""
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir()
        return True
    except FileExistsError:
        if not run_dir.is_dir():
            raise PowerSampleError(f"cannot create output directory {run_dir}: it is a file") from None
        return False
    except OSError as e:
        raise PowerSampleError(f"cannot create output directory {run_dir}: {e.strerror}") from None


def _lock_directory(run_dir: Path) -> int:
    """A descriptor of the directory holding its flock (waiting for it); FileNotFoundError when the directory is
    gone, also when it was taken back (and maybe made again) while we waited."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not os.path.samestat(os.fstat(fd), os.stat(run_dir)):
            raise FileNotFoundError(errno.ENOENT, "taken back while waiting for its lock", str(run_dir))
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class Opened:
    """What opening a run created: the directory, its run.json (both absent before)."""

    directory: bool
    run_file: bool


def discard_opened(run_dir: Path, path: Path, opened: Opened) -> None:
    """Take back what opening a run created, for a run that failed before its first record, when it wrote run.json
    (a run that was there before stays as it was): its records file `path` while empty and that file's lock,
    run.json unless another records file is there (another shard's run), and the directory when this run made it
    and nothing else is in it. Called while holding path's lock (another writer of the shard may take a fresh one
    at once: this one writes nothing more), under the directory's lock (so no run joins halfway); best effort, the
    failure that brought us here is what the caller raises."""
    if not opened.run_file:
        return
    with contextlib.suppress(OSError, PowerSampleError), run_lock(run_dir):
        _take_back(run_dir, path, opened)


def _take_back(run_dir: Path, path: Path, opened: Opened) -> None:
    """discard_opened's work, under the directory's lock."""
    if not opened.run_file:
        return
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            path.unlink()
    with contextlib.suppress(OSError):
        lock_path(path).unlink()
    if not any(run_dir.glob("records*.jsonl")):
        with contextlib.suppress(OSError):
            (run_dir / RUN_FILE).unlink()
    if opened.directory:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # fails, as it should, unless empty


def read_run(run_dir: Path) -> dict[str, Any]:
    """The parsed run.json of a run directory."""
    path = run_dir / RUN_FILE
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PowerSampleError(f"{run_dir} is not a run directory (cannot read {RUN_FILE}: {e.strerror})") from None
    header = parse_json(data, str(path))
    if not isinstance(header, dict) or not isinstance(header.get("identity"), dict):
        raise PowerSampleError(f"{path} has no run identity")
    return header


def check_identity(run_dir: Path, have: Any, want: dict[str, Any]) -> None:
    """A one-line error naming the first settings that differ, unless `have` is `want` (up to sampler fields added
    since `have` was written, at their defaults)."""
    diffs = identity_diffs(have, want)
    if not diffs:
        return
    old, new = _flatten(have if isinstance(have, dict) else {}), _flatten(want)
    shown = "; ".join(f"{k}: {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} now" for k in diffs[:3])
    raise PowerSampleError(f"{run_dir} holds a run with a different config ({shown}); use another --output-dir")


def identity_diffs(have: Any, want: dict[str, Any]) -> list[str]:
    """The settings (flattened: "config.alpha") in which identity `have` differs from `want`, leaving out sampler
    fields that `have` lacks where `want` holds their default (fields added since `have` was written)."""
    if have == want:
        return []
    old, new = _flatten(have if isinstance(have, dict) else {}), _flatten(want)
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not _added_since(k, old, new)]


def _added_since(key: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether `key` is a sampler field added since the run was made (power-pt's knobs, say), at its default: the
    run was made with that default in effect, so it resumes."""
    name = key.removeprefix("config.")
    default = _DEFAULTS.get(name, _NO_DEFAULT) if key.startswith("config.") else _NO_DEFAULT
    return key not in old and new.get(key) == default


_NO_DEFAULT = object()
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplerConfig)}


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
    for _, _, record in iter_records(run_dir):
        seen.setdefault(record_key(record), record)
    return list(seen.values())


def iter_records(run_dir: Path) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, line number, record) of every complete record line of every records file, duplicates included."""
    for path in sorted(run_dir.glob("records*.jsonl")):
        for n, record in _read_lines(path):
            yield path, n, record


def record_key(record: dict[str, Any]) -> tuple[str, int]:
    return str(record["problem_id"]), int(record["seed"])


def _read_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed below)
    except FileNotFoundError:  # taken back since it was listed: a shard's run that failed before its first record
        return
    except OSError as e:  # a directory, unreadable, ...
        raise PowerSampleError(f"cannot read records file {path}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):  # torn: the writer was killed mid-line (or is writing it now)
                break
            try:
                record = parse_json(line, str(path))
                record_key(record)
            except (ValueError, KeyError, TypeError, OverflowError):  # PowerSampleError is a ValueError
                continue
            yield n, record


def repair_tail(path: Path) -> None:
    """Cut a torn last line off our own records file, so the next append starts on a fresh line.

    Call it only while holding the file's lock (RecordWriter does): another writer could be mid-line."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
    except FileNotFoundError:
        return
    except OSError as e:
        raise PowerSampleError(f"cannot write {path}: {e.strerror}") from None


def lock_path(path: Path) -> Path:
    """The lock file of a records file (a separate file: see RecordWriter)."""
    return path.with_name(path.name + ".lock")


def check_unlocked(path: Path) -> None:
    """Refuse now, before the model loads, when another writer holds the records file's lock (RecordWriter takes
    the lock for real; this only fails early)."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file yet (or none readable): nobody to wait for, RecordWriter will tell
    try:
        _flock(fd, path)
    finally:
        os.close(fd)  # releases the probe's lock


def _flock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise PowerSampleError(f"another eval is writing {path}; wait for it or use another --shard") from None
        raise PowerSampleError(f"cannot lock {lock_path(path)}: {e.strerror}") from None


_HELD_LOCKS: set[int] = set()  # descriptors of the locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (the math grader's worker): close the inherited lock descriptors, so a child that
    outlives a killed parent does not keep the lock (a flock belongs to the open file, which fork shares)."""
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class RecordWriter:
    """The one writer of a records file. Appends records one line at a time: write, flush, fsync, so a kill loses
    at most the line in flight.

    The lock is an exclusive flock on a separate lock file, held until close(). Not a POSIX lock on the records
    file itself: closing any descriptor of a file drops every POSIX lock the process holds on it, so reading the
    records (resume, repair) would silently free it; and POSIX locks do not exclude a second writer in the same
    process. A flock is per open file, so a second RecordWriter is refused wherever it runs.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self._lock = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise PowerSampleError(f"cannot write {lock_path(path)}: {e.strerror}") from None
        try:
            _flock(self._lock, path)
            repair_tail(path)  # safe now: we are the only writer
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            os.close(self._lock)
            raise PowerSampleError(f"cannot write {path}: {e.strerror}") from None
        except BaseException:
            os.close(self._lock)
            raise
        _HELD_LOCKS.add(self._lock)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; a non-finite number is refused rather than written as invalid JSON (Infinity), and a
        failed write (a full disk) is cut back, so the file ends with a whole line either way."""
        refusal = (
            f"the record of problem {record.get('problem_id')!r} seed {record.get('seed')!r} holds a "
            f"non-finite number; not writing it to {self.path}"
        )
        append_durably(self._fd, json_line(record, refusal).encode(), self.path)

    def close(self) -> None:
        """Close the records file, then release the lock."""
        try:
            os.close(self._fd)
        finally:
            _HELD_LOCKS.discard(self._lock)
            os.close(self._lock)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
