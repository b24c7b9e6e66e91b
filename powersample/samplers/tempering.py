"""Parallel power tempering (`power-pt`): K power-sampling chains on a ladder alpha_1 < ... < alpha_K = alpha that
swap states ("Explore Broadly, Reason Sharply", arXiv 2609.38104; our own implementation, exact by enumeration).

Target. At stage k the K replicas target the product prod_j pi_k^{alpha_j}, where pi_k^a is `power`'s stage target
with exponent a: over sequences x of length <= kB, complete ones (ending in EOS) with p(x)^a, EOS-free ones of exactly
kB tokens with their prefix probability p(x)^a. The top replica's marginal is power's pi_k^alpha; the lower rungs are
flatter, so their chains cross between modes that the top one alone would rarely leave.

Moves. Replica j is `power` at exponent alpha_j with its own proposal q_j (temperature 1/alpha_j, or the one
proposal_temperature every rung shares; top-k and top-p apply): at a stage's start each incomplete replica is
extended with q_j up to the stage's cap, and each MH sweep makes one `power` step in every replica, all K requests in
one batched call. After each sweep adjacent replicas swap states, the even pairs (1,2), (3,4), ... after even sweeps
and the odd pairs (2,3), ... after odd ones (numbered from 1 here; from 0 in the code), each accepted with

    min{1, exp[(alpha_{j+1} - alpha_j) * (log p(x^j) - log p(x^{j+1}))]}

where log p(x) is what power's acceptance reads: the full log p of a complete state, the prefix log p of an
incomplete one (both states lie in the stage's support, so the normalizers of pi_k cancel). A swap reads cached
numbers only: no model call. It satisfies detailed balance for the product target, and so does every replica's MH
step (for its own factor), so each sweep leaves prod_j pi_k^{alpha_j} invariant.

A state moved to another rung needs its tokens' log q under that rung's proposal. So every request also asks the
engine for each token's log q under every rung's proposal (Report.logq_under), and each replica keeps them all; with
one shared proposal there is nothing to ask.

Stopping and output. Sampling stops after the stage whose final top state is complete, or after the stage that
reaches T (as `power` stops on its one chain). The sample is the top replica's state; the other replicas come with it
when asked (Chain.return_replicas). With K = 1 the program is `power`, draw for draw.

Early rejection and speculation work per replica as in `power` (each request carries its replica's floor and draft).

Randomness: the top replica draws from the chain's generator, the others from children seeded from it (so that no
draw depends on how the engine serves the batch); each swap's uniform comes from the chain's generator after the
sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Generator, Sequence

from powersample.config import SamplerConfig
from powersample.core.draws import log_uniform, uniform_index
from powersample.core.types import Continuation, ExtendRequest, Proposal, Tokens
from powersample.errors import PowerSampleError
from powersample.samplers.chain import Chain, Rung
from powersample.samplers.driver import Program, Reply, Step, ask_all
from powersample.samplers.power import mh_step, note_extension, rejection_floor, suffix_request

Substep = Generator[Step, Reply, None]  # part of a program, which returns nothing


def ladder(config: SamplerConfig) -> tuple[float, ...]:
    """The powers alpha_1 < ... < alpha_K = alpha: `alphas` as given, or geometric from alpha_min to alpha."""
    if config.alphas is not None:
        return tuple(float(a) for a in config.alphas.split(","))
    k, lo, hi = config.replicas, config.alpha_min, config.alpha
    if k == 1:
        return (hi,)
    return tuple(lo * (hi / lo) ** (j / (k - 1)) for j in range(k - 1)) + (hi,)  # the last rung is alpha exactly


def check_ladder(config: SamplerConfig) -> None:
    """power-pt's refusals, before any model loads: a ladder of `replicas` increasing powers ending at alpha."""
    if config.alphas is None:
        if config.replicas > 1 and not config.alpha_min < config.alpha:
            raise PowerSampleError(
                f"alpha_min must be below alpha for a ladder of {config.replicas} replicas, got alpha_min "
                f"{config.alpha_min:g} and alpha {config.alpha:g}"
            )
        return
    rungs = [float(a) for a in config.alphas.split(",")]  # its form was checked with the field (LADDER_PATTERN)
    if len(rungs) != config.replicas:
        raise PowerSampleError(
            f"alphas lists {len(rungs)} powers but replicas is {config.replicas}; set replicas to {len(rungs)}"
        )
    if not all(math.isfinite(a) and a > 0 for a in rungs) or any(a >= b for a, b in zip(rungs, rungs[1:])):
        raise PowerSampleError(f"alphas must be positive and increasing, got {config.alphas!r}")
    if rungs[-1] != config.alpha:
        raise PowerSampleError(f"alphas must end at alpha ({config.alpha:g}), got {config.alphas!r}")


