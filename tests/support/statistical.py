"""The statistical smoke tests' two helpers: draw real chains with numpy generators, and compare their empirical law
with an exact one against the multinomial null (the exact tests use support.tracing instead, with no noise)."""

from __future__ import annotations

from exact_laws import empirical, tv, tv_null_quantile

from powersample import SamplerConfig, sample
from powersample.backends.toy import ToyBackend
from support.toy import load_spec

N = 3000  # samples per statistical test; each is an independent chain


def draw(spec_name: str, config: SamplerConfig, n: int = N, seed: int = 0) -> list[tuple[int, ...]]:
    backend = ToyBackend(load_spec(spec_name))
    return [r.tokens for r in sample(backend, "ignored", config, seed=seed, num_samples=n)]


def assert_follows(samples: list[tuple[int, ...]], law: dict) -> None:
    """TV(empirical, law) must be within the 99.9% quantile of the multinomial null for len(samples) draws."""
    have, bound = tv(empirical(samples), law), tv_null_quantile(law, len(samples))
    assert set(empirical(samples)) <= {k for k, v in law.items() if v > 0}, "a sample outside the support"
    assert have <= bound, f"TV {have:.4f} > null 99.9% quantile {bound:.4f}"
