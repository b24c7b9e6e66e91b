"""Sampler configuration: one frozen dataclass of numbers, validated once at construction.

What each method is (its family, which of these fields it reads, what it draws at) is the sampler registry's
(`powersample.samplers.registry`): this module knows no method by name."""

from __future__ import annotations

import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from powersample.core.types import Proposal
from powersample.errors import PowerSampleError

# Scales (alpha, and the proposal temperature, 1/alpha by default) outside this range are refused: their reciprocals
# and products with log-probabilities overflow to inf (5e-324 has 1/x = inf) and the weights become NaN.
SCALE_RANGE = (1e-6, 1e6)
MAX_MEMBERS = 2**24  # most sequences one chain may hold (particles, tries, candidates x rollouts): numpy's limits
# (checked by the sampler registry, which knows which method reads which member fields)
MAX_STAGES = 2**20  # most stages (T / B) a config may have: its stage list is built at once
MAX_INT = 2**62  # every integer field stays below this, so numpy never sees an int64 overflow
_NUMBER = r" *([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)? *"
LADDER_PATTERN = f"^{_NUMBER}(,{_NUMBER})*$"  # power-pt's --alphas: "2.35,2.5,2.7,2.9"


@dataclass(frozen=True)
class Spec:
    """Everything about one SamplerConfig field but its name, type and default (the annotation and the default
    beside it). Validation, the CLI options, the server's request fields, its OpenAPI ranges and member caps, and
    the report's expected keys are all derived from these."""

    help: str  # one line for --help (the method's name goes in front of a knob's)
    lo: float | None = None  # the lowest value allowed; None = unbounded
    hi: float | str | None = None  # the highest value allowed, or the field that bounds it; None = unbounded
    lo_open: bool = False  # lo itself is refused
    hi_open: bool = False  # hi itself is refused
    scale: bool = False  # a scale (an exponent or temperature, whose reciprocal is taken): in SCALE_RANGE
    knob: bool = False  # read only by the methods whose registry entry lists it; False = shared by every method
    members: bool = False  # a knob that multiplies the sequences one chain holds (particles, tries, ...)
    note: str = ""  # said after a one-sided range in its error: "(0 = off)"
    shown: str = "default %(default)s"  # what --help says of the default, in brackets after the help line
    metavar: str | None = None  # the CLI option's metavar; None = argparse's own
    served: bool = True  # a request field under its own name (max_new_tokens is the endpoints' max_tokens instead)
    pattern: str | None = None  # a string field's form, as a regular expression (also the OpenAPI `pattern`);
    # `note` says it in words

    def __post_init__(self) -> None:
        if self.scale:
            object.__setattr__(self, "lo", SCALE_RANGE[0])
            object.__setattr__(self, "hi", SCALE_RANGE[1])


def shared(default: Any, help: str, **spec: Any) -> Any:
    """A field every method reads (`method`, `alpha`, `max_new_tokens`, ...)."""
    return field(default=default, metadata={"spec": Spec(help, **spec)})


