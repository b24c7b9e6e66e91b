"""The one table of sampling methods. A new sampler is one file in this package plus one entry in `REGISTRY`.

Everything that asks "which methods are there, which are MCMC, what does this one read, how many sequences does a
chain hold, what does it draw at" asks this table: `powersample.config.SamplerConfig` holds only the numbers, the
CLI's `--method` choices and per-method options, the server's request fields and every family test derive from it.

Families: "mcmc" (Metropolis-Hastings: proposals and acceptances), "smc" (particles and resampling), "rollout"
(rollout-weighted token choice), "plain" (one draw from q) and "bon" (independent draws from q, one kept by a rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from powersample.config import KNOB_FIELDS, MAX_MEMBERS, MEMBER_FIELDS, SamplerConfig
from powersample.core.types import Proposal, Tokens
from powersample.errors import PowerSampleError
from powersample.samplers.bon import bon_program, bon_temperature, bon_work_units
from powersample.samplers.chain import Chain
from powersample.samplers.driver import Program
from powersample.samplers.mtm import mtm_program, mtm_work_units
from powersample.samplers.plain import plain_program, plain_work_units
from powersample.samplers.power import max_swap_program, power_program, power_work_units
from powersample.samplers.power_cut import power_cut_program
from powersample.samplers.rollout import check_config as check_rollout
from powersample.samplers.rollout import rollout_program, rollout_work_units
from powersample.samplers.smc import smc_program, smc_work_units
from powersample.samplers.tempering import check_ladder, tempering_program, tempering_work_units

ProgramFactory = Callable[[Tokens, SamplerConfig, Chain, frozenset], Program]  # (prompt, config, chain, eos_ids)
FAMILIES = ("mcmc", "smc", "rollout", "plain", "bon")


def proposal_tau(config: SamplerConfig) -> float:
    """The usual proposal temperature: proposal_temperature, or 1/alpha."""
    return config.tau


def base_tau(config: SamplerConfig) -> float:
    """Temperature 1: the base model itself."""
    return 1.0


@dataclass(frozen=True)
class Method:
    """One sampling method: what it runs, what it reads, and what it costs."""

    name: str  # the --method / request value
    family: str  # one of FAMILIES
    program: ProgramFactory  # one chain's generator program (see driver.py)
    work_units: Callable[[SamplerConfig], int]  # backend requests one chain makes at most (progress units)
    summary: str  # one line for --help and the README
    knobs: tuple[str, ...] = ()  # SamplerConfig fields only this method reads (a CLI option and request field each)
    temperature: Callable[[SamplerConfig], float] = proposal_tau  # what tokens are drawn at
    check: Callable[[SamplerConfig], None] | None = None  # the method's own refusals, before any model loads

    def __post_init__(self) -> None:
        assert self.family in FAMILIES, self.family
        assert set(self.knobs) <= set(KNOB_FIELDS), (self.name, self.knobs)

    @property
    def members(self) -> tuple[str, ...]:
        """The knobs whose product is the sequences one chain holds at once (declared `members=True` in
        SamplerConfig); () = 1."""
        return tuple(k for k in self.knobs if k in MEMBER_FIELDS)


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("power", "mcmc", power_program, power_work_units,
           "block-wise Metropolis-Hastings on p^alpha (Karan & Du, 2025, Algorithm 1)"),
    Method("max-swap", "mcmc", max_swap_program, power_work_units,
           "power with alpha = infinity: accept iff the suffix's log p increases"),
    Method("power-cut", "mcmc", power_cut_program, power_work_units,
           "power with cuts drawn where the base model's entropy jumps, Hastings-corrected",
           knobs=("cut_beta", "cut_floor")),
    Method("power-mtm", "mcmc", mtm_program, mtm_work_units,
           "multiple-try Metropolis: `tries` proposals per step in one batched call", knobs=("tries",)),
    Method("power-pt", "mcmc", tempering_program, tempering_work_units,
           "parallel power tempering: power chains on a ladder of alphas, swapping states (arXiv 2609.38104)",
           knobs=("replicas", "alphas", "alpha_min"), check=check_ladder),
    Method("power-smc", "smc", smc_program, smc_work_units,
           "sequential Monte Carlo over particles (Azizi et al., 2026)",
           knobs=("particles", "ess_threshold", "alpha_ramp")),
    Method("power-rollout", "rollout", rollout_program, rollout_work_units,
           "token choice weighed by rollouts of its future power mass (Ji et al., 2026)",
           knobs=("candidates", "rollouts", "rollout_horizon"), temperature=base_tau, check=check_rollout),
    Method("base", "plain", plain_program, plain_work_units, "the base model (tau = 1)", temperature=base_tau),
    Method("low-temp", "plain", plain_program, plain_work_units, "the model at tau = 1/alpha"),
    Method("bon", "bon", bon_program, bon_work_units,
           "compute-matched best-of-N: candidates until a token budget, the best by mean log p",
           knobs=("bon_tokens", "bon_temperature"), temperature=bon_temperature),
)}  # fmt: skip

METHODS = tuple(REGISTRY)
MCMC_METHODS = tuple(m.name for m in REGISTRY.values() if m.family == "mcmc")
PLAIN_METHODS = tuple(m.name for m in REGISTRY.values() if m.family == "plain")
METHOD_KNOBS = tuple(k for k in KNOB_FIELDS if any(k in m.knobs for m in REGISTRY.values()))


def method(name: str) -> Method:
    """The registry entry, or a one-line error."""
    if name not in REGISTRY:
        raise PowerSampleError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return REGISTRY[name]


def check(config: SamplerConfig) -> None:
    """What the method refuses, refused now (before any model loads): the method itself, the sequences one chain
    holds (at most MAX_MEMBERS), and the method's own checks."""
    entry = method(config.method)
    if members(config) > MAX_MEMBERS:
        raise PowerSampleError(
            f"{member_field(config)} must keep the sequences per chain at most {MAX_MEMBERS}, got {members(config)}"
        )
    if entry.check is not None:
        entry.check(config)


