"""Running chains: each chain is a program (a generator) that yields backend requests and receives continuations.

Writing a sampler as one straight-line program per chain keeps the algorithm readable, and leaves batching to the
driver: every live chain's pending request goes into one backend call. A backend that can refill its batch as
rows finish (`extend_continuous`) keeps it full instead; a chain's draws come from its own generator in the same
order either way, so the two schedules give the same samples (up to the engine's batched numerics).
"""

from __future__ import annotations

from typing import Callable, Generator, Sequence

from powersample.backends.base import Backend, Continuation, ExtendRequest, Proposal
from powersample.samplers.chain import ChainResult, Progress

Program = Generator[ExtendRequest, Continuation, ChainResult]


def drive(
    backend: Backend, programs: Sequence[Program], proposal: Proposal, progress: Progress | None = None
) -> list[ChainResult]:
    """Run every program to its end; returns their results in order."""
    results: dict[int, ChainResult] = {}
    pending = {j: req for j, p in enumerate(programs) if (req := _advance(p, None, results, j)) is not None}
    continuous = getattr(backend, "extend_continuous", None)
    if continuous is not None:
        continuous(pending, proposal, _refill(programs, results, progress))
    else:
        _lockstep(backend, programs, pending, proposal, results, progress)
    return [results[j] for j in range(len(programs))]


def _lockstep(backend, programs, pending, proposal, results, progress) -> None:
    """One batched backend call per round, serving the pending request of every live chain."""
    while pending:
        conts = backend.extend(list(pending.values()), proposal)
        for j, cont in zip(list(pending), conts):
            if (req := _advance(programs[j], cont, results, j)) is None:
                del pending[j]
            else:
                pending[j] = req
        _report(progress, len(conts))


def _refill(programs, results, progress) -> Callable[[int, Continuation], ExtendRequest | None]:
    def refill(j: int, cont: Continuation) -> ExtendRequest | None:
        _report(progress, 1)
        return _advance(programs[j], cont, results, j)

    return refill


def _advance(program: Program, cont: Continuation | None, results: dict, j: int) -> ExtendRequest | None:
    """Send `cont` to the program; its next request, or None once it has returned its result."""
    try:
        return next(program) if cont is None else program.send(cont)
    except StopIteration as stop:
        results[j] = stop.value
        return None


def _report(progress: Progress | None, n: int) -> None:
    if progress:
        progress(n)