def rung_configs(config: SamplerConfig) -> tuple[SamplerConfig, ...]:
    """Each rung as a `power` config: its alpha, and its proposal temperature (1/alpha_j unless one is shared)."""
    tau = config.proposal_temperature
    return tuple(replace(config, alpha=a, proposal_temperature=1.0 / a if tau is None else tau) for a in ladder(config))


@dataclass
class Replica(Chain):
    """One rung's chain. Its state also keeps each token's log q under every rung's proposal (`under`, one list per
    rung), so that it can move to another rung; `proposal_logq` is the column of its own rung."""

    rung: int = 0
    under: list[list[float]] = field(default_factory=list)

    def append(self, cont: Continuation) -> None:
        super().append(cont)
        for column, new in zip(self.under, cont.logq_under):
            column.extend(new)

    def replace_suffix(self, i: int, cont: Continuation) -> None:
        for column in self.under:
            del column[i:]
        super().replace_suffix(i, cont)  # which appends through Replica.append

    def state(self) -> tuple[list[int], list[float], list[float], list[float], list[list[float]]]:
        return self.tokens, self.base_logp, self.proposal_logq, self.entropy, self.under

    def take(self, state: tuple[list[int], list[float], list[float], list[float], list[list[float]]]) -> None:
        """Hold `state` (another rung's), with its log q read off this rung's column (when rungs have their own)."""
        self.tokens, self.base_logp, self.proposal_logq, self.entropy, self.under = state
        if self.under:
            self.proposal_logq = list(self.under[self.rung])


@dataclass
class Swaps:
    """Swap moves per pair of adjacent rungs: attempted and accepted."""

    attempted: list[int]
    accepted: list[int]

    def result(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self.attempted, self.accepted))


def tempering_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int]) -> Program:
    """Parallel power tempering for one chain: K replicas, each stage's extensions and each sweep's proposals in one
    batched call, swaps after each sweep; returns the top replica's final state."""
    rungs = rung_configs(config)
    proposals = tuple(r.proposal_at(r.tau) for r in rungs)
    replicas = make_replicas(chain, prompt, rungs, len(set(proposals)) > 1)
    swaps, sweep = Swaps([0] * (len(rungs) - 1), [0] * (len(rungs) - 1)), 0
    top = replicas[-1]
    for stage, cap in enumerate(config.stage_caps(), start=1):
        yield from extend_replicas(prompt, rungs, proposals, replicas, (stage, cap), eos_ids)
        for step in range(config.mcmc_steps):
            yield from mh_sweep(prompt, rungs, proposals, replicas, cap, (stage, step))
            swap_pairs(chain, rungs, replicas, swaps, sweep, (stage, step))
            sweep += 1
        if top.complete(eos_ids):
            break
    return tempering_result(chain, rungs, replicas, swaps)


def tempering_work_units(config: SamplerConfig) -> int:
    """Backend requests one chain makes at most: per stage, K extensions and mcmc_steps x K proposals."""
    return len(config.stage_caps()) * (1 + config.mcmc_steps) * config.replicas


def make_replicas(chain: Chain, prompt: Tokens, rungs: Sequence[SamplerConfig], own: bool) -> list[Replica]:
    """The K replicas, rung 0 (the flattest) first: the top one draws from the chain's generator, the others from
    children of it. With `own` (rungs with proposals of their own) each keeps its tokens' log q under every rung's."""
    k = len(rungs)
    rngs = chain.spawn_rngs(k - 1) + [chain.rng] if k > 1 else [chain.rng]
    replicas = [Replica(rng, slot=j, rung=j, under=[[] for _ in rungs] if own else []) for j, rng in enumerate(rngs)]
    for j, replica in enumerate(replicas):
        if rungs[j].speculate:
            replica.remember(prompt)
        if chain.trace is not None:
            replica.trace = _rung_trace(chain, j)
    return replicas


def _rung_trace(chain: Chain, j: int):
    trace = chain.trace
    assert trace is not None
    return lambda event: trace({**event, "rung": j})


