"""The batching engine: ONE thread owns the backend and runs every request's chains in shared batches.

HTTP handlers turn a request into sampler programs (one per chain) and `submit` them as a Job. The engine thread
runs a `Scheduler` whose `admit` hook hands it the jobs that arrived meanwhile, so new chains JOIN the batch that is
already decoding (continuous backends poll it every decoding step, lockstep ones every round) instead of waiting
for the running requests to finish.

One Scheduler serves one Proposal (temperature, top-k, top-p), so requests are grouped by proposal. A run serves the
proposal of the oldest waiting job: when it starts it takes every waiting job with that proposal, and while it runs
it admits newcomers with that proposal only as long as no job with another proposal waits. Once one does, the run
stops admitting, drains, and the next run serves the oldest waiting job's proposal. So same-proposal requests batch
together, and a request with another proposal waits at most for the running jobs to finish (no starvation).

Calls. Work that is not a chain (scoring prompts, ranking the tokens of finished samples: `Call`) runs on the same
thread, so the backend is only ever used from one thread. A call runs in steps (a generator that yields between its
forwards: the server scores a long prompt SCORE_CHUNK tokens at a time). A waiting call makes the running run stop
admitting, as a job with another proposal does; once it has drained, the oldest call makes one step, then the jobs
waiting by then get a run, then the next call makes a step, and so on: calls take turns with each other and with the
chains, so a long scoring request delays the others by one step at a time, not by its whole length.

Memory budget. With a `budget` (serve --max-memory), each job's chains carry the bytes of KV cache they hold
(`Job.sizes`, planned by backends/memory.py) and the Scheduler starts them only while those in flight fit it: the
rest wait in the run, in arrival order, and start as others finish. A chain that could never fit is refused when its
request arrives (400), so none waits forever.

Memory. Whenever the engine goes idle it calls the backend's `release_memory` (ReleasesMemory), if it has one: room
grown for a long request goes back once nothing is waiting or running.

Stopping. A job or a call is stopped when its client disconnects or its deadline passes. Each of a job's programs
is wrapped (`_guarded`): every request it makes carries the job's `halted` as its `halt` (ExtendRequest), which the
backend asks after every forward, so a request being decoded ends within one forward of the stop (a cut
continuation), and the program is stopped before it makes its next request. A call is stopped between two of its
steps. So a stopped job or call frees the engine within one forward: one decoding step of the batch, one scoring
chunk (SCORE_CHUNK tokens), or one chunk of a context's prefill (llama.cpp: N_BATCH tokens; hf prefills a context in
one forward). Jobs and calls still waiting are
answered at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace

from powersample.backends.base import Backend, ReleasesMemory, capability
from powersample.core.types import Proposal
from powersample.samplers import ChainResult
from powersample.samplers.driver import Program, Reply, Scheduler, Step, Work

Outcome = ChainResult | BaseException
JobDone = Callable[[list[Outcome]], None]  # gets every chain's outcome, in chain order


class Stopped(Exception):
    """A job's chain was stopped before it finished (the client left, or the job's deadline passed)."""


class _Stoppable:
    """stop/stopped of engine work with a deadline (Job, Call: dataclasses with `deadline` and `stop_reason`)."""

    deadline: float  # time.monotonic() after which the work is stopped ("timeout")
    stop_reason: str | None

    def stop(self, reason: str) -> None:
        """Ask the work to stop (safe from any thread): a job's chains at their next request; a call not to run (one
        already running finishes)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def stopped(self) -> str | None:
        """Why the work should stop now, or None."""
        if self.stop_reason is None and time.monotonic() > self.deadline:
            self.stop_reason = "timeout"
        return self.stop_reason

    def halted(self) -> bool:
        """Whether the work should stop now (an ExtendRequest's `halt`)."""
        return self.stopped() is not None


@dataclass(eq=False)
class Job(_Stoppable):
    """One request's chains: they share a proposal, a deadline and a callback for when all have finished."""

    programs: Sequence[Program]
    proposal: Proposal
    deadline: float  # time.monotonic() after which the job is stopped
    on_done: JobDone  # called once, from the engine thread, with one outcome per program
    work: int = 0  # members x max_tokens of the job (see protocol.check_budget): counted until the job is done
    sizes: Sequence[int] = ()  # bytes of KV cache each program holds while it runs (the memory plan); () = none
    outcomes: list = field(default_factory=list)
    remaining: int = 0  # programs not finished yet
    stop_reason: str | None = None

    def __post_init__(self) -> None:
        self.outcomes, self.remaining = [None] * len(self.programs), len(self.programs)


Steps = Generator[None, None, object]  # a call's work: yields between forwards, returns its result


@dataclass(eq=False)
class Call(_Stoppable):
    """Backend work outside any chain, run on the engine thread in steps (see the module docstring)."""

    steps: Callable[[], Steps]  # uses the backend; its result (or the exception it raises) goes to on_done
    deadline: float  # time.monotonic() after which the call is answered Stopped("timeout") at its next step
    on_done: Callable[[object], None]  # called once, from the engine thread
    work: int = 0  # tokens it scores x (1 + alternatives per token) (protocol.scoring_work): counted until done
    stop_reason: str | None = None
    running: Steps | None = None  # its generator, once its first step ran


