"""What one fidelity run measures: the mode, alpha, T, samples, seed, and the toy targets or the prompts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from powersample.backends.toy import ToySpec
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.samplers.registry import METHODS
from powersample.tools.common import check, utc_now
from powersample.tools.fidelity.exact import check_enumerable
from powersample.tools.machine import machine_info

SPEC_DIR = Path(__file__).resolve().parents[2] / "toy_specs"  # the shipped specs, powersample/toy_specs
DEFAULT_SPECS = ("fidelity_trap", "fidelity_eos")  # toy targets when --spec is not given
MODES = ("toy", "model")


@dataclass(frozen=True)
class ToyTarget:
    """One toy spec to measure on."""

    name: str  # the spec's file stem
    path: str
    max_new_tokens: int

    @classmethod
    def resolve(cls, name_or_path: str, max_new_tokens: int) -> ToyTarget:
        """A shipped spec by name (powersample/toy_specs/NAME.json) or a JSON file by path."""
        shipped = SPEC_DIR / f"{name_or_path}.json"
        path = shipped if shipped.is_file() and os.sep not in name_or_path else Path(name_or_path)
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.json")))
            raise PowerSampleError(f"no toy spec {name_or_path!r}: give a JSON file or one of {names}")
        check_enumerable(ToySpec.load(path), max_new_tokens)  # a malformed spec or a too large T fails now
        return cls(path.stem, str(path), max_new_tokens)


@dataclass(frozen=True)
class FidelityOptions:
    """One fidelity run. Validated at construction."""

    mode: str  # toy | model
    alpha: float = 4.0
    max_new_tokens: int = 6  # T
    samples: int = 1000  # toy: S samples per setting; model: samples (seeds) per prompt
    seed: int = 0
    quick: bool = False
    targets: tuple[ToyTarget, ...] = ()  # toy mode
    prompts: tuple[str, ...] = ()  # model mode
    chat: bool = True  # model mode: apply the chat template
    methods: tuple[str, ...] = ()  # only these methods' settings; () = every method

    def __post_init__(self) -> None:
        check(self.mode in MODES, f"fidelity mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        SamplerConfig(alpha=self.alpha, max_new_tokens=self.max_new_tokens)  # validates alpha and T
        check(self.samples >= 1, f"--samples must be >= 1, got {self.samples}")
        check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed}")
        check(self.mode != "toy" or bool(self.targets), "toy fidelity needs at least one spec")
        check(self.mode != "model" or bool(self.prompts), "model fidelity needs at least one prompt")
        check(all(p.strip() for p in self.prompts), "prompts must not be empty")
        unknown = [m for m in self.methods if m not in METHODS]
        check(not unknown, f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")

    def header(self) -> dict[str, Any]:
        """The start of the result JSON: the run, the machine, `complete` false until the end."""
        return {
            "benchmark": "powersample bench --fidelity",
            "mode": self.mode,
            "complete": False,
            "date": utc_now(),
            "machine": machine_info(os.getloadavg()),
            "alpha": self.alpha,
            "max_new_tokens": self.max_new_tokens,
            "samples": self.samples,
            "seed": self.seed,
            "quick": self.quick,
            "methods": list(self.methods),
        }
