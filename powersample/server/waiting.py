"""Waiting on the engine from the event loop: a request's chains (a `Job`) or a one-off backend call (a `Call`) are
handed to the engine thread, and the handler waits for their future while it watches its client and its deadline.
A client that disconnects, or a deadline that passes, stops the work (499 / 504); a chain that failed fails the
request with the status its failure calls for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Request

from powersample.core.types import Proposal
from powersample.errors import PowerSampleError, one_line
from powersample.samplers.driver import Program
from powersample.server.engine import Call, Engine, Job, Steps, Stopped
from powersample.server.protocol import ApiError
from powersample.server.requests import client_closed

POLL_SECONDS = 0.1  # how often a waiting handler checks its client and its deadline


def submit(
    engine: Engine,
    progs: Sequence[Program],
    proposal: Proposal,
    deadline: float,
    work: int,
    sizes: Sequence[int] = (),
) -> tuple[Job, asyncio.Future]:
    """Submit the chains as one Job (`sizes`: the bytes each holds, Job.sizes); the future gets their outcomes, on
    the event loop."""
    future, on_done = _future()
    job = Job(progs, proposal, deadline, lambda outcomes: on_done(list(outcomes)), work=work, sizes=sizes)
    engine.submit(job)
    return job, future


async def wait_job(request: Request, job: Job, future: asyncio.Future, deadline: float, timeout: float) -> list:
    """The outcomes of a submitted job, stopping it when the client leaves or the deadline passes."""
    try:
        await watch(request, future, deadline, job.stop, timeout)
    finally:
        if not future.done():
            job.stop("request abandoned")
    return results(future.result(), timeout)


async def on_engine(
    request: Request, engine: Engine, steps: Callable[[], Steps], deadline: float, timeout: float, work: int = 0
) -> Any:
    """The result of the generator steps() run on the engine thread (a `Call` of `work`), watched like a job: 499
    when the client leaves first, 504 past the deadline; its exception answers as a chain's would (400 for a
    PowerSampleError)."""
    future, on_done = _future()
    call = Call(steps, deadline, lambda outcome: on_done([outcome]), work=work)
    engine.call(call)
    try:
        await watch(request, future, deadline, call.stop, timeout)
    finally:
        if not future.done():
            call.stop("request abandoned")
    return results(future.result(), timeout)[0]


async def watch(
    request: Request, work: asyncio.Future, deadline: float, stop: Callable[[str], None], timeout: float
) -> None:
    """Wait for `work`; when the client disconnects or the deadline passes first, stop(reason) and answer 499/504."""
    while not work.done():
        await asyncio.wait({work}, timeout=POLL_SECONDS)
        if work.done():
            return
        if await request.is_disconnected():
            stop("client disconnected")
            raise client_closed()
        if time.monotonic() > deadline:
            stop("timeout")
            raise timeout_error(timeout)


def results(outcomes: list, timeout: float) -> list:
    """The chains' results; a failed chain fails the request (400 bad input, 504 timeout, 503 shutdown, else 500)."""
    for outcome in outcomes:
        if isinstance(outcome, Stopped) and str(outcome) == "timeout":
            raise timeout_error(timeout)
        if isinstance(outcome, Stopped):  # the server is shutting down
            raise ApiError(503, f"the request was stopped: {outcome}", kind="server_error", code="stopped")
        if isinstance(outcome, PowerSampleError):
            raise ApiError(400, str(outcome))
        if isinstance(outcome, BaseException):
            raise ApiError(500, f"the engine failed: {one_line(outcome)}", kind="server_error", code="engine_error")
    return outcomes


def timeout_error(timeout: float) -> ApiError:
    return ApiError(
        504,
        f"the request took longer than the server's request timeout ({timeout:g} s); its chains were stopped",
        kind="timeout_error",
        code="timeout",
    )


def _future() -> tuple[asyncio.Future, Callable[[list], None]]:
    """A future on the running loop, and the function that settles it from any thread (a no-op once the loop is
    gone: at shutdown nobody waits any more)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(outcomes: list) -> None:
        if not future.done():
            future.set_result(outcomes)

    def on_done(outcomes: list) -> None:  # from the engine thread
        try:
            loop.call_soon_threadsafe(settle, outcomes)
        except RuntimeError:
            pass

    return future, on_done
