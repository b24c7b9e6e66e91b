"""A native engine's first run on a machine happens in a child process, so that a crash costs a warning, not the run.

A native engine that crashes (llama.cpp on an AMX CPU: a segfault or an illegal instruction on the first decode)
takes the whole process down, with no message. So before a native engine is used in-process, a child process loads
the same model the same way and decodes a few tokens. The outcome is cached per key (engine build, CPU, model file,
weight placement) as a small JSON file under $POWERSAMPLE_CACHE/probes: later runs read it and start no child.
When the child dies, `--backend auto` falls back to hf with one line on stderr, and an explicit `--backend llamacpp`
is refused with a one-line error; delete the cached file (the message names it) to probe again.

`remembered` is the cache itself, for any finding about an engine on this machine that is worth computing once
(the llamacpp backend also keeps there whether a model's kernels round by batch shape).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from powersample.backends.embedded import cache_root
from powersample.errors import PowerSampleError
from powersample.io import write_json_atomic

PROBE_TIMEOUT = 300.0  # seconds the child may take (it loads the model once and decodes a few tokens)


@dataclass(frozen=True)
class Outcome:
    """How the probe child ended."""

    ok: bool
    detail: str  # "" when ok; else "killed by SIGSEGV", "exit code 1: <its last line>" or "timed out after ..."
    path: Path  # the cached outcome


def probe(key: Mapping[str, str], command: Sequence[str], timeout: float = PROBE_TIMEOUT) -> Outcome:
    """The cached outcome for `key`, or run `command` once (a child that exits 0 when the engine works) and cache it."""
    found = remembered(key, lambda: dict(zip(("ok", "detail"), _run(command, timeout))))
    return Outcome(found.get("ok") is True, str(found.get("detail", "")), _path(key))


def remembered(key: Mapping[str, str], compute: Callable[[], dict]) -> dict:
    """The JSON value cached for `key` under $POWERSAMPLE_CACHE/probes, or compute() once and cache it (a cache we
    cannot write only means computing again next time)."""
    path = _path(key)
    cached = _read(path, key)
    if cached is not None:
        return cached
    value = compute()
    _write(path, {"key": dict(key), "value": value})
    return value


def _run(command: Sequence[str], timeout: float) -> tuple[bool, str]:
    try:
        done = subprocess.run(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    except OSError as e:
        return False, f"could not start: {e.strerror}"
    if done.returncode == 0:
        return True, ""
    if done.returncode < 0:
        return False, f"killed by {_signal_name(-done.returncode)}"
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return False, f"exit code {done.returncode}" + (f": {lines[-1].strip()[:200]}" if lines else "")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _digest(key: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:24]


def _path(key: Mapping[str, str]) -> Path:
    return cache_root() / "probes" / f"{_digest(key)}.json"


def _read(path: Path, key: Mapping[str, str]) -> dict | None:
    """The value stored at `path` for exactly this key; None when absent or unreadable (then we compute again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["key"] == dict(key) and isinstance(data["value"], dict):
            return data["value"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write(path: Path, data: dict) -> None:
    """Write atomically; a cache we cannot write only means probing again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
    except (OSError, PowerSampleError):
        pass
