"""Sampler configuration: one frozen dataclass of numbers, validated once at construction.

What each method is (its family, which of these fields it reads, what it draws at) is the sampler registry's
(`powersample.samplers.registry`): this module knows no method by name."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from powersample.errors import PowerSampleError

# Scales (alpha, and the proposal temperature, 1/alpha by default) outside this range are refused: their reciprocals
# and products with log-probabilities overflow to inf (5e-324 has 1/x = inf) and the weights become NaN.
SCALE_RANGE = (1e-6, 1e6)
MAX_MEMBERS = 2**24  # most sequences one chain may hold (particles, tries, candidates x rollouts): numpy's limits
# (checked by the sampler registry, which knows which fields set them)
MAX_STAGES = 2**20  # most stages (T / B) a config may have: its stage list is built at once
MAX_INT = 2**62  # every integer field stays below this, so numpy never sees an int64 overflow


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample. Field defaults follow the paper (Karan & Du, 2025, Sec. 4)."""

    method: str = "power"  # a name in the sampler registry (powersample.samplers.registry.METHODS)
    alpha: float = 4.0  # exponent of the target p^alpha; 1 = the base model itself
    max_new_tokens: int = 256  # T: the most tokens generated after the prompt
    block_size: int | None = None  # B; None = ceil(T / block_count)
    block_count: int = 16  # number of blocks T/B, used when block_size is None
    mcmc_steps: int = 10  # Metropolis-Hastings steps per stage
    proposal_temperature: float | None = None  # tau of the proposal; None = 1/alpha
    top_k: int = 0  # proposal truncation to the k likeliest tokens; 0 = off
    top_p: float = 1.0  # proposal nucleus truncation; 1.0 = off
    speculate: int | None = None  # MCMC proposals: verify guesses at each continuation (the current suffix, what
    # the chain drew before), up to this many tokens per forward; 0 = off; None = the engine's own choice (what
    # `powersample bench` measured fastest on it). It changes no sample, only the forwards (core.drafts)
    tries: int = field(default=4, metadata={"knob": "proposals per MH step, drawn in one batched call; 1 = power, "
                                                   "draw for draw"})
    # power-smc (Azizi et al., 2026): particles and ess_threshold as in the authors' MATH500 script
    # (github.com/ArminAzizi98/Power-SMC, power_samp_math.py: n_particles=64, ess_threshold=0.5)
    particles: int = field(default=64, metadata={"knob": "particles per sample, advanced together (one batched "
                                                         "call per block)"})
    ess_threshold: float = field(default=0.5, metadata={"knob": "resample when the effective sample size < this x "
                                                                "particles; 0 = never (plain importance sampling)"})
    alpha_ramp: int = field(default=0, metadata={"knob": "tokens over which the exponent ramps from 1 up to alpha; "
                                                         "0 = no ramp"})
    # (kept off: the authors' ramp also moves the proposal to 1/a_t; ours stays at tau, so a ramp changes only the
    # intermediate weights that resampling sees)
    # power-cut: entropy-guided cuts (samplers/power_cut.py)
    cut_beta: float = field(default=4.0, metadata={"knob": "cuts drawn in proportion to (entropy jump)^beta; 0 = "
                                                          "every rise in entropy alike"})
    cut_floor: float = field(default=0.1, metadata={"knob": "share of the cut distribution spread uniformly, in "
                                                            "(0, 1]; 1 = power's uniform cut"})
    candidates: int = field(default=8, metadata={"knob": "K, the likeliest next tokens weighed at each step"})
    rollouts: int = field(default=4, metadata={"knob": "M, rollouts per candidate estimating its future power mass"})
    rollout_horizon: int = field(default=0, metadata={"knob": "tokens per rollout; 0 = up to T"})
    bon_tokens: int = field(default=0, metadata={"knob": "budget: candidates are drawn until their tokens reach it "
                                                       "(the last one in full); 0 = the Eq. 12 cost of this config's "
                                                       "power run, ceil(N T^2 / (4B) + T)"})
    bon_temperature: float = field(default=1.0, metadata={"knob": "temperature of the candidates (1 = the base "
                                                                  "model; top-k and top-p apply)"})

    def __post_init__(self) -> None:
        _check(isinstance(self.method, str) and self.method != "", f"method must be a name, got {self.method!r}")
        lo, hi = SCALE_RANGE
        _check(_finite(self.alpha) and self.alpha > 0, f"alpha must be a number > 0, got {self.alpha}")
        _check(lo <= self.alpha <= hi, f"alpha must be between {lo:g} and {hi:g}, got {self.alpha}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            _check(value is None or value < MAX_INT, f"{name} must be < 2^62, got {value}")
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.block_size is not None:
            _check(
                1 <= self.block_size <= self.max_new_tokens,
                f"block_size must be between 1 and max_new_tokens ({self.max_new_tokens}), got {self.block_size}",
            )
        _check(self.block_count >= 1, f"block_count must be >= 1, got {self.block_count}")
        _check(self.mcmc_steps >= 0, f"mcmc_steps must be >= 0, got {self.mcmc_steps}")
        if self.proposal_temperature is not None:
            t = self.proposal_temperature
            _check(_finite(t) and t > 0, f"proposal_temperature must be a number > 0, got {t}")
            _check(lo <= t <= hi, f"proposal_temperature must be between {lo:g} and {hi:g}, got {t}")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        _check(self.speculate is None or self.speculate >= 0, f"speculate must be >= 0 (0 = off), got {self.speculate}")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.tries >= 1, f"tries must be >= 1, got {self.tries}")
        _check(self.particles >= 1, f"particles must be >= 1, got {self.particles}")
        e = self.ess_threshold
        _check(_finite(e) and 0 <= e <= 1, f"ess_threshold must be in [0, 1], got {e}")
        _check(self.alpha_ramp >= 0, f"alpha_ramp must be >= 0 (0 = off), got {self.alpha_ramp}")
        _check(_finite(self.cut_beta) and 0 <= self.cut_beta <= 1000, f"cut_beta must be in [0, 1000], got "
               f"{self.cut_beta}")  # fmt: skip
        _check(_finite(self.cut_floor) and 0 < self.cut_floor <= 1,
               f"cut_floor must be in (0, 1], got {self.cut_floor}")  # fmt: skip
        _check(self.candidates >= 1, f"candidates must be >= 1, got {self.candidates}")
        _check(self.rollouts >= 1, f"rollouts must be >= 1, got {self.rollouts}")
        _check(self.rollout_horizon >= 0, f"rollout_horizon must be >= 0 (0 = up to T), got {self.rollout_horizon}")
        _check(self.bon_tokens >= 0, f"bon_tokens must be >= 0 (0 = the Eq. 12 cost), got {self.bon_tokens}")
        t = self.bon_temperature
        _check(_finite(t) and lo <= t <= hi, f"bon_temperature must be between {lo:g} and {hi:g}, got {t}")
        stages = -(-self.max_new_tokens // self.block)  # ceil(T / B), in integers: T may exceed a float's precision
        _check(stages <= MAX_STAGES, f"max_new_tokens / block size gives {stages} stages; at most {MAX_STAGES} "
               f"(raise the block size)")  # fmt: skip
        bad = [k for k, v in self.fields().items() if isinstance(v, float) and not math.isfinite(v)]
        _check(not bad, f"{', '.join(bad)} must be finite")

    @property
    def block(self) -> int:
        """Block size B."""
        if self.block_size is not None:
            return self.block_size
        return max(1, math.ceil(self.max_new_tokens / self.block_count))

    @property
    def tau(self) -> float:
        """The usual proposal temperature: proposal_temperature, or 1/alpha."""
        return 1.0 / self.alpha if self.proposal_temperature is None else self.proposal_temperature

    def stage_caps(self) -> list[int]:
        """Length cap of each stage: B, 2B, ..., with the last one clipped to T."""
        b, t = self.block, self.max_new_tokens
        return [min(k * b, t) for k in range(1, math.ceil(t / b) + 1)]

    def fields(self) -> dict[str, Any]:
        """Every field, as given."""
        return asdict(self)


_INT_FIELDS = ("max_new_tokens", "block_size", "block_count", "mcmc_steps", "top_k", "speculate", "tries",
               "particles", "alpha_ramp", "candidates", "rollouts", "rollout_horizon", "bon_tokens")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PowerSampleError(message)


# the per-method fields (each read by one method of the registry): a CLI option and a request field apiece
KNOB_FIELDS = tuple(f.name for f in fields(SamplerConfig) if "knob" in f.metadata)


def knob_help(name: str) -> str:
    """The one-line description of a per-method field."""
    return next(f.metadata["knob"] for f in fields(SamplerConfig) if f.name == name)
