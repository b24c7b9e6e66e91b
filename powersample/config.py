"""Sampler configuration: one frozen dataclass, validated once at construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from powersample.core.types import Proposal
from powersample.errors import PowerSampleError

METHODS = ("power", "max-swap", "power-mtm", "power-smc", "power-rollout", "base", "low-temp")
MCMC_METHODS = ("power", "max-swap", "power-mtm")  # Metropolis-Hastings: proposals and acceptances
# the knobs of one method each (power-mtm; power-smc; power-rollout): a CLI option and a request field apiece
METHOD_KNOBS = ("tries", "particles", "ess_threshold", "alpha_ramp", "candidates", "rollouts", "rollout_horizon")
# Scales (alpha, and the proposal temperature, 1/alpha by default) outside this range are refused: their reciprocals
# and products with log-probabilities overflow to inf (5e-324 has 1/x = inf) and the weights become NaN.
SCALE_RANGE = (1e-6, 1e6)
MAX_MEMBERS = 2**24  # most sequences one chain may hold (particles, tries, candidates x rollouts): numpy's limits
MAX_STAGES = 2**20  # most stages (T / B) a config may have: its stage list is built at once
MAX_INT = 2**62  # every integer field stays below this, so numpy never sees an int64 overflow


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample. Field defaults follow the paper (Karan & Du, 2025, Sec. 4)."""

    method: str = "power"  # one of METHODS; base = tau 1, low-temp = tau 1/alpha, max-swap = alpha inf
    alpha: float = 4.0  # exponent of the target p^alpha; 1 = the base model itself
    max_new_tokens: int = 256  # T: the most tokens generated after the prompt
    block_size: int | None = None  # B; None = ceil(T / block_count)
    block_count: int = 16  # number of blocks T/B, used when block_size is None
    mcmc_steps: int = 10  # Metropolis-Hastings steps per stage
    proposal_temperature: float | None = None  # tau of the proposal; None = 1/alpha
    top_k: int = 0  # proposal truncation to the k likeliest tokens; 0 = off
    top_p: float = 1.0  # proposal nucleus truncation; 1.0 = off
    tries: int = 4  # power-mtm: proposals per MH step, drawn in one batched call; 1 = power, draw for draw
    # power-smc (Azizi et al., 2026): particles and ess_threshold as in the authors' MATH500 script
    # (github.com/ArminAzizi98/Power-SMC, power_samp_math.py: n_particles=64, ess_threshold=0.5)
    particles: int = 64  # power-smc: particles per sample, advanced together (one batched call per block)
    ess_threshold: float = 0.5  # power-smc: resample when the effective sample size < ess_threshold * particles;
    # 0 = never (plain sequential importance sampling)
    alpha_ramp: int = 0  # power-smc: tokens over which the exponent ramps from 1 up to alpha; 0 = no ramp
    # (kept off: the authors' ramp also moves the proposal to 1/a_t; ours stays at tau, so a ramp changes only the
    # intermediate weights that resampling sees)
    candidates: int = 8  # power-rollout: K, the likeliest next tokens weighed at each step
    rollouts: int = 4  # power-rollout: M, rollouts per candidate estimating its future power mass
    rollout_horizon: int = 0  # power-rollout: tokens per rollout; 0 = up to T

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
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
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.tries >= 1, f"tries must be >= 1, got {self.tries}")
        _check(self.particles >= 1, f"particles must be >= 1, got {self.particles}")
        e = self.ess_threshold
        _check(_finite(e) and 0 <= e <= 1, f"ess_threshold must be in [0, 1], got {e}")
        _check(self.alpha_ramp >= 0, f"alpha_ramp must be >= 0 (0 = off), got {self.alpha_ramp}")
        _check(self.candidates >= 1, f"candidates must be >= 1, got {self.candidates}")
        _check(self.rollouts >= 1, f"rollouts must be >= 1, got {self.rollouts}")
        _check(self.rollout_horizon >= 0, f"rollout_horizon must be >= 0 (0 = up to T), got {self.rollout_horizon}")
        _check(self.members <= MAX_MEMBERS, f"{self.member_field} must keep the sequences per chain at most "
               f"{MAX_MEMBERS}, got {self.members}")  # fmt: skip
        stages = -(-self.max_new_tokens // self.block)  # ceil(T / B), in integers: T may exceed a float's precision
        _check(stages <= MAX_STAGES, f"max_new_tokens / block size gives {stages} stages; at most {MAX_STAGES} "
               f"(raise the block size)")  # fmt: skip
        bad = [k for k, v in self.resolved().items() if isinstance(v, float) and not math.isfinite(v)]
        _check(not bad, f"{', '.join(bad)} must be finite")  # derived values (1/alpha) included

    @property
    def members(self) -> int:
        """Sequences one chain holds at once: its particles (power-smc), tries (power-mtm) or candidates x rollouts
        (power-rollout); 1 for the others. The cost of a chain's setup and memory grows with it."""
        return {"power-mtm": self.tries, "power-smc": self.particles,
                "power-rollout": self.candidates * self.rollouts}.get(self.method, 1)  # fmt: skip

    @property
    def member_field(self) -> str:
        """The field that sets `members` (what an error about it names)."""
        rollout = "candidates" if self.candidates >= self.rollouts else "rollouts"
        return {"power-mtm": "tries", "power-smc": "particles", "power-rollout": rollout}.get(self.method, "n")

    @property
    def temperature(self) -> float:
        """The temperature tokens are drawn at: the MH proposal's, or the plain sampler's."""
        if self.method in ("base", "power-rollout"):  # power-rollout: rollouts follow the base model
            return 1.0
        if self.proposal_temperature is not None:
            return self.proposal_temperature
        return 1.0 / self.alpha

    @property
    def proposal(self) -> Proposal:
        """The distribution tokens are drawn from: temperature, then top-k, then top-p."""
        return Proposal(self.temperature, self.top_k, self.top_p)

    @property
    def target_alpha(self) -> float:
        """Exponent of the MH target: alpha for `power`, infinity for `max-swap`."""
        return math.inf if self.method == "max-swap" else self.alpha

    @property
    def block(self) -> int:
        """Block size B."""
        if self.block_size is not None:
            return self.block_size
        return max(1, math.ceil(self.max_new_tokens / self.block_count))

    def stage_caps(self) -> list[int]:
        """Length cap of each stage: B, 2B, ..., with the last one clipped to T."""
        b, t = self.block, self.max_new_tokens
        return [min(k * b, t) for k in range(1, math.ceil(t / b) + 1)]

    def resolved(self) -> dict:
        """Every field plus the values derived from them, as stored in records."""
        out = asdict(self)
        out.update(block_size=self.block, proposal_temperature=self.temperature)
        return out


_INT_FIELDS = ("max_new_tokens", "block_size", "block_count", "mcmc_steps", "top_k", "tries", "particles",
               "alpha_ramp", "candidates", "rollouts", "rollout_horizon")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PowerSampleError(message)