def knob(default: Any, help: str, **spec: Any) -> Any:
    """A field only some methods read (their registry entry's `knobs`): a CLI option and request field apiece."""
    return field(default=default, metadata={"spec": Spec(help, knob=True, **spec)})


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample. Field defaults follow the paper (Karan & Du, 2025, Sec. 4). A new field is one declaration
    here: `shared(...)` or `knob(...)`, with its range and help line. The shared fields' order is that of the CLI
    options."""

    method: str = shared("power", "sampling method: a name in the sampler registry")
    alpha: float = shared(4.0, "power alpha of the target p^alpha; 1 = the base model itself", scale=True)
    max_new_tokens: int = shared(256, "T, the most tokens generated after the prompt", lo=1, served=False)
    block_size: int | None = shared(None, "block size B", lo=1, hi="max_new_tokens", shown="default T / block count")
    block_count: int = shared(16, "number of blocks T/B, used without a block size", lo=1)
    mcmc_steps: int = shared(10, "Metropolis-Hastings steps per stage", lo=0)
    proposal_temperature: float | None = shared(None, "proposal temperature tau", scale=True, shown="default 1/alpha")
    top_k: int = shared(0, "proposal top-k truncation to the k likeliest tokens; 0 = off", lo=0, note="(0 = off)")
    top_p: float = shared(1.0, "proposal top-p (nucleus) truncation; 1 = off", lo=0, hi=1, lo_open=True)
    speculate: int | None = shared(
        None,
        "MCMC proposals: verify guesses at each continuation (the current suffix, "
        "what the chain drew before) up to K tokens per forward; the same samples, fewer "
        "forwards; 0 = off",
        lo=0,
        note="(0 = off)",
        metavar="K",
        shown="default: the engine's choice: 8 on hf, 0 on llamacpp and vllm",
    )
    # (speculate None = the engine's own choice, what `powersample bench` measured fastest on it: core.drafts)
    tries: int = knob(
        4, "proposals per MH step, drawn in one batched call; 1 = power, draw for draw", lo=1, members=True
    )
    # power-smc (Azizi et al., 2026): particles and ess_threshold as in the authors' MATH500 script
    # (github.com/ArminAzizi98/Power-SMC, power_samp_math.py: n_particles=64, ess_threshold=0.5)
    particles: int = knob(
        64, "particles per sample, advanced together (one batched call per block)", lo=1, members=True
    )
    ess_threshold: float = knob(
        0.5,
        "resample when the effective sample size < this x particles; 0 = never (plain importance sampling)",
        lo=0,
        hi=1,
    )
    alpha_ramp: int = knob(
        0, "tokens over which the exponent ramps from 1 up to alpha; 0 = no ramp", lo=0, note="(0 = off)"
    )
    # (kept off: the authors' ramp also moves the proposal to 1/a_t; ours stays at tau, so a ramp changes only the
    # intermediate weights that resampling sees)
    # power-cut: entropy-guided cuts (samplers/power_cut.py)
    cut_beta: float = knob(
        4.0, "cuts drawn in proportion to (entropy jump)^beta; 0 = every rise in entropy alike", lo=0, hi=1000
    )
    cut_floor: float = knob(
        0.1,
        "share of the cut distribution spread uniformly, in (0, 1]; 1 = power's uniform cut",
        lo=0,
        hi=1,
        lo_open=True,
    )
    candidates: int = knob(8, "K, the likeliest next tokens weighed at each step", lo=1, members=True)
    rollouts: int = knob(4, "M, rollouts per candidate estimating its future power mass", lo=1, members=True)
    rollout_horizon: int = knob(0, "tokens per rollout; 0 = up to T", lo=0, note="(0 = up to T)")
    bon_tokens: int = knob(
        0,
        "budget: candidates are drawn until their tokens reach it (the last one in full); 0 = "
        "the Eq. 12 cost of this config's power run, ceil(N T^2 / (4B) + T)",
        lo=0,
        note="(0 = the Eq. 12 cost)",
    )
    bon_temperature: float = knob(
        1.0, "temperature of the candidates (1 = the base model; top-k and top-p apply)", scale=True
    )
    # power-pt: parallel power tempering (samplers/tempering.py)
    replicas: int = knob(
        4, "K, MH chains at powers alpha_1 < ... < alpha_K = alpha; adjacent ones swap states", lo=1, members=True
    )
    alphas: str | None = knob(
        None,
        "the ladder alpha_1,...,alpha_K: K increasing powers ending at alpha",
        metavar="A1,...,AK",
        shown="default: geometric from alpha_min to alpha",
        pattern=LADDER_PATTERN,
        note="numbers separated by commas",
    )
    alpha_min: float = knob(1.0, "the lowest power of the default geometric ladder", scale=True)

    def __post_init__(self) -> None:
        for name, spec in SPECS.items():
            _check_field(self, name, spec)
        stages = -(-self.max_new_tokens // self.block)  # ceil(T / B), in integers: T may exceed a float's precision
        _check(
            stages <= MAX_STAGES,
            f"max_new_tokens / block size gives {stages} stages; at most {MAX_STAGES} (raise the block size)",
        )

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

    def proposal_at(self, temperature: float) -> Proposal:
        """The distribution tokens are drawn from at `temperature`: temperature, then this config's top-k and top-p."""
        return Proposal(temperature, self.top_k, self.top_p)

    def stage_caps(self) -> list[int]:
        """Length cap of each stage: B, 2B, ..., with the last one clipped to T."""
        b, t = self.block, self.max_new_tokens
        return [min(k * b, t) for k in range(1, math.ceil(t / b) + 1)]

    def fields(self) -> dict[str, Any]:
        """Every field, as given."""
        return asdict(self)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PowerSampleError(message)