class Engine:
    """Owns `backend` from one thread; jobs and calls come in through `submit` and `call` from any thread."""

    def __init__(self, backend: Backend, budget: int | None = None):
        self.backend = backend
        self.budget = budget  # the most bytes of KV cache the chains in flight may hold; None = no limit
        self._release = capability(backend, ReleasesMemory)  # memory grown for past work, given back when idle
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()  # waiting jobs, in arrival order
        self._running: set[Job] = set()  # jobs admitted to the current Scheduler run
        self._calls: deque[Call] = deque()  # calls not finished, in turn order (see the module docstring)
        self._calls_turn = True  # whether a call steps next, when jobs wait too (they take turns)
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
            for job in list(self._queue) + list(self._running) + list(self._calls):
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

    def call(self, call: Call) -> None:
        """Run `call` on the engine thread in steps, taking turns with the other calls and with the chains (the
        running Scheduler run stops admitting)."""
        with self._cv:
            if self._closing:
                raise RuntimeError("the engine is shutting down")
            self._calls.append(call)
            self._cv.notify_all()

    def chains_in_flight(self) -> int:
        """Chains waiting or running: 0 means nothing is left in the engine."""
        with self._cv:
            return sum(job.remaining for job in self._queue) + sum(job.remaining for job in self._running)

    def chain_counts(self) -> tuple[int, int]:
        """(chains waiting or running, chains waiting): what /metrics reads at each scrape."""
        with self._cv:
            queued = sum(job.remaining for job in self._queue)
            return queued + sum(job.remaining for job in self._running), queued

    def work_in_flight(self) -> int:
        """The work of the jobs and calls waiting or running (each counts in full until it is done)."""
        with self._cv:
            return sum(job.work for job in (*self._queue, *self._running) if job.remaining) + sum(
                call.work for call in self._calls
            )

    def stats(self) -> dict:
        with self._cv:
            return {
                "chains_in_flight": sum(j.remaining for j in self._queue) + sum(j.remaining for j in self._running),
                "requests_waiting": len(self._queue),
                "requests_running": len(self._running),
                "calls_in_flight": len(self._calls),
                "scheduler_runs": self.runs,
                "peak_chains": self.peak_chains,
                "memory_budget_bytes": self.budget,
                "engine_alive": self._thread.is_alive(),
            }

    # --- the engine thread ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                idle = not self._queue and not self._calls and not self._closing
            if idle and self._release is not None:
                self._release.release_memory()  # on this thread: the backend's, between requests
            with self._cv:
                while not self._queue and not self._calls and not self._closing:
                    self._cv.wait()
                if not self._calls and not self._queue:
                    return
                call = self._calls.popleft() if self._calls and (self._calls_turn or not self._queue) else None
                self._calls_turn = call is None
                if call is None:
                    proposal = self._queue[0].proposal  # the oldest job's
                    self.runs += 1
                    self._chains_in_run = 0
            if call is not None:
                if not _step(call):
                    with self._cv:
                        self._calls.append(call)  # its next step after the others' turns
                continue
            try:
                Scheduler(self.backend, proposal, admit=_Turn(self, proposal), budget=self.budget).run()
            except BaseException as error:  # noqa: BLE001 - an engine failure fails its jobs, never the server
                self._fail_running(error)

    def _admit(self, proposal: Proposal, first: bool) -> list[Work]:
        """The waiting jobs with `proposal`: all of them at the start of a run, later only while no job with another
        proposal, and no call, waits (see the module docstring). Stopped jobs are answered at once, without running."""
        admitted = []
        with self._cv:
            if not first and (self._calls or any(job.proposal != proposal for job in self._queue)):
                return []
            mine = [job for job in self._queue if job.proposal == proposal]
            self._queue = deque(job for job in self._queue if job.proposal != proposal)
            for job in mine:
                if job.stopped():
                    self._drop(job)
                    continue
                self._running.add(job)
                self._chains_in_run += len(job.programs)
                self.peak_chains = max(self.peak_chains, self._chains_in_run)
                sizes = job.sizes or [0] * len(job.programs)
                admitted += [
                    Work(_guarded(p, job), self._done(job, j), b) for j, (p, b) in enumerate(zip(job.programs, sizes))
                ]
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


def _step(call: Call) -> bool:
    """One step of `call`; True once it is answered: with its result, the exception it raised, or Stopped."""
    reason = call.stopped()
    if reason is not None:
        if call.running is not None:
            call.running.close()
        call.on_done(Stopped(reason))
        return True
    try:
        if call.running is None:
            call.running = call.steps()
        next(call.running)
        return False
    except StopIteration as stop:
        result = stop.value
    except Exception as error:  # noqa: BLE001 - a failed call fails its request, never the engine
        result = error
    call.on_done(result)
    return True


class _Turn:
    """The `admit` hook of one Scheduler run: its first call starts the run (see Engine._admit)."""

    def __init__(self, engine: Engine, proposal: Proposal):
        self.engine, self.proposal, self.first = engine, proposal, True

    def __call__(self) -> list[Work]:
        taken, self.first = self.engine._admit(self.proposal, self.first), False
        return taken


def _guarded(program: Program, job: Job) -> Iterator[Step]:
    """`program` with `job.halted` on every request (the engine cuts them within one forward of a stop), stopped
    with `Stopped` (and closed) at its next request once `job` is stopped."""
    try:
        step = next(program)
        while True:
            if job.stopped():
                raise Stopped(job.stop_reason)
            reply: Reply = yield _halting(step, job)
            if job.stopped():
                raise Stopped(job.stop_reason)
            step = program.send(reply)
    except StopIteration as stop:
        return stop.value
    finally:
        program.close()


def _halting(step: Step, job: Job) -> Step:
    """The step's requests, each halted by the job (ExtendRequest.halt)."""
    if isinstance(step, tuple):
        return tuple(replace(request, halt=job.halted) for request in step)
    return replace(step, halt=job.halted)
