"""Exact laws by enumeration on toy models, for testing samplers (have vs want).

Everything here is computed with plain probabilities over every possible sequence; nothing is sampled. The target
p^alpha, empirical laws and TV distance are the library's own (powersample.tools.fidelity.exact, which the fidelity
tool measures samplers with); what is built here is the laws of the algorithms' outputs, from the code's kernels.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict
from typing import Callable, Iterator

import numpy as np

from powersample.backends.toy import ToySpec
from powersample.config import SamplerConfig
from powersample.core.numerics import proposal_logprobs
from powersample.core.types import Continuation, Proposal
from powersample.samplers import registry, tempering
from powersample.samplers.chain import Chain
from powersample.samplers.power import UNIFORM, Cuts, log_accept_ratio
from powersample.samplers.power_cut import EntropyCuts
from powersample.tools.fidelity.exact import Law, null_tvs
from powersample.tools.fidelity.exact import empirical_law as empirical
from powersample.tools.fidelity.exact import normalize as _normalize
from powersample.tools.fidelity.exact import power_law as power_target
from powersample.tools.fidelity.exact import tv_distance as tv

__all__ = ["empirical", "power_target", "tv"]  # the library's, under the names the tests use

AcceptRule = Callable[[float, Chain, int, Continuation, Cuts], float]
Kernel = Callable[[tuple[int, ...]], Law]  # x -> K(x, .)


def sequence_law(spec: ToySpec, proposal: Proposal, max_len: int) -> Law:
    """Law of plain ancestral sampling from the proposal, up to max_len tokens or EOS."""
    return {s: math.exp(lq) for s, lq in continuations(spec, proposal, (), max_len)}


def continuations(spec: ToySpec, proposal: Proposal, prefix: tuple[int, ...], cap: int) -> Iterator:
    """Every (suffix, log q(suffix | prefix)) drawn until EOS or total length cap, with q > 0."""
    stack = [((), 0.0)]
    while stack:
        suffix, logq = stack.pop()
        seq = prefix + suffix
        if suffix and (len(seq) == cap or suffix[-1] == spec.eos_id):
            yield suffix, logq
            continue
        row = row_logprobs(spec, seq, proposal)[1]
        for tok in np.flatnonzero(np.isfinite(row)):
            stack.append((suffix + (int(tok),), logq + float(row[tok])))


def entropy_after(spec: ToySpec, seq) -> float:
    """The base entropy of the next token after seq (nats)."""
    return -math.fsum(p * math.log(p) for p in spec.row(seq) if p > 0)


def row_logprobs(spec: ToySpec, seq, proposal: Proposal) -> tuple[np.ndarray, np.ndarray]:
    """(log p, log q) of the next token after seq."""
    p = np.asarray(spec.row(seq))
    logp = np.full(len(p), -np.inf)
    np.log(p, out=logp, where=p > 0)
    return logp, proposal_logprobs(logp, proposal)


def as_chain(spec: ToySpec, seq: tuple[int, ...], proposal: Proposal) -> Chain:
    """A Chain holding state seq with its per-token log p, log q and entropy."""
    chain = Chain(rng=np.random.default_rng(0), slot=0)
    for t, tok in enumerate(seq):
        logp, logq = row_logprobs(spec, seq[:t], proposal)
        chain.entropy.append(entropy_after(spec, seq[:t]))
        chain.tokens.append(tok)
        chain.base_logp.append(float(logp[tok]))
        chain.proposal_logq.append(float(logq[tok]))
    return chain


def mh_kernel(
    spec: ToySpec,
    alpha: float,
    proposal: Proposal,
    cap: int,
    rule: AcceptRule = log_accept_ratio,
    cuts: Cuts = UNIFORM,
) -> Callable[[tuple[int, ...]], Law]:
    """K(x, .) of one MH step of stage `cap`, as a function of x, built from the code's cut distribution and
    acceptance ratio."""

    @functools.cache
    def kernel(x: tuple[int, ...]) -> Law:
        chain, out = as_chain(spec, x, proposal), defaultdict(float)
        for i in range(len(x)):
            cut = math.exp(cuts.log_prob(i, len(x), chain.entropy))  # c(i | x)
            for suffix, logq in continuations(spec, proposal, x[:i], cap):
                cont = _continuation(spec, x[:i], suffix, proposal)
                move = math.exp(logq) * cut * min(1.0, math.exp(min(0.0, rule(alpha, chain, i, cont, cuts))))
                out[x[:i] + suffix] += move
        out[x] = 1.0 - math.fsum(v for k, v in out.items() if k != x)  # rejections and self-moves
        return dict(out)

    return kernel


def algorithm_law(spec: ToySpec, config: SamplerConfig) -> Law:
    """Exact law of the output of power sampling with `config` (finite steps, stages, early stop at EOS)."""
    proposal = registry.proposal(config)
    alpha = math.inf if config.method == "max-swap" else config.alpha
    cuts = EntropyCuts(config.cut_beta, config.cut_floor) if config.method == "power-cut" else UNIFORM
    return staged_law(spec, config, lambda cap: mh_kernel(spec, alpha, proposal, cap, cuts=cuts))


def staged_law(spec: ToySpec, config: SamplerConfig, kernel_at: Callable[[int], Kernel]) -> Law:
    """Exact law of a staged sampler's output: per stage cap, the incomplete states are extended with q up to the
    cap, then moved by mcmc_steps steps of kernel_at(cap); complete states (ending in EOS) stay as they are."""
    proposal = registry.proposal(config)
    law: Law = {(): 1.0}
    for cap in config.stage_caps():
        done = {x: w for x, w in law.items() if x and x[-1] == spec.eos_id}
        running = _extend_law({x: w for x, w in law.items() if x not in done}, spec, proposal, cap)
        kernel = kernel_at(cap)
        for _ in range(config.mcmc_steps):
            running = apply(kernel, running)
        law = {x: done.get(x, 0.0) + running.get(x, 0.0) for x in done.keys() | running.keys()}
    return law


def apply(kernel: Callable[[tuple[int, ...]], Law], law: Law) -> Law:
    """law K."""
    out: Law = defaultdict(float)
    for x, w in law.items():
        for y, k in kernel(x).items():
            out[y] += w * k
    return dict(out)


def tv_null_quantile(law: Law, n: int, q: float = 0.999, reps: int = 4000, seed: int = 12345) -> float:
    """The q-quantile of TV(empirical, law) for n iid draws from law (multinomial null, by resampling)."""
    return float(np.quantile(null_tvs(law, n, seed, reps), q))


def _extend_law(law: Law, spec: ToySpec, proposal: Proposal, cap: int) -> Law:
    out: Law = defaultdict(float)
    for x, w in law.items():
        for suffix, logq in continuations(spec, proposal, x, cap):
            out[x + suffix] += w * math.exp(logq)
    return dict(out)


def _continuation(spec: ToySpec, prefix, suffix, proposal: Proposal) -> Continuation:
    logp, logq = [], []
    for t, tok in enumerate(suffix):
        lp, lq = row_logprobs(spec, prefix + suffix[:t], proposal)
        logp.append(float(lp[tok]))
        logq.append(float(lq[tok]))
    entropy = tuple(entropy_after(spec, prefix + suffix[:t]) for t in range(len(suffix)))
    return Continuation(tuple(suffix), tuple(logp), tuple(logq), entropy=entropy)


# --- power-rollout: the limit of its law as M (and, for blocks, the pool L) grows ------------------------------


def unit_law(
    spec: ToySpec, config: SamplerConfig, step: Callable[[ToySpec, SamplerConfig, tuple[int, ...]], Law]
) -> Law:
    """Law of the sequence built unit by unit, each unit after x drawn from step(spec, config, x), until EOS or T."""
    law: Law = defaultdict(float)
    frontier: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
    while frontier:
        x, w = frontier.pop()
        if len(x) == config.max_new_tokens or (x and x[-1] == spec.eos_id):
            law[x] += w
            continue
        for unit, prob in step(spec, config, x).items():
            frontier.append((x + unit, w * prob))
    return dict(law)


def rollout_limit_law(spec: ToySpec, config: SamplerConfig) -> Law:
    """Exact law of power-rollout's output as M -> infinity (and L -> infinity for blocks): each step draws one of
    its K candidates ∝ p(unit)^alpha * zeta_H(prefix + unit), with zeta_H from rollouts cut at H tokens (or T)."""
    return unit_law(spec, config, rollout_step_law)


def rollout_step_law(spec: ToySpec, config: SamplerConfig, x: tuple[int, ...]) -> Law:
    """Limit law of the unit (token or block) appended after x."""
    units = _rollout_candidates(spec, config, x)
    return _normalize({u: config.alpha * lp + _log_future_mass(spec, config, x + u) for u, lp in units})


def _rollout_candidates(spec: ToySpec, config: SamplerConfig, x: tuple[int, ...]) -> list:
    """(unit, log p) of the K candidates: the likeliest tokens (ties by id), or blocks q can draw (ties by ids)."""
    proposal, k = registry.proposal(config), config.candidates
    if not config.block_size or config.block_size == 1:
        logp = row_logprobs(spec, x, proposal)[0]
        order = sorted(np.flatnonzero(np.isfinite(logp)), key=lambda t: (-logp[t], t))[:k]
        return [((int(t),), float(logp[t])) for t in order]
    cap = min(len(x) + config.block_size, config.max_new_tokens)
    blocks = [(s, _suffix_logp(spec, x, s, proposal)) for s, _ in continuations(spec, proposal, x, cap)]
    return sorted(blocks, key=lambda b: (-b[1], b[0]))[:k]


def _log_future_mass(spec: ToySpec, config: SamplerConfig, s: tuple[int, ...]) -> float:
    """log zeta_H(s): log sum of p(r | s)^alpha over the rollouts r that q can draw after s, cut at H tokens or T."""
    if len(s) == config.max_new_tokens or s[-1] == spec.eos_id:
        return 0.0
    h = config.rollout_horizon or config.max_new_tokens
    cap = min(len(s) + h, config.max_new_tokens)
    rollouts = continuations(spec, registry.proposal(config), s, cap)
    logs = [config.alpha * _suffix_logp(spec, s, r, registry.proposal(config)) for r, _ in rollouts]
    peak = max(logs)
    return peak + math.log(math.fsum(math.exp(v - peak) for v in logs))


def _suffix_logp(spec: ToySpec, prefix: tuple[int, ...], suffix: tuple[int, ...], proposal: Proposal) -> float:
    return math.fsum(_continuation(spec, prefix, suffix, proposal).base_logp)


# --- power-mtm: the multiple-try kernel, every k-tuple of tries enumerated -------------------------------------

TryWeight = Callable[[float, int, tuple, tuple], float]  # (alpha, i, suffix log p, suffix log q) -> log w


def mtm_kernel(spec: ToySpec, alpha: float, proposal: Proposal, cap: int, tries: int, weight: TryWeight | None = None):
    """K(x, .) of one multiple-try step of stage `cap`, built from the code's try weight: every index i, every
    k-tuple of tries with its q-probability, the pick ∝ w and the acceptance min(1, W / (W - w_J + w(x)))."""
    from powersample.samplers.mtm import log_weight

    weight = weight or log_weight

    @functools.cache
    def kernel(x: tuple[int, ...]) -> Law:
        chain, out = as_chain(spec, x, proposal), defaultdict(float)
        for i in range(len(x)):
            suffixes = continuations(spec, proposal, x[:i], cap)
            conts = [(s, lq, _continuation(spec, x[:i], s, proposal)) for s, lq in suffixes]
            log_q = np.array([lq for _, lq, _ in conts])
            log_w = np.array([weight(alpha, i, c.base_logp, c.proposal_logq) for _, _, c in conts])
            log_w_x = weight(alpha, i, tuple(chain.base_logp[i:]), tuple(chain.proposal_logq[i:]))
            for (s, _, _), move in zip(conts, _mtm_moves(log_q, log_w, log_w_x, tries)):
                out[x[:i] + s] += move / len(x)
        out[x] = 1.0 - math.fsum(v for k, v in out.items() if k != x)
        return dict(out)

    return kernel


def _mtm_moves(log_q: np.ndarray, log_w: np.ndarray, log_w_x: float, k: int) -> np.ndarray:
    """P(the step picks and accepts suffix s), for each of the n suffixes, over all n^k tuples of tries. (n,)"""
    n = len(log_q)
    idx = np.stack(np.meshgrid(*[np.arange(n)] * k, indexing="ij"), axis=-1).reshape(-1, k)  # (n^k, k)
    shift = max(float(log_w.max()), log_w_x)
    w, w_x = np.exp(log_w - shift)[idx], math.exp(log_w_x - shift)  # (n^k, k)
    prob = np.exp(log_q[idx].sum(axis=1))  # (n^k,) q-probability of the tuple
    total = w.sum(axis=1)
    out = np.zeros(n)
    for j in range(k):
        references = total - w[:, j] + w_x  # the other tries and the current state
        move = prob * (w[:, j] / total) * np.minimum(1.0, total / references)
        out += np.bincount(idx[:, j], weights=move, minlength=n)
    return out


def mtm_algorithm_law(spec: ToySpec, config: SamplerConfig, weight: TryWeight | None = None) -> Law:
    """Exact law of power-mtm's output with `config` (extension and mcmc_steps MTM steps per stage, early stop)."""
    proposal = registry.proposal(config)
    return staged_law(spec, config, lambda cap: mtm_kernel(spec, config.alpha, proposal, cap, config.tries, weight))


