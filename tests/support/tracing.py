"""Exact laws of the samplers' real programs, by tracing every random choice (the idea of genlm-control's
`trace_swor`; our own code).

A sampler draws all its randomness through powersample.core.draws, from its chain's generator, and so does the toy
backend. Here that generator is a `Source` that turns each choice into a fork. The program runs once per path of
its choices, depth first: a run replays a prefix of choices, then takes the first outcome of every new choice and
notes the others, which later runs explore, each with its exact probability. An outcome of probability 0 is never
run, and a choice with a single possible outcome is no fork. The law of the output is the probability-weighted sum
over the paths.

The choices, as the Source makes them:
- `token(cdf)`: one branch per interval of the inverse CDF with positive width (an engine's token, MTM's pick, SMC's
  final choice, power-cut's cut).
- `uniform_index(n)`: n branches of 1/n (power's cut).
- `log_uniform()`: a symbolic `LogU`. Adding a float shifts it, and a positive factor scales it. Comparing it with a
  float forks in two, and each branch narrows the interval that u is known to lie in. So the floor's comparisons,
  token by token, and then the MH test log u <= log r are all exact conditional probabilities of one uniform.
- `systematic(probs)`: one branch per interval of u over which SMC's N picks stay the same.
- `spawn(n)`: this same source n times. Every choice is a fresh fork, so the children are independent anyway.

Merging. Paths that reach the same state have the same future. When the caller names the state (`Merge`: everything
the rest of the program reads, at each backend call and at some of the program's own choices), the tracer explores
that future once and reuses its law: dynamic programming over states, as tests/exact_laws.py does by hand. The law
is exact either way. Merging only saves runs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import numpy as np

from powersample.backends.toy import ToyBackend, ToySpec
from powersample.config import SamplerConfig
from powersample.core.draws import Source, systematic_picks
from powersample.core.types import ExtendRequest, Floor, Tokens
from powersample.samplers import on_engine, run_chains
from powersample.samplers.chain import Chain, ChainResult

Law = dict[Hashable, float]


class Known(BaseException):
    """Raised at a backend call whose state was explored before, with the law of the rest of the run. A
    BaseException, so that no program or driver handles it as its own error."""

    def __init__(self, law: Law):
        self.law = law


@dataclass
class Path:
    """One run's choices: it replays `prefix`, then takes the first outcome of each new choice and notes the others
    (and the states reached after each new choice, for the memo)."""

    prefix: tuple[int, ...]
    at: int = 0  # choices made so far
    forks: list[list[tuple[int, float]]] = field(default_factory=list)  # each new choice's outcomes, with their p
    states: list[tuple[int, Hashable]] = field(default_factory=list)  # (new choices before it, state)

    def choose(self, probs: Sequence[float]) -> int:
        """The outcome of a choice among len(probs) outcomes with these probabilities."""
        live = [(k, float(p)) for k, p in enumerate(probs) if p > 0]
        if len(live) == 1:
            return live[0][0]
        self.at += 1
        if self.at <= len(self.prefix):
            return self.prefix[self.at - 1]
        self.forks.append(live)
        return live[0][0]

    @property
    def replaying(self) -> bool:
        return self.at < len(self.prefix)

    def choices(self, j: int) -> tuple[int, ...]:
        """The choices made before the j-th new one."""
        return self.prefix + tuple(options[0][0] for options in self.forks[:j])


class Uniform:
    """A uniform u on (lo, hi], narrowed by each comparison that a run makes on it."""

    def __init__(self, path: Path):
        self.path, self.lo, self.hi = path, 0.0, 1.0

    def at_most(self, log_t: float) -> bool:
        """Whether log u <= log_t. A fork, unless u's interval decides it."""
        t = min(max(math.exp(log_t), self.lo), self.hi)  # exp(-inf) = 0
        p = (t - self.lo) / (self.hi - self.lo)
        below = self.path.choose([p, 1.0 - p]) == 0
        if below:
            self.hi = t
        else:
            self.lo = t
        return below


class LogU:
    """scale * log u + shift (scale > 0), for a traced uniform u. It can be shifted by a float, scaled by a positive
    one and compared with a float, nothing else (ties have probability 0, so < and <= are the same fork)."""

    __array_ufunc__ = None  # numpy scalars on the left defer to our reflected comparisons

    def __init__(self, u: Uniform, scale: float = 1.0, shift: float = 0.0):
        self.u, self.scale, self.shift = u, scale, shift

    def __add__(self, x: float) -> LogU:
        return LogU(self.u, self.scale, self.shift + float(x))

    __radd__ = __add__

    def __sub__(self, x: float | LogU) -> LogU | float:
        if isinstance(x, LogU):
            if x.u is not self.u or x.scale != self.scale:
                return NotImplemented
            return self.shift - x.shift  # the same u cancels
        return LogU(self.u, self.scale, self.shift - float(x))

    def __mul__(self, x: float) -> LogU:
        if not x > 0:
            return NotImplemented
        return LogU(self.u, self.scale * float(x), self.shift * float(x))

    __rmul__ = __mul__

    def __truediv__(self, x: float) -> LogU:
        return self * (1.0 / x)

    def __le__(self, x: float) -> bool:
        return self.u.at_most((float(x) - self.shift) / self.scale)

    def __ge__(self, x: float) -> bool:
        return not self.u.at_most((float(x) - self.shift) / self.scale)

    __lt__, __gt__ = __le__, __ge__

    def __float__(self) -> float:
        raise TypeError("a traced log u can only be shifted, scaled and compared with floats")

    def frozen(self) -> tuple:
        return "log u", self.scale, self.shift, self.u.lo, self.u.hi