def request_for(replica: Replica, request: ExtendRequest, proposals: Sequence[Proposal]) -> ExtendRequest:
    """`request` drawn from the replica's rung's proposal, asking log q under every rung's (when they differ)."""
    report = replace(request.report, logq_under=tuple(proposals) if replica.under else ())
    return replace(request, proposal=proposals[replica.rung], report=report)


def extend_replicas(
    prompt: Tokens,
    rungs: Sequence[SamplerConfig],
    proposals: Sequence[Proposal],
    replicas: Sequence[Replica],
    at: tuple[int, int],
    eos_ids: frozenset[int],
) -> Substep:
    """A stage's start (`at`: the stage and its cap): every incomplete replica extended with its q up to the cap (a
    complete one is already in the stage's support), in one call."""
    stage, cap = at
    growing = [r for r in replicas if not r.complete(eos_ids)]
    requests = tuple(
        request_for(r, suffix_request(prompt, rungs[r.rung], r, len(r.tokens), cap, r.rng, r.slot), proposals)
        for r in growing
    )
    conts = yield from ask_all(requests)
    for replica, request, cont in zip(growing, requests, conts):
        start = len(replica.tokens)
        replica.drew(request, cont)
        replica.append(cont)
        replica.tokens_generated += len(cont.tokens)
        note_extension(replica, stage, start, cont)


def mh_sweep(
    prompt: Tokens,
    rungs: Sequence[SamplerConfig],
    proposals: Sequence[Proposal],
    replicas: Sequence[Replica],
    cap: int,
    where: tuple[int, int],
) -> Substep:
    """One `power` MH step in every replica, the K proposals in one call."""
    cuts, requests = [], []
    for r in replicas:
        rung = rungs[r.rung]
        i = uniform_index(len(r.tokens), r.rng)
        log_u = log_uniform(r.rng)  # drawn first, as `power` does, for the floor
        floor = rejection_floor(rung, rung.alpha, r, i, log_u)
        cuts.append((i, log_u))
        requests.append(request_for(r, suffix_request(prompt, rung, r, i, cap, r.rng, r.slot, floor), proposals))
    conts = yield from ask_all(requests)
    for r, request, cont, (i, log_u) in zip(replicas, requests, conts, cuts):
        r.drew(request, cont)
        mh_step(r, i, cont, rungs[r.rung].alpha, log_u, where=where)


def swap_pairs(
    chain: Chain,
    rungs: Sequence[SamplerConfig],
    replicas: Sequence[Replica],
    swaps: Swaps,
    sweep: int,
    where: tuple[int, int],
) -> None:
    """Propose swapping the states of the adjacent pairs of this sweep's parity, each accepted with
    min{1, exp[(alpha_{j+1} - alpha_j)(log p(x^j) - log p(x^{j+1}))]}."""
    for j in range(sweep % 2, len(replicas) - 1, 2):
        low, high = replicas[j], replicas[j + 1]
        log_a = log_swap_ratio(rungs[j].alpha, rungs[j + 1].alpha, low, high)
        log_u = log_uniform(chain.rng)
        accepted = log_u <= log_a
        swaps.attempted[j] += 1
        if accepted:
            swaps.accepted[j] += 1
            state = low.state()
            low.take(high.state())
            high.take(state)
        chain.note("swap", stage=where[0], step=where[1], pair=[j, j + 1], log_a=log_a, log_u=log_u,
                   accepted=accepted)  # fmt: skip


def log_swap_ratio(alpha_low: float, alpha_high: float, low: Chain, high: Chain) -> float:
    """log of the swap's acceptance ratio for the product target: (alpha_high - alpha_low) times the log p of the
    lower rung's state minus the higher one's (each the log p power's acceptance reads: its whole state's)."""
    return (alpha_high - alpha_low) * (math.fsum(low.base_logp) - math.fsum(high.base_logp))


def tempering_result(chain: Chain, rungs: Sequence[SamplerConfig], replicas: Sequence[Replica], swaps: Swaps):
    """The top replica's state with every replica's counters summed (and every replica's state, when asked)."""
    top = replicas[-1]
    chain.tokens_generated = sum(r.tokens_generated for r in replicas)
    chain.proposals = sum(r.proposals for r in replicas)
    chain.accepted = sum(r.accepted for r in replicas)
    everyone = (
        tuple(Rung(tuple(r.tokens), tuple(r.base_logp), rungs[r.rung].alpha) for r in replicas)
        if chain.return_replicas
        else None
    )
    summary = chain.result()
    return replace(
        summary, tokens=tuple(top.tokens), token_logp=tuple(top.base_logp), replicas=everyone, swaps=swaps.result()
    )