# --- power-smc without resampling: importance sampling with N particles ------------------------------------------


def sis_law(spec: ToySpec, config: SamplerConfig) -> Law:
    """Exact law of power-smc's output when it never resamples (ess_threshold 0): N particles drawn independently
    from q, one of them returned with probability w_i / sum_j w_j, w = p^alpha / q (what the weights telescope to,
    with or without a ramp). Every N-tuple of sequences enumerated."""
    seqs = list(sequence_law(spec, registry.proposal(config), config.max_new_tokens).items())  # (x, q(x))
    log_w = np.array(
        [
            config.alpha * math.fsum(_continuation(spec, (), x, registry.proposal(config)).base_logp) - math.log(q)
            for x, q in seqs
        ]
    )
    n = config.particles
    idx = np.stack(np.meshgrid(*[np.arange(len(seqs))] * n, indexing="ij"), axis=-1).reshape(-1, n)  # (S^N, N)
    prob = np.prod(np.array([q for _, q in seqs])[idx], axis=1)  # (S^N,) q-probability of the tuple
    w = np.exp(log_w - log_w.max())[idx]  # (S^N, N)
    picks = prob[:, None] * w / w.sum(axis=1, keepdims=True)  # (S^N, N): P(tuple, particle i returned)
    mass = np.bincount(idx.ravel(), weights=picks.ravel(), minlength=len(seqs))
    return {x: float(m) for (x, _), m in zip(seqs, mass)}


