"""Power-SMC (`power-smc`): sequential Monte Carlo for p^alpha, token by token (Azizi et al., 2026, arXiv 2602.10273).

Target. pi(x) ∝ p(x)^alpha over sequences x of at most T tokens: complete ones (ending in EOS) with their full
probability, EOS-free ones of exactly T tokens with their prefix probability (power's last stage).

Proposal. N = particles particles start empty. At each step every live particle (no EOS yet) draws its next block
of up to B tokens (config.block; --block-size 1 is the paper's token-by-token scheme, the default B = T / block_count
checks the ESS every B tokens, like the authors' code) from q (the model at tau = proposal_temperature, 1/alpha by
default), stopping early at EOS; all of them in one batched call. A particle that emitted EOS stops. The run ends at
t = T or when no particle is live.

Weights. Intermediate targets gamma_t(x) = p(x_{1:t})^{a_t} (a finished x counts with its full p), with the exponent
a_t = 1 + (alpha - 1) * min(t, R) / R over a ramp of R = alpha_ramp tokens (a_t = alpha when R = 0; a_0 = 1).
A step from length s to t adds the incremental log weight log gamma_t(x_{1:t}) - log gamma_s(x_{1:s}) - log q(x_{s+1:t})

    a_t * log p(x_{1:t}) - a_s * log p(x_{1:s}) - log q(x_{s+1:t} | x_{1:s})

(a particle finished before s has no new tokens: (a_t - a_s) * log p(x), 0 once the ramp is over: weight factor
1), and when the run ends at length t every particle gets (alpha - a_t) * log p(x). The weights telescope to
p(x)^alpha / q(x): the importance weight for pi, exactly, with or without a ramp or an early end.

Resampling. After each step that leaves a live particle and t < T (so only at block boundaries), if the effective sample
size (sum w)^2 / sum w^2 < ess_threshold * N, the particles are resampled systematically (one uniform, N evenly spaced
points) and their weights reset to equal. ess_threshold 0 = plain sequential importance sampling.

Output. One particle drawn with probability ∝ its final weight (the chain's generator); with
`chain.return_particles`, also every particle with its normalized weight. Counters: tokens_generated counts every
particle's tokens; proposals and accepted stay 0 (there is no accept/reject step).

Randomness. Particle slot m draws its tokens from its own generator, seeded once from the chain's, so the tokens never
depend on how the engine interleaves the batch; resampling and the final draw use the chain's generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from powersample.config import SamplerConfig
from powersample.core.draws import Rng, draw, systematic
from powersample.core.numerics import logsumexp
from powersample.core.types import Continuation, ExtendRequest, Tokens
from powersample.samplers.chain import Chain, ChainResult, WeightedParticle
from powersample.samplers.driver import Program, ask_all


@dataclass
class Particle:
    """One particle's sequence (generated ids) with per-token log p and log q."""

    tokens: list[int] = field(default_factory=list)
    base_logp: list[float] = field(default_factory=list)
    proposal_logq: list[float] = field(default_factory=list)
    logp: float = 0.0  # log p of the whole sequence
    done: bool = False  # emitted EOS

    def add(self, cont: Continuation, eos_ids: frozenset[int]) -> None:
        self.tokens.extend(cont.tokens)
        self.base_logp.extend(cont.base_logp)
        self.proposal_logq.extend(cont.proposal_logq)
        self.logp += math.fsum(cont.base_logp)
        self.done = bool(cont.tokens) and cont.tokens[-1] in eos_ids

    def copy(self) -> Particle:
        return Particle(list(self.tokens), list(self.base_logp), list(self.proposal_logq), self.logp, self.done)


def smc_program(prompt: Tokens, config: SamplerConfig, chain: Chain, eos_ids: frozenset[int]) -> Program:
    """Power-SMC for one sample: yields one tuple step per block for all live particles, returns the chosen one."""
    n, horizon = config.particles, config.max_new_tokens
    rngs = chain.spawn_rngs(n)
    particles, log_w = [Particle() for _ in range(n)], np.zeros(n)  # (N,)
    t, exponent = 0, 1.0
    while t < horizon and any(not p.done for p in particles):
        t, before = min(t + config.block, horizon), np.array([p.logp for p in particles])
        live = [m for m, p in enumerate(particles) if not p.done]
        size = t - len(particles[live[0]].tokens)  # live particles all hold the same number of tokens
        conts = yield from ask_all(ExtendRequest(prompt + tuple(particles[m].tokens), size, rngs[m], m) for m in live)
        for m, cont in zip(live, conts):
            log_w[m] -= math.fsum(cont.proposal_logq)
            particles[m].add(cont, eos_ids)
        a_t = ramp_exponent(config, t)
        log_w += a_t * np.array([p.logp for p in particles]) - exponent * before  # gamma_t / gamma_s
        chain.tokens_generated += sum(len(c.tokens) for c in conts)
        exponent = a_t
        effective, weights, ancestors = ess(log_w), log_w, None
        if t < horizon and any(not p.done for p in particles) and effective < config.ess_threshold * n:
            particles, log_w, ancestors = resample(particles, log_w, chain.rng)
        if chain.trace is not None:
            chain.note(
                "smc",
                stage=-(-t // config.block),
                t=t,
                ess=effective,
                log_weights=weights.tolist(),
                resampled=ancestors is not None,
                ancestors=ancestors,
            )
    log_w += (config.alpha - exponent) * np.array([p.logp for p in particles])  # the rest of the ramp, if any
    return choose(chain, particles, log_w)


def smc_work_units(config: SamplerConfig) -> int:
    """Backend requests one sample makes at most: a request per particle per block."""
    return config.particles * math.ceil(config.max_new_tokens / config.block)


def ramp_exponent(config: SamplerConfig, t: int) -> float:
    """a_t: rises linearly from 1 to alpha over the first alpha_ramp tokens, alpha from then on (and with no ramp)."""
    if config.alpha_ramp == 0:
        return config.alpha
    return 1.0 + (config.alpha - 1.0) * min(t, config.alpha_ramp) / config.alpha_ramp


def ess(log_w: np.ndarray) -> float:
    """Effective sample size (sum w)^2 / sum w^2, from log weights."""
    return float(np.exp(2 * logsumexp(log_w) - logsumexp(2 * log_w)))


def normalized(log_w: np.ndarray) -> np.ndarray:
    """w / sum w, from log weights. (N,)"""
    return np.exp(log_w - logsumexp(log_w))


def resample(particles: list[Particle], log_w: np.ndarray, rng: Rng) -> tuple[list[Particle], np.ndarray, list[int]]:
    """Systematic resampling: N evenly spaced points from one uniform; the new particles have equal weights.
    Also returns each new particle's ancestor (its index before)."""
    picks = systematic(normalized(log_w), rng)  # (N,)
    return [particles[k].copy() for k in picks], np.zeros(len(particles)), picks.tolist()


def choose(chain: Chain, particles: list[Particle], log_w: np.ndarray) -> ChainResult:
    """The chain's state becomes one particle drawn ∝ its weight; the result holds every particle (with its
    normalized weight) if asked."""
    chosen = particles[draw(log_w, chain.rng)]
    chain.tokens, chain.base_logp, chain.proposal_logq = chosen.tokens, chosen.base_logp, chosen.proposal_logq
    result = chain.result()
    if not chain.return_particles:
        return result
    weights = normalized(log_w)
    everyone = [WeightedParticle(tuple(p.tokens), tuple(p.base_logp), float(w)) for p, w in zip(particles, weights)]
    return replace(result, particles=tuple(everyone))
