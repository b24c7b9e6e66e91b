"""The batching engine: ONE thread owns the backend and runs every request's chains in shared batches.

HTTP handlers turn a request into sampler programs (one per chain) and `submit` them as a Job. The engine thread
runs a `Scheduler` whose `admit` hook hands it the jobs that arrived meanwhile, so new chains JOIN the batch that is
already decoding (continuous backends poll it every decoding step, lockstep ones every round) instead of waiting
for the running requests to finish.

One Scheduler serves one Proposal (temperature, top-k, top-p). Jobs are taken strictly in arrival order: a run
admits the jobs at the head of the queue while they share its proposal, and stops admitting at the first job with
another proposal. That run then drains and the next one serves the other proposal. So requests with the same
proposal batch together, and no proposal can starve another.

Stopping. A job is stopped when its client disconnects or its deadline passes. Each of its programs is wrapped
(`_guarded`) so that it checks the job before it makes its next request: a program only runs again when its last
request's continuation is back, so a stopped job frees its chains (and their cache slots) at the next request
boundary — at most one block of MH work (or one whole plain continuation) after the stop. Jobs still waiting in
the queue are dropped at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, Union

from powersample.backends.base import Backend, Proposal
from powersample.samplers import ChainResult
from powersample.samplers.driver import Program, Reply, Scheduler, Step

Outcome = Union[ChainResult, BaseException]
JobDone = Callable[[list[Outcome]], None]  # gets every chain's outcome, in chain order


class Stopped(Exception):
    """A job's chain was stopped before it finished (the client left, or the job's deadline passed)."""


@dataclass(eq=False)
class Job:
    """One request's chains: they share a proposal, a deadline and a callback for when all have finished."""

    programs: Sequence[Program]
    proposal: Proposal
    deadline: float  # time.monotonic() after which the job is stopped
    on_done: JobDone  # called once, from the engine thread, with one outcome per program
    outcomes: list = field(default_factory=list)
    remaining: int = 0  # programs not finished yet
    stop_reason: str | None = None

    def __post_init__(self) -> None:
        self.outcomes, self.remaining = [None] * len(self.programs), len(self.programs)

    def stop(self, reason: str) -> None:
        """Ask the job's chains to stop at their next request (safe from any thread)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def stopped(self) -> str | None:
        """Why the job should stop now, or None."""
        if self.stop_reason is None and time.monotonic() > self.deadline:
            self.stop_reason = "timeout"
        return self.stop_reason


class Engine:
    """Owns `backend` from one thread; jobs come in through `submit` from any thread."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()  # waiting jobs, in arrival order
        self._running: set[Job] = set()  # jobs admitted to the current Scheduler run
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="powersample-engine", daemon=True)
        self.runs = 0  # Scheduler runs so far
        self.peak_chains = 0  # most chains in flight in one run at once (shows that requests batched together)
        self._chains_in_run = 0

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop every job, let the thread finish its run, and join it."""
        with self._cv:
            self._closing = True
            for job in list(self._queue) + list(self._running):
                job.stop("server shutting down")
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing:
                raise RuntimeError("the engine is shutting down")
            self._queue.append(job)
            self._cv.notify_all()

    def chains_in_flight(self) -> int:
        """Chains waiting or running: 0 means nothing is left in the engine."""
        with self._cv:
            return sum(job.remaining for job in self._queue) + sum(job.remaining for job in self._running)

    def stats(self) -> dict:
        with self._cv:
            return {
                "chains_in_flight": sum(j.remaining for j in self._queue) + sum(j.remaining for j in self._running),
                "requests_waiting": len(self._queue),
                "requests_running": len(self._running),
                "scheduler_runs": self.runs,
                "peak_chains": self.peak_chains,
                "engine_alive": self._thread.is_alive(),
            }

    # --- the engine thread ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                proposal = self._queue[0].proposal
                self.runs += 1
                self._chains_in_run = 0
            try:
                Scheduler(self.backend, proposal, admit=lambda: self._admit(proposal)).run()
            except BaseException as error:  # noqa: BLE001 - an engine failure fails its jobs, never the server
                self._fail_running(error)

    def _admit(self, proposal: Proposal) -> list[tuple[Program, Callable]]:
        """The head-of-queue jobs with `proposal` (stopped ones are answered at once, without running)."""
        admitted = []
        with self._cv:
            while self._queue and self._queue[0].proposal == proposal:
                job = self._queue.popleft()
                if job.stopped():
                    self._drop(job)
                    continue
                self._running.add(job)
                self._chains_in_run += len(job.programs)
                self.peak_chains = max(self.peak_chains, self._chains_in_run)
                admitted += [(_guarded(p, job), self._done(job, j)) for j, p in enumerate(job.programs)]
        return admitted

    def _done(self, job: Job, index: int) -> Callable[[Outcome], None]:
        def done(outcome: Outcome) -> None:
            with self._cv:
                job.outcomes[index] = outcome
                job.remaining -= 1
                self._chains_in_run -= 1
                finished = job.remaining == 0
                if finished:
                    self._running.discard(job)
            if finished:
                job.on_done(job.outcomes)

        return done

    def _drop(self, job: Job) -> None:
        """Answer a job that never started (called with the lock held)."""
        for program in job.programs:
            program.close()
        job.outcomes, job.remaining = [Stopped(job.stop_reason)] * len(job.programs), 0
        job.on_done(job.outcomes)

    def _fail_running(self, error: BaseException) -> None:
        """The backend raised out of a run: every job in that run fails with the error."""
        with self._cv:
            jobs, self._running = list(self._running), set()
            self._chains_in_run = 0
        for job in jobs:
            for program in job.programs:
                program.close()
            job.outcomes = [o if o is not None else error for o in job.outcomes]
            job.remaining = 0
            job.on_done(job.outcomes)


def _guarded(program: Program, job: Job) -> Iterator[Step]:
    """`program`, stopped with `Stopped` (and closed) at its next request once `job` is stopped."""
    try:
        step = next(program)
        while True:
            if job.stopped():
                raise Stopped(job.stop_reason)
            reply: Reply = yield step
            if job.stopped():
                raise Stopped(job.stop_reason)
            step = program.send(reply)
    except StopIteration as stop:
        return stop.value
    finally:
        program.close()