# --- power-rollout at finite M: every tuple of rollouts (and of candidate blocks) enumerated ---------------------


def rollout_law(spec: ToySpec, config: SamplerConfig) -> Law:
    """Exact law of power-rollout's output at finite M (and L = K*M blocks): each step draws one of its candidates
    with the code's jackknifed law (rollout.candidate_probs), averaged over every tuple of rollouts (and blocks)."""
    return unit_law(spec, config, _finite_step_law)


def _finite_step_law(spec: ToySpec, config: SamplerConfig, x: tuple[int, ...]) -> Law:
    """Law of the unit appended after x at finite M: over the candidate sets (fixed at token level; from every
    L-tuple of q-blocks otherwise), then over every tuple of their rollouts."""
    proposal, out = registry.proposal(config), defaultdict(float)
    if not config.block_size or config.block_size == 1:
        logp = row_logprobs(spec, x, proposal)[0]
        order = sorted(np.flatnonzero(np.isfinite(logp)), key=lambda t: (-logp[t], t))[: config.candidates]
        pools = [(1.0, [((int(t),), float(logp[t])) for t in order])]
    else:
        cap = min(len(x) + config.block_size, config.max_new_tokens)
        blocks = [
            (s, math.exp(lq), _suffix_logp(spec, x, s, proposal)) for s, lq in continuations(spec, proposal, x, cap)
        ]
        pools = [
            (math.prod(q for _, q, _ in pool), _likeliest({(s, lp) for s, _, lp in pool}, config.candidates))
            for pool in itertools.product(blocks, repeat=config.candidates * config.rollouts)
        ]
    for pool_prob, units in pools:
        for unit, prob in _weighed_units(spec, config, x, units).items():
            out[unit] += pool_prob * prob
    return dict(out)