def members(config: SamplerConfig) -> int:
    """Sequences one chain holds at once: its particles (power-smc), tries (power-mtm) or candidates x rollouts
    (power-rollout); 1 for the others. The cost of a chain's setup and memory grows with it."""
    return math.prod(getattr(config, k) for k in method(config.method).members)


def member_field(config: SamplerConfig) -> str:
    """The knob that sets `members` (what an error about it names): the largest; "n" for a method without one."""
    knobs = method(config.method).members
    return max(knobs, key=lambda k: getattr(config, k)) if knobs else "n"


def acceptance_rate(method_name: str, proposals: int, accepted: int) -> float | None:
    """The MH acceptance rate, accepted / proposals; None (JSON null) where no MH proposal was made: a method
    without an accept step (plain, bon's candidates, smc, rollout) or an MCMC run that proposed nothing. Records,
    the report, the server and bench all read it here."""
    return accepted / proposals if method_name in MCMC_METHODS and proposals else None


def temperature(config: SamplerConfig) -> float:
    """The temperature tokens are drawn at: the MH proposal's, or the plain sampler's."""
    return method(config.method).temperature(config)


def proposal(config: SamplerConfig) -> Proposal:
    """The distribution tokens are drawn from: temperature, then top-k, then top-p."""
    return config.proposal_at(temperature(config))


def resolved(config: SamplerConfig) -> dict[str, Any]:
    """Every field plus the values derived from them (B, the proposal temperature), as stored in records and in an
    eval run's identity. `speculate` appears only when on, so that runs made before it existed keep their hash."""
    out = {**config.fields(), "block_size": config.block, "proposal_temperature": temperature(config)}
    if not config.speculate:
        del out["speculate"]
    return out


def plain_temperature(method: str, temperature: float, explicit: float | None) -> dict[str, Any]:
    """The config fields that make a plain method (`base`, `low-temp`) draw at a client's `temperature` (the
    server's request field, lm-eval's generation kwarg): 0 = greedy (top-k 1); else low-temp at it, unless the
    proposal temperature is set explicitly (`explicit`) or it is base's own 1. The MCMC methods ignore it."""
    if temperature == 0:
        return {"top_k": 1}
    if explicit is not None or (method == "base" and temperature == 1.0):
        return {}
    return {"method": "low-temp", "proposal_temperature": temperature}


def work_units(config: SamplerConfig) -> int:
    """Backend requests one chain makes at most (progress units)."""
    return method(config.method).work_units(config)
