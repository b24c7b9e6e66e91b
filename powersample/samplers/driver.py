"""Running chains: each chain is a program (a generator) that yields backend requests and receives continuations.

Writing a sampler as one straight-line program per chain keeps the algorithm readable, and leaves batching to the
driver: every live program's pending requests go into one backend call. A program yields either one ExtendRequest
(and receives one Continuation) or a tuple of them (and receives a tuple, in order): a tuple's requests are all in
flight together, so SMC particles, multiple tries or rollouts share the engine's batch. The library's programs ask
through `ask` and `ask_all` (`cont = yield from ask(request)`), which give the reply its precise type. A backend
that can refill its batch as rows finish (`extend_continuous`: the optional capability ContinuousBatching of
backends/base.py) keeps it full instead of running lockstep rounds; a chain's draws come from its own generator in
the same order either way, so the two schedules give the same samples (up to the engine's batched numerics).

Memory. A program may come with the bytes it holds while in flight (`Work.bytes`: its chain's KV caches, planned by
backends/memory.py). With a `budget`, the scheduler starts programs, in arrival order, only while the bytes of
those in flight fit it; the rest wait and start as others finish. A program bigger than the whole budget starts
alone (its caller refuses it first). Each chain draws from its own generator, so which programs run beside it
changes none of its draws: a budget changes when chains run, never what they sample.

Slots. A program names its caches with its own slot numbers (0, 1, ... for the members of a tuple); the driver maps
them to slots unique among the programs in flight, and reuses a finished program's slots for the next program.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Generator, Iterable, NamedTuple, Sequence

from powersample.backends.base import Backend, ContinuousBatching, capability
from powersample.core.types import Continuation, ExtendRequest, Proposal
from powersample.samplers.chain import ChainResult, Progress

Step = ExtendRequest | tuple[ExtendRequest, ...]  # what a program yields
Reply = Continuation | tuple[Continuation, ...]  # what it gets back: a Continuation for a request, a tuple for a tuple
Program = Generator[Step, Reply, ChainResult]
Done = Callable[[ChainResult | BaseException], None]  # gets a program's result, or the exception it raised


class Work(NamedTuple):
    """A program to run, what gets its outcome, and the bytes it holds while in flight (0 = none planned)."""

    program: Program
    done: Done
    bytes: int = 0


Item = tuple[Program, Done] | Work  # what the scheduler is given: a (program, done) pair holds no planned bytes
Admit = Callable[[], Iterable[Item]]  # programs that arrived since the last call


def ask(request: ExtendRequest) -> Generator[Step, Reply, Continuation]:
    """One request as a step of its own; its continuation (`cont = yield from ask(request)`)."""
    reply = yield request
    assert not isinstance(reply, tuple), "the driver answers a single request with a single continuation"
    return reply


def ask_all(requests: Iterable[ExtendRequest]) -> Generator[Step, Reply, tuple[Continuation, ...]]:
    """Requests in flight together, as one step; their continuations, in order (`conts = yield from
    ask_all(requests)`)."""
    reply = yield tuple(requests)
    assert isinstance(reply, tuple), "the driver answers a tuple of requests with a tuple of continuations"
    return reply


def drive(
    backend: Backend,
    programs: Sequence[Program],
    proposal: Proposal,
    progress: Progress | None = None,
    budget: int | None = None,
    program_bytes: int = 0,
) -> list[ChainResult]:
    """Run every program to its end, each holding `program_bytes`, at most `budget` bytes of them at once (None =
    all at once); returns their results in order (re-raises the first program's exception)."""
    results: dict[int, ChainResult | BaseException] = {}
    work = [Work(p, _store(results, j), program_bytes) for j, p in enumerate(programs)]
    Scheduler(backend, proposal, progress, budget=budget).run(work)
    out: list[ChainResult] = []
    for j in range(len(programs)):
        outcome = results[j]
        if isinstance(outcome, BaseException):
            raise outcome
        out.append(outcome)
    return out


def _store(results: dict[int, ChainResult | BaseException], j: int) -> Done:
    def done(outcome: ChainResult | BaseException) -> None:
        results[j] = outcome

    return done


@dataclass
class _Task:
    """A program in flight: its slots, and the replies gathered so far for the step it is waiting on."""

    program: Program
    done: Done
    bytes: int = 0  # held while in flight (Work.bytes)
    slots: dict[int, int] = field(default_factory=dict)  # the program's slot -> the driver's slot
    grouped: bool = False  # the pending step was a tuple
    replies: list = field(default_factory=list)
    missing: int = 0


class Scheduler:
    """Programs in flight over one backend and one proposal. `admit`, when given, is polled for programs that join
    while it runs (a server's new requests); `run` returns once nothing is in flight or waiting and `admit` has
    nothing. `budget`: the most bytes the programs in flight may hold (module docstring, Memory); None = no limit."""

    def __init__(
        self,
        backend: Backend,
        proposal: Proposal,
        progress: Progress | None = None,
        admit: Admit | None = None,
        budget: int | None = None,
    ):
        self.backend, self.proposal, self.progress, self.admit = backend, proposal, progress, admit
        self.budget = budget
        self._waiting: deque[Work] = deque()  # programs given but not started: over the budget, in arrival order
        self.in_flight = 0  # programs started and not finished
        self.held = 0  # their bytes
        self.peak_in_flight = 0  # most programs in flight at once (tests, and the server's stats)
        self._keys: dict[int, tuple[_Task, int]] = {}  # request key -> (task, member of its step)
        self._next_key = 0
        self._free: list[int] = []  # released slots, smallest first
        self._next_slot = 0

    def run(self, programs: Iterable[Item] = ()) -> None:
        self._waiting.extend(Work(*item) for item in programs)
        pending = self._start_waiting()
        continuous = capability(self.backend, ContinuousBatching)
        if continuous is not None:
            continuous.extend_continuous(pending, self.proposal, self.reply, self.poll)
        else:
            self._lockstep(pending)

    def poll(self) -> dict[int, ExtendRequest]:
        """Requests of the programs `admit` has for us now."""
        self._waiting.extend(Work(*item) for item in (self.admit() if self.admit else ()))
        return self._start_waiting()

    def reply(self, key: int, cont: Continuation) -> dict[int, ExtendRequest]:
        """Hand a finished request's continuation to its program; the requests it makes next (once its step is
        complete)."""
        self._report(1)
        task, member = self._keys.pop(key)
        task.replies[member] = cont
        task.missing -= 1
        if task.missing:
            return {}
        return self._advance(task, tuple(task.replies) if task.grouped else task.replies[0])

    def _lockstep(self, pending: dict[int, ExtendRequest]) -> None:
        """One batched backend call per round, serving the pending requests of every live program."""
        while True:
            pending |= self.poll()
            if not pending:
                return
            keys = list(pending)
            conts = self.backend.extend([pending[k] for k in keys], self.proposal)
            pending = {}
            for key, cont in zip(keys, conts):
                pending |= self.reply(key, cont)

    def _start_waiting(self) -> dict[int, ExtendRequest]:
        """Start the waiting programs, oldest first, while they fit the budget (one at least when none is in
        flight); the requests they make."""
        new: dict[int, ExtendRequest] = {}
        while self._waiting and self._fits(self._waiting[0].bytes):
            work = self._waiting.popleft()
            self.in_flight, self.held = self.in_flight + 1, self.held + work.bytes
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            new |= self._advance(_Task(work.program, work.done, work.bytes), None)
        return new

    def _fits(self, size: int) -> bool:
        return self.budget is None or self.in_flight == 0 or self.held + size <= self.budget

    def _advance(self, task: _Task, reply: Reply | None) -> dict[int, ExtendRequest]:
        """Send `reply` to the program; the requests of its next step, or {} once it has finished."""
        while True:
            try:
                step = next(task.program) if reply is None else task.program.send(reply)
            except StopIteration as stop:
                return self._finish(task, stop.value)
            except Exception as error:  # noqa: BLE001 - a failing program fails alone; drive() re-raises it
                return self._finish(task, error)
            if step != ():
                break
            reply = ()  # an empty step is answered at once
        requests = step if isinstance(step, tuple) else (step,)
        if len({r.slot for r in requests}) < len(requests):
            return self._finish(task, ValueError("the requests of one step need distinct slots"))
        task.grouped, task.replies, task.missing = isinstance(step, tuple), [None] * len(requests), len(requests)
        out = {}
        for member, request in enumerate(requests):
            key, self._next_key = self._next_key, self._next_key + 1
            self._keys[key] = (task, member)
            out[key] = replace(request, slot=self._slot(task, request.slot))
        return out

    def _finish(self, task: _Task, outcome: ChainResult | BaseException) -> dict[int, ExtendRequest]:
        for slot in task.slots.values():
            heapq.heappush(self._free, slot)
        task.slots.clear()
        self.in_flight, self.held = self.in_flight - 1, self.held - task.bytes
        task.done(outcome)
        return self._start_waiting()

    def _slot(self, task: _Task, own: int) -> int:
        if own not in task.slots:
            if self._free:
                task.slots[own] = heapq.heappop(self._free)
            else:
                task.slots[own], self._next_slot = self._next_slot, self._next_slot + 1
        return task.slots[own]

    def _report(self, n: int) -> None:
        if self.progress:
            self.progress(n)
