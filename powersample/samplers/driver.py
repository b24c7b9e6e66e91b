"""Running chains: each chain is a program (a generator) that yields backend requests and receives continuations.

Writing a sampler as one straight-line program per chain keeps the algorithm readable, and leaves batching to the
driver: every live program's pending requests go into one backend call. A program yields either one ExtendRequest
(and receives one Continuation) or a tuple of them (and receives a tuple, in order): a tuple's requests are all in
flight together, so SMC particles, multiple tries or rollouts share the engine's batch. The library's programs ask
through `ask` and `ask_all` (`cont = yield from ask(request)`), which give the reply its precise type. A backend
that can refill its batch as rows finish (`extend_continuous`: the optional capability ContinuousBatching of
backends/base.py) keeps it full instead of running lockstep rounds; a chain's draws come from its own generator in
the same order either way, so the two schedules give the same samples (up to the engine's batched numerics).

Slots. A program names its caches with its own slot numbers (0, 1, ... for the members of a tuple); the driver maps
them to slots unique among the programs in flight, and reuses a finished program's slots for the next program.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Callable, Generator, Iterable, Sequence

from powersample.backends.base import Backend, ContinuousBatching, capability
from powersample.core.types import Continuation, ExtendRequest, Proposal
from powersample.samplers.chain import ChainResult, Progress

Step = ExtendRequest | tuple[ExtendRequest, ...]  # what a program yields
Reply = Continuation | tuple[Continuation, ...]  # what it gets back: a Continuation for a request, a tuple for a tuple
Program = Generator[Step, Reply, ChainResult]
Done = Callable[[ChainResult | BaseException], None]  # gets a program's result, or the exception it raised
Admit = Callable[[], Iterable[tuple[Program, Done]]]  # programs that arrived since the last call


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
    backend: Backend, programs: Sequence[Program], proposal: Proposal, progress: Progress | None = None
) -> list[ChainResult]:
    """Run every program to its end; returns their results in order (re-raises the first program's exception)."""
    results: dict[int, ChainResult | BaseException] = {}
    Scheduler(backend, proposal, progress).run([(p, _store(results, j)) for j, p in enumerate(programs)])
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
    slots: dict[int, int] = field(default_factory=dict)  # the program's slot -> the driver's slot
    grouped: bool = False  # the pending step was a tuple
    replies: list = field(default_factory=list)
    missing: int = 0


class Scheduler:
    """Programs in flight over one backend and one proposal. `admit`, when given, is polled for programs that join
    while it runs (a server's new requests); `run` returns once nothing is in flight and `admit` has nothing."""

    def __init__(
        self, backend: Backend, proposal: Proposal, progress: Progress | None = None, admit: Admit | None = None
    ):
        self.backend, self.proposal, self.progress, self.admit = backend, proposal, progress, admit
        self._keys: dict[int, tuple[_Task, int]] = {}  # request key -> (task, member of its step)
        self._next_key = 0
        self._free: list[int] = []  # released slots, smallest first
        self._next_slot = 0

    def run(self, programs: Iterable[tuple[Program, Done]] = ()) -> None:
        pending: dict[int, ExtendRequest] = {}
        for program, done in programs:
            pending |= self._start(program, done)
        continuous = capability(self.backend, ContinuousBatching)
        if continuous is not None:
            continuous.extend_continuous(pending, self.proposal, self.reply, self.poll)
        else:
            self._lockstep(pending)

    def poll(self) -> dict[int, ExtendRequest]:
        """Requests of the programs `admit` has for us now."""
        new: dict[int, ExtendRequest] = {}
        for program, done in self.admit() if self.admit else ():
            new |= self._start(program, done)
        return new

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

    def _start(self, program: Program, done: Done) -> dict[int, ExtendRequest]:
        return self._advance(_Task(program, done), None)

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
        task.done(outcome)
        return {}

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
