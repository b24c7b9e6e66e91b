"""Grading final answers of math problems with math-verify, safely.

math-verify parses LaTeX into sympy and compares symbolically, so \\frac12, 0.5 and \\dfrac{1}{2} agree. Two facts
about math-verify shape this module:

- the gold answer must be wrapped in $...$ before parsing, or it parses wrongly or not at all;
- its own timeouts use signal.alarm, which only works in the main thread. So they are off (None), and every
  verification runs in a pebble worker process that is killed when it overruns (sympy can take forever on
  inputs like 9^{9^{9^{9}}}). A killed worker is replaced automatically.
"""

from __future__ import annotations

import atexit
import multiprocessing
import re
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from powersample.errors import PowerSampleError

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_pool: Any = None
_pool_lock = threading.Lock()


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}, or `\\boxed 5`) in text; None when there is none."""
    for match in reversed(list(_BOXED.finditer(text))):
        rest = text[match.end() :]
        if rest.startswith("{"):
            content = _braced(rest)
        else:  # "\boxed 5": the argument is the next token
            token = re.match(r"\s+([^\s$]+)", rest)
            content = token.group(1) if token else None
        if content is not None and content.strip():
            return content.strip()
    return None


def _braced(text: str) -> str | None:
    """What is inside the balanced braces text starts with; None when they never close."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return text[1:i]
    return None


def equivalent(gold: str, answer: str, timeout: float) -> tuple[bool, str]:
    """(whether `answer` equals `gold`, a short reason when it does not), in a killable worker process."""
    future = _worker_pool().schedule(verify_in_worker, args=(gold, answer), timeout=timeout)
    try:
        return (True, "") if future.result() else (False, "not equivalent")
    except FutureTimeout:
        return False, f"grader timed out after {timeout:g}s"
    except Exception as e:  # noqa: BLE001 - the worker died (memory, recursion) or math-verify raised
        return False, f"grader failed: {type(e).__name__}"


def verify_in_worker(gold: str, answer: str) -> bool:
    """math-verify with its signal-based timeouts off; runs in the worker process."""
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    answer_parsed = parse(f"${answer}$", parsing_timeout=None)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def import_in_worker() -> None:
    """Worker initializer: import math-verify (seconds) before taking tasks, so a task's timeout never pays it.

    pebble starts a task's clock when a worker takes it, and runs the initializer before that, also in the
    worker that replaces a killed one.
    """
    import logging

    import math_verify  # noqa: F401

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silence "timeout is disabled" warnings


def _worker_pool() -> Any:
    global _pool
    with _pool_lock:
        if _pool is None:
            try:
                import math_verify  # noqa: F401  (fail here, in the parent, with a useful message)
                from pebble import ProcessPool
            except ModuleNotFoundError as e:
                raise PowerSampleError(f"grading math needs {e.name!r}: pip install 'powersample[eval]'") from None
            # fork, not spawn: spawn re-imports __main__, which breaks scripts without a main guard. The forked
            # worker only runs sympy, never the model or its threads.
            fork = multiprocessing.get_context("fork")
            _pool = ProcessPool(max_workers=1, initializer=import_in_worker, context=fork)
            atexit.register(shutdown)
        return _pool


def shutdown() -> None:
    """Stop the worker process (registered at exit)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.stop()
            _pool.join()
            _pool = None