class Tracer:
    """Sources of one path each, over one `run`; the memo of explored states. See the module docstring."""

    def __init__(self, run: Callable[[Source], Hashable]):
        self.run = run
        self.memo: dict[Hashable, Law] = {}
        self.path = Path(())
        self.runs = 0  # programs run: one per node of the explored tree

    def law(self) -> Law:
        """The exact law of run's output."""
        return self._explore(())

    def reached(self, state: Hashable) -> None:
        """Called by a run between choices: every path that reaches `state` has the same future."""
        if self.path.replaying:
            return  # an earlier run already passed here on this path
        if state in self.memo:
            raise Known(self.memo[state])
        self.path.states.append((len(self.path.forks), state))

    def _explore(self, prefix: tuple[int, ...]) -> Law:
        """The law of the output given the choices `prefix`: one run down the first outcome of every new choice,
        then the other outcomes of each, deepest first."""
        self.path = path = Path(prefix)
        self.runs += 1
        try:
            law = {self.run(TracingSource(path)): 1.0}
        except Known as known:
            law = known.law
        for j in reversed(range(len(path.forks))):  # `law`: the law after the first outcome of new choice j
            self._remember(path, j + 1, law)
            (_, p), *others = path.forks[j]
            law = mix([(p, law)] + [(q, self._explore(path.choices(j) + (k,))) for k, q in others])
        self._remember(path, 0, law)
        return law

    def _remember(self, path: Path, after: int, law: Law) -> None:
        """Memoize `law` for the states that the run reached after `after` new choices (and before the next)."""
        for n, state in path.states:
            if n == after:
                self.memo[state] = law


class TracingSource:
    """The `Source` of one run: every choice goes to its path (core.draws.Source). `before`, when given, hears the
    name of each primitive before it chooses."""

    def __init__(self, path: Path, before: Callable[[str], None] | None = None):
        self.path, self.before = path, before or (lambda primitive: None)

    def token(self, cdf: Sequence[float] | np.ndarray) -> int:
        self.before("token")
        cdf = cdf.tolist() if isinstance(cdf, np.ndarray) else cdf
        return self.path.choose([(hi - lo) / cdf[-1] for lo, hi in zip([0.0, *cdf], cdf)])

    def uniform_index(self, n: int) -> int:
        self.before("uniform_index")
        return self.path.choose([1.0 / n] * n)

    def log_uniform(self) -> LogU:
        self.before("log_uniform")
        return LogU(Uniform(self.path))

    def systematic(self, probs: np.ndarray) -> np.ndarray:
        self.before("systematic")
        pieces = systematic_pieces(probs)
        return np.array(list(pieces)[self.path.choose(list(pieces.values()))])

    def spawn(self, n: int) -> list[TracingSource]:
        self.before("spawn")
        return [self] * n


def systematic_pieces(probs: np.ndarray) -> dict[tuple[int, ...], float]:
    """Each outcome of systematic resampling with its probability: u in [0, 1) is cut where a point (u + j) / N
    meets the CDF, and the picks are read off at the middle of each piece."""
    n, cdf = len(probs), np.cumsum(probs)
    cuts = sorted({0.0, 1.0} | {float(n * c - j) for c in cdf for j in range(n) if 0.0 < n * c - j < 1.0})
    pieces: dict[tuple[int, ...], float] = defaultdict(float)
    for lo, hi in zip(cuts, cuts[1:]):
        pieces[tuple(systematic_picks(probs, (lo + hi) / 2).tolist())] += hi - lo
    return dict(pieces)


def trace(run: Callable[[Source], Hashable]) -> Law:
    """The exact law of run(source)'s output, where run draws all its randomness from `source`."""
    return Tracer(run).law()


def mix(parts: Sequence[tuple[float, Law]]) -> Law:
    """sum_k p_k law_k."""
    out: Law = defaultdict(float)
    for p, law in parts:
        for x, w in law.items():
            out[x] += p * w
    return dict(out)


# --- the samplers' programs on a toy model ------------------------------------------------------------------------