def without_none(hint: Any) -> type:
    """A field's type without its None: int for `int | None`."""
    return next(a for a in typing.get_args(hint) or (hint,) if a is not type(None))


SPECS: dict[str, Spec] = {f.name: f.metadata["spec"] for f in fields(SamplerConfig)}  # every field, in order
_HINTS = typing.get_type_hints(SamplerConfig)
TYPES: dict[str, type] = {name: without_none(hint) for name, hint in _HINTS.items()}  # int, float or str
OPTIONAL = frozenset(name for name, hint in _HINTS.items() if type(None) in typing.get_args(hint))  # may be None
INT_FIELDS = tuple(name for name in SPECS if TYPES[name] is int)
SHARED_FIELDS = tuple(name for name, spec in SPECS.items() if not spec.knob)
KNOB_FIELDS = tuple(name for name, spec in SPECS.items() if spec.knob)  # a CLI option and a request field apiece
MEMBER_FIELDS = tuple(name for name, spec in SPECS.items() if spec.members)  # see registry.members


def _check_field(config: SamplerConfig, name: str, spec: Spec) -> None:
    """One field's own checks: a name (method), or a finite number in its range (and an integer below 2^62)."""
    value = getattr(config, name)
    if value is None and name in OPTIONAL:
        return
    if TYPES[name] is str:
        if spec.pattern is None:
            _check(isinstance(value, str) and value != "", f"{name} must be a name, got {value!r}")
        else:
            ok = isinstance(value, str) and re.fullmatch(spec.pattern, value) is not None
            _check(ok, f"{name} must be {spec.note}, got {value!r}")
        return
    lo, hi = spec.lo, getattr(config, spec.hi) if isinstance(spec.hi, str) else spec.hi
    ok = _finite(value) and (lo is None or (lo < value if spec.lo_open else lo <= value))
    ok = ok and (hi is None or (value < hi if spec.hi_open else value <= hi))
    _check(ok, f"{name} must be {range_text(spec, hi)}, got {value}")
    _check(name not in INT_FIELDS or value < MAX_INT, f"{name} must be < 2^62, got {value}")


def range_text(spec: Spec, hi: float | None) -> str:
    """A field's range in words, as its error says it: ">= 0 (0 = off)", "in (0, 1]", "between 1e-06 and 1e+06"
    (`hi`: its upper bound, the bounding field's value where a field bounds it)."""
    lo = spec.lo
    if lo is not None and hi is not None:
        if isinstance(spec.hi, str):
            return f"between {lo:g} and {spec.hi} ({hi})"
        if spec.scale:
            return f"between {lo:g} and {hi:g}"
        return f"in {'(' if spec.lo_open else '['}{lo:g}, {hi:g}{')' if spec.hi_open else ']'}"
    side = f"{'>' if spec.lo_open else '>='} {lo:g}" if lo is not None else f"{'<' if spec.hi_open else '<='} {hi:g}"
    return f"{side} {spec.note}" if spec.note else side


def knob_help(name: str) -> str:
    """The one-line description of a field."""
    return SPECS[name].help
