"""What one `powersample bench` run measures: the MCMC config, the prompts, the backend, K chains, R repeats."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from powersample.backends import BackendSpec
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.samplers.registry import MCMC_METHODS
from powersample.tools.common import WARMUP_TOKENS, check

PROMPTS = (  # built-in prompts: short math and reasoning questions
    "What is 17 * 24? Think step by step, then give the answer.",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h? Explain briefly.",
    "If x + 2x + 3x = 42, what is x? Show your reasoning.",
    "Is 221 a prime number? Explain why or why not.",
    "A rectangle has perimeter 30 and one side of length 6. What is its area? Reason step by step.",
    "Tom is twice as old as Ann. In 5 years their ages will sum to 40. How old is Ann now?",
    "What is the sum of the integers from 1 to 50? Explain how you compute it.",
    "A shirt costs $40 after a 20% discount. What was the original price? Show your work.",
)


SPECULATE = 8  # the speculative phase's draft tokens per forward when --speculate is not given


@dataclass(frozen=True)
class BenchOptions:
    """One benchmark run. Validated at construction."""

    config: SamplerConfig  # the MCMC config of the power phases (method power or max-swap)
    prompts: tuple[str, ...]  # the same prompts in every phase
    backend: BackendSpec = BackendSpec("hf")  # loaded twice: as is, and with reuse_cache=False (scratch phase)
    chains: int = 8  # K: chains per prompt in the batched phases
    repeats: int = 1  # R: each phase runs R times; medians are reported
    seed: int = 0  # prompt i uses seed + i in every phase and repeat
    chat: bool = True  # apply the chat template
    quick: bool = False  # the tiny CI profile was asked for (recorded only)

    def __post_init__(self) -> None:
        check(
            self.config.method in MCMC_METHODS,
            f"bench measures an MCMC method; --method must be one of {', '.join(MCMC_METHODS)}",
        )
        check(len(self.prompts) >= 1, "bench needs at least one prompt (--prompts must be >= 1)")
        check(all(p.strip() for p in self.prompts), "bench prompts must not be empty")
        check(self.chains >= 1, f"chains must be >= 1, got {self.chains}")
        check(self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}")
        check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed}")

    @property
    def speculate(self) -> int:
        """Draft tokens per forward of the speculative-1 phase: --speculate, or SPECULATE when not given."""
        return self.config.speculate or SPECULATE

    @property
    def plain_config(self) -> SamplerConfig:
        """The plain-decoding phases: method base (tau = 1) with the same T."""
        return SamplerConfig(method="base", max_new_tokens=self.config.max_new_tokens)

    def to_dict(self) -> dict:
        """The options in the result JSON (the configs are written beside them)."""
        return {
            "prompts": list(self.prompts),
            "chains": self.chains,
            "repeats": self.repeats,
            "seed": self.seed,
            "chat": self.chat,
            "quick": self.quick,
            "warmup_tokens": WARMUP_TOKENS,
            "speculate": self.speculate,
            "seeds": [self.seed + i for i in range(len(self.prompts))],
        }


def read_prompts(path: str) -> tuple[str, ...]:
    """One prompt per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PowerSampleError(f"cannot read prompt file {path}: {e}") from None
    prompts = tuple(line.strip() for line in lines if line.strip())
    check(bool(prompts), f"prompt file {path} has no prompts (one per line)")
    return prompts


def pick_prompts(available: tuple[str, ...], count: int | None, source: str) -> tuple[str, ...]:
    """The first `count` prompts (all when None)."""
    if count is None:
        return available
    check(count >= 1, f"prompts must be >= 1, got {count}")
    check(count <= len(available), f"asked for {count} prompts but {source} has {len(available)}")
    return available[:count]