class TracingBackend(ToyBackend):
    """The toy backend, telling a callback about every call before serving it (the program waits at its yield), and
    whether it is serving one (a choice made meanwhile is the engine's)."""

    before: Callable[[Sequence[ExtendRequest]], None] | None = None
    serving = False

    def extend(self, requests, proposal):
        if self.before is not None:
            self.before(requests)
        self.serving = True
        try:
            return super().extend(requests, proposal)
        finally:
            self.serving = False


def tokens_of(result: ChainResult) -> Tokens:
    return result.tokens


def chain_state(chain: Chain) -> Hashable:
    """A chain's state: its sequence with per-token log p, log q and entropy. The counters are left out: they decide
    nothing in power, max-swap, power-cut or power-mtm, so the law of the tokens does not see them."""
    return tuple(chain.tokens), tuple(chain.base_logp), tuple(chain.proposal_logq), tuple(chain.entropy)


@dataclass(frozen=True)
class Merge:
    """Where a program's paths merge. At each backend call, and at each of the program's own choices through a
    primitive named in `picks`, the program's state must be `state(chain)` with the number of calls so far (and the
    requests, at a call): nothing else that the rest of the program reads. For power, max-swap and power-mtm the cut
    (uniform_index), for power-cut its cut (token): the program holds nothing else when it picks it."""

    state: Callable[[Chain], Hashable] = chain_state
    picks: tuple[str, ...] = ()


def program_law(
    backend: TracingBackend,
    config: SamplerConfig,
    output: Callable[..., Hashable] = tokens_of,
    merge: Merge | None = None,
    notes: bool = False,
) -> Law:
    """The exact law of `output(result)` of one chain of config.method's real program (samplers.run_chains, the
    driver, the toy backend). With `merge`, paths that reach the same state are explored once. With `notes`, the
    chain is traced (Chain.note) and `output(result, events)` also gets its events."""
    tracer = None

    def run(source: TracingSource) -> Hashable:
        chain, calls, events = Chain(rng=source, slot=0), [0], []

        def called(requests: Sequence[ExtendRequest]) -> None:
            tracer.reached(("call", calls[0], requests_state(requests), merge.state(chain)))
            calls[0] += 1

        def picks(primitive: str) -> None:
            if primitive in merge.picks and not backend.serving:
                tracer.reached(("pick", primitive, calls[0], merge.state(chain)))

        if merge is not None:
            backend.before, source.before = called, picks
        if notes:
            chain.trace, chain.return_particles = events.append, config.method == "power-smc"
        [result] = run_chains(backend, (), config, [chain])
        return output(result, events) if notes else output(result)

    assert not (notes and merge), "a chain's events are its whole history: no two paths merge"
    config, tracer = on_engine(config, backend), Tracer(run)  # resolved once, not per run
    try:
        return tracer.law()
    finally:
        backend.before = None


def token_state(chain: Chain) -> Hashable:
    """The tokens alone: all that power-rollout's program reads of its chain (its log q are its choices' odds)."""
    return tuple(chain.tokens)


MERGES = {  # where each method's program may merge (see Merge); power-smc and bon keep state of their own
    "power": Merge(picks=("uniform_index",)),
    "max-swap": Merge(picks=("uniform_index",)),
    "power-mtm": Merge(picks=("uniform_index",)),
    "power-cut": Merge(picks=("token",)),
    "power-rollout": Merge(state=token_state),
}


def sampler_law(spec: ToySpec, config: SamplerConfig) -> Law:
    """The exact law of the tokens of one chain of config.method on `spec`, merged where the method allows."""
    return program_law(TracingBackend(spec), config, merge=MERGES.get(config.method))


def requests_state(requests: Sequence[ExtendRequest]) -> tuple:
    """What the rest of a program depends on in its requests. The draft is left out: it decides how many tokens a
    forward verifies, never which (core.drafts)."""
    return tuple(
        (r.context, r.max_tokens, r.report.alternatives, r.report.entropy, floor_state(r.hints.floor)) for r in requests
    )


def floor_state(floor: Floor | None) -> tuple | None:
    if floor is None:
        return None
    least = floor.least.frozen() if isinstance(floor.least, LogU) else floor.least
    return least, floor.weight, floor.offset, floor.per_length


def total(law: Law) -> float:
    """The mass of a law (1 for a distribution)."""
    return math.fsum(law.values())


def assert_same_law(have: Law, want: Law, tol: float = 1e-12) -> None:
    """A traced law is a distribution, and within `tol` of `want` in total variation."""
    assert math.isclose(total(have), 1.0, abs_tol=1e-12), f"the traced law sums to {total(have)!r}"
    distance = 0.5 * math.fsum(abs(have.get(x, 0.0) - want.get(x, 0.0)) for x in have.keys() | want.keys())
    assert distance < tol, f"TV {distance:.3g} between the traced law and the exact one"
