"""The driver: tuple steps, slot mapping, programs joining while it runs, failures, both schedules."""

from __future__ import annotations

import numpy as np
import pytest
from support.toy import load_spec

from powersample.backends.toy import ToyBackend
from powersample.core.types import ExtendRequest, Proposal, Report
from powersample.samplers.chain import ChainResult
from powersample.samplers.driver import Scheduler, drive


class Recording(ToyBackend):
    """A lockstep toy backend that records each call's slots."""

    def __init__(self, spec):
        super().__init__(spec)
        self.slot_calls: list[list[int]] = []

    def extend(self, requests, proposal):
        self.slot_calls.append([r.slot for r in requests])
        return super().extend(requests, proposal)


class Continuous(Recording):
    """Serves requests one at a time from a FIFO, polling for new ones like an engine's decoding loop."""

    def extend_continuous(self, requests, proposal, refill, poll=None):
        queue = list(requests.items())
        while True:
            queue += (poll() if poll else {}).items()
            if not queue:
                return
            key, request = queue.pop(0)
            [cont] = self.extend([request], proposal)
            queue += refill(key, cont).items()


BACKENDS = [Recording, Continuous]


def result(tokens=()) -> ChainResult:
    return ChainResult(tokens=tuple(tokens), token_logp=(), tokens_generated=0, proposals=0, accepted=0)


def fan_out(width: int, rounds: int, seed: int):
    """A program that yields `width` requests at once, `rounds` times; returns the first token of each reply."""
    rng = np.random.default_rng(seed)
    firsts = []
    for _ in range(rounds):
        conts = yield tuple(ExtendRequest((0,), 2, rng, slot=m) for m in range(width))
        assert isinstance(conts, tuple) and len(conts) == width
        firsts += [c.tokens[0] for c in conts]
    return result(firsts)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_tuple_steps_get_tuple_replies_and_share_calls(backend_cls):
    backend = backend_cls(load_spec("early_eos"))
    out = drive(backend, [fan_out(3, 2, seed=1), fan_out(2, 2, seed=2)], Proposal(1.0))
    assert [len(r.tokens) for r in out] == [6, 4]
    if backend_cls is Recording:  # lockstep: one call per round serves every member of every program
        assert [len(c) for c in backend.slot_calls] == [5, 5]


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_same_samples_in_either_schedule(backend_cls):
    spec = load_spec("eos_trap")
    out = drive(backend_cls(spec), [fan_out(3, 3, seed=s) for s in range(4)], Proposal(0.5))
    ref = drive(Recording(spec), [fan_out(3, 3, seed=s) for s in range(4)], Proposal(0.5))
    assert out == ref


def test_programs_slots_map_to_distinct_slots_and_are_reused():
    backend = Recording(load_spec("early_eos"))
    drive(backend, [fan_out(2, 1, seed=s) for s in range(3)], Proposal(1.0))
    assert sorted(backend.slot_calls[0]) == list(range(6))  # each program says 0 and 1; the driver makes them unique

    def program(rounds):
        for _ in range(rounds):
            yield ExtendRequest((0,), 1, np.random.default_rng(0), slot=0)
        return result()

    backend.slot_calls.clear()
    arrivals = [[], [(program(1), lambda r: None)]]
    admit = lambda: arrivals.pop(0) if arrivals else []  # noqa: E731
    Scheduler(backend, Proposal(1.0), admit=admit).run([(program(1), lambda r: None), (program(3), lambda r: None)])
    # round 1: both programs' slot 0 -> driver slots 0 and 1; the first finishes, and the program that joins at
    # round 2 gets its freed slot 0
    assert backend.slot_calls == [[0, 1], [1, 0], [1]]


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_programs_join_while_it_runs(backend_cls):
    backend = backend_cls(load_spec("early_eos"))
    results = []
    arrivals = [[(fan_out(2, 1, seed=9), results.append)], [], [(fan_out(1, 2, seed=8), results.append)]]
    admit = lambda: arrivals.pop(0) if arrivals else []  # noqa: E731
    Scheduler(backend, Proposal(1.0), admit=admit).run([(fan_out(1, 3, seed=7), results.append)])
    assert sorted(len(r.tokens) for r in results) == [2, 2, 3]
    assert not arrivals


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_a_failing_program_fails_alone(backend_cls):
    def broken():
        yield ExtendRequest((0,), 1, np.random.default_rng(0))
        raise RuntimeError("bug in a sampler")

    outcomes = []
    Scheduler(backend_cls(load_spec("early_eos")), Proposal(1.0)).run(
        [(broken(), outcomes.append), (fan_out(2, 2, seed=3), outcomes.append)]
    )
    assert [type(o) for o in outcomes] == [RuntimeError, ChainResult]
    with pytest.raises(RuntimeError, match="bug in a sampler"):
        drive(backend_cls(load_spec("early_eos")), [fan_out(1, 1, seed=0), broken()], Proposal(1.0))


def test_steps_need_distinct_slots_and_empty_steps_are_answered_at_once():
    def clash():
        rng = np.random.default_rng(0)
        yield (ExtendRequest((0,), 1, rng, slot=0), ExtendRequest((0,), 1, rng, slot=0))
        return result()

    def empty():
        reply = yield ()
        assert reply == ()
        return result((7,))

    backend = Recording(load_spec("early_eos"))
    with pytest.raises(ValueError, match="distinct slots"):
        drive(backend, [clash()], Proposal(1.0))
    assert drive(backend, [empty()], Proposal(1.0))[0].tokens == (7,)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_alternatives_are_the_likeliest_first_tokens(backend_cls):
    spec = load_spec("early_eos")
    backend = backend_cls(spec)
    request = ExtendRequest((0,), 1, np.random.default_rng(0), report=Report(alternatives=2))
    [cont] = backend.extend([request], Proposal(0.5))
    row = np.asarray(spec.row([0]))  # the row after the context
    best = sorted(range(len(row)), key=lambda t: (-row[t], t))[:2]
    assert [t for t, _ in cont.alternatives] == best
    assert [lp for _, lp in cont.alternatives] == pytest.approx(np.log(row[best]).tolist())
    [plain] = backend.extend([ExtendRequest((0,), 1, np.random.default_rng(0))], Proposal(0.5))
    assert plain.alternatives == ()