def _likeliest(units: set, k: int) -> list:
    """The k likeliest distinct (block, log p) pairs, ties by their ids (rollout.likeliest_distinct's order)."""
    return sorted(units, key=lambda b: (-b[1], b[0]))[:k]


def _weighed_units(spec: ToySpec, config: SamplerConfig, x: tuple[int, ...], units: list) -> Law:
    """Law of the chosen unit among `units` ((unit, log p) pairs), over every tuple of M rollouts after each."""
    from powersample.samplers.rollout import candidate_probs

    proposal, m = registry.proposal(config), config.rollouts
    rolled = [k for k, (u, _) in enumerate(units) if u[-1] != spec.eos_id and len(x) + len(u) < config.max_new_tokens]
    options = []  # per rolled unit: every rollout (log w = alpha log p - log q, q-probability)
    for k in rolled:
        s = x + units[k][0]
        h = config.rollout_horizon or config.max_new_tokens
        cap = min(len(s) + h, config.max_new_tokens)
        options.append(
            [
                (config.alpha * _suffix_logp(spec, s, r, proposal) - lq, math.exp(lq))
                for r, lq in continuations(spec, proposal, s, cap)
            ]
        )
    log_head = np.array([config.alpha * lp for _, lp in units])  # (K,)
    out: Law = defaultdict(float)
    for draws in itertools.product(*[opts for opts in options for _ in range(m)]):
        log_w = np.zeros((len(units), m))  # (K, M): units without rollouts keep zeta = 1
        for j, (lw, _) in enumerate(draws):
            log_w[rolled[j // m], j % m] = lw
        prob = math.prod(q for _, q in draws)
        for (unit, _), p in zip(units, candidate_probs(log_head, log_w)):
            out[unit] += prob * float(p)
    return dict(out)


# --- power-pt: K replicas on a ladder, MH sweeps and swaps --------------------------------------------------------

Joint = dict[tuple[tuple[int, ...], ...], float]  # the law of the K replicas' states, the flattest rung first
SwapRule = Callable[[float, float, Chain, Chain], float]  # (alpha_low, alpha_high, low, high) -> log a


def tempering_law(spec: ToySpec, config: SamplerConfig, rule: SwapRule | None = None) -> Law:
    """Exact law of power-pt's output (the top replica's state): per stage cap, the incomplete replicas are extended
    with their rung's q; each sweep moves every replica by its rung's MH kernel, then swaps the pairs of the sweep's
    parity by `rule` (the code's, by default); the run stops after the stage whose final top state is complete."""
    rungs = tempering.rung_configs(config)
    proposals = [r.proposal_at(r.tau) for r in rungs]
    joint: Joint = {((),) * len(rungs): 1.0}
    out: Law = defaultdict(float)
    sweep = 0
    for cap in config.stage_caps():
        joint = _joint_extend(joint, spec, proposals, cap)
        kernels = [mh_kernel(spec, r.alpha, q, cap) for r, q in zip(rungs, proposals)]
        for _ in range(config.mcmc_steps):
            joint = _joint_apply(joint, kernels)
            joint = swap_law(spec, rungs, joint, sweep % 2, rule)
            sweep += 1
        for xs in list(joint):
            if xs[-1] and xs[-1][-1] == spec.eos_id:
                out[xs[-1]] += joint.pop(xs)
    for xs, w in joint.items():
        out[xs[-1]] += w
    return dict(out)


def swap_law(spec: ToySpec, rungs, joint: Joint, parity: int, rule: SwapRule | None = None) -> Joint:
    """joint after the swap moves of one sweep's parity (pairs (parity, parity + 1), (parity + 2, ...), ...)."""
    rule = rule or tempering.log_swap_ratio
    for j in range(parity, len(rungs) - 1, 2):
        out: Joint = defaultdict(float)
        for xs, w in joint.items():
            low, high = (as_chain(spec, x, Proposal(1.0)) for x in xs[j : j + 2])
            a = math.exp(min(0.0, rule(rungs[j].alpha, rungs[j + 1].alpha, low, high)))
            swapped = xs[:j] + (xs[j + 1], xs[j]) + xs[j + 2 :]
            out[swapped] += w * a
            out[xs] += w * (1.0 - a)
        joint = dict(out)
    return joint


def _joint_extend(joint: Joint, spec: ToySpec, proposals, cap: int) -> Joint:
    """Each incomplete replica extended with its own q up to cap, independently."""
    return _joint_apply(
        joint,
        [
            (lambda x, q=q: {x: 1.0} if x and x[-1] == spec.eos_id else _extend_law({x: 1.0}, spec, q, cap))
            for q in proposals
        ],
    )


def _joint_apply(joint: Joint, kernels) -> Joint:
    """joint (K_1 x ... x K_K): every replica moved by its own kernel, independently."""
    out: Joint = defaultdict(float)
    for xs, w in joint.items():
        for moves in itertools.product(*(kernel(x).items() for kernel, x in zip(kernels, xs))):
            out[tuple(y for y, _ in moves)] += w * math.prod(k for _, k in moves)
    return dict(out)
