"""Each SamplerConfig field is declared once (config.Spec, in the field's metadata) and every consumer derives from
that: validation, the CLI options, the server's request fields, its OpenAPI ranges and member caps."""

from __future__ import annotations

import argparse
import math
from dataclasses import fields

import pytest

from powersample.cli.options import add_sampler_options, config_from_args, option
from powersample.config import (
    INT_FIELDS,
    KNOB_FIELDS,
    MAX_INT,
    MEMBER_FIELDS,
    SCALE_RANGE,
    SPECS,
    TYPES,
    SamplerConfig,
    Spec,
)
from powersample.errors import PowerSampleError
from powersample.samplers.registry import METHOD_KNOBS, REGISTRY

pytest.importorskip("fastapi")

from powersample.server import protocol as wire
from powersample.server.schema import field_ranges


def test_every_field_has_complete_metadata():
    for f in fields(SamplerConfig):
        spec = f.metadata.get("spec")
        assert isinstance(spec, Spec), f.name
        assert spec.help and "\n" not in spec.help and spec.shown, f.name
        assert TYPES[f.name] in (int, float, str), f.name
        if TYPES[f.name] is str:
            continue
        assert spec.lo is not None or spec.hi is not None, f"{f.name} has no range"
        assert not spec.scale or (TYPES[f.name] is float and (spec.lo, spec.hi) == SCALE_RANGE), f.name
        assert not spec.members or (spec.knob and TYPES[f.name] is int and spec.lo == 1), f.name
        assert isinstance(spec.hi, (int, float, type(None))) or spec.hi in SPECS, f.name
        if spec.knob:
            assert f.name in METHOD_KNOBS, f"{f.name}: a knob no method in the registry reads"
    assert set(INT_FIELDS) == {n for n, t in TYPES.items() if t is int}
    assert set(MEMBER_FIELDS) <= set(KNOB_FIELDS)
    assert {m for entry in REGISTRY.values() for m in entry.members} == set(MEMBER_FIELDS)


def ranged() -> list[str]:
    return [n for n, s in SPECS.items() if TYPES[n] is not str]


def bound(name: str, value: float) -> float | int:
    return int(value) if TYPES[name] is int else value


@pytest.mark.parametrize("name", ranged())
def test_each_bound_is_checked_as_declared(name):
    """At a closed bound the field is accepted; at an open one, or one step past either, refused with a message
    that starts with the field's name (the server's `param`)."""
    spec = SPECS[name]
    base = {"max_new_tokens": 1024} if spec.hi == "max_new_tokens" else {}
    hi = base.get("max_new_tokens", 256) if isinstance(spec.hi, str) else spec.hi
    for edge, is_open, step in ((spec.lo, spec.lo_open, -1), (hi, spec.hi_open, 1)):
        if edge is None:
            continue
        at = {**base, name: bound(name, edge)}
        past = bound(name, edge + step) if TYPES[name] is int else edge + step * max(abs(edge), 1) / 2
        with pytest.raises(PowerSampleError, match=f"^{name} must be "):
            SamplerConfig(**{**base, name: past})
        if is_open:
            with pytest.raises(PowerSampleError, match=f"^{name} must be "):
                SamplerConfig(**at)
        else:
            SamplerConfig(**at)
    if TYPES[name] is float:
        with pytest.raises(PowerSampleError, match=f"^{name} must be "):
            SamplerConfig(**{name: math.nan})
    if name in INT_FIELDS and spec.hi is None:
        with pytest.raises(PowerSampleError, match=f"^{name} must be < 2\\^62"):
            SamplerConfig(**{"max_new_tokens": MAX_INT - 1, "block_size": MAX_INT - 1, name: MAX_INT})


def test_every_ranged_request_field_has_its_openapi_range():
    """cut_beta and cut_floor included: the served document's bounds are the declared ones (open ones exclusive),
    the server's caps in place of an upper bound where it has one."""
    limits = wire.Limits()
    ranges, caps = field_ranges(limits), wire.field_caps(limits)
    assert {"cut_beta", "cut_floor"} <= set(wire.SAMPLER_FIELDS)
    for name in wire.SAMPLER_FIELDS:
        spec, got = SPECS[name], ranges[name]
        if TYPES[name] is str:
            continue
        assert got[("exclusiveMinimum" if spec.lo_open else "minimum")] == spec.lo, name
        if name in caps:
            assert got["maximum"] == caps[name], name
        elif isinstance(spec.hi, (int, float)):
            assert got[("exclusiveMaximum" if spec.hi_open else "maximum")] == spec.hi, name
        else:
            assert got["maximum"] == MAX_INT - 1, name
    assert ranges["cut_floor"] == {"exclusiveMinimum": 0, "maximum": 1}
    assert ranges["cut_beta"] == {"minimum": 0, "maximum": 1000}
    assert set(MEMBER_FIELDS) <= set(caps)


def test_the_cli_and_the_request_model_carry_every_field():
    parser = argparse.ArgumentParser()
    add_sampler_options(parser)
    options = {a.dest: a for a in parser._actions}
    served = set(wire.CompletionBody.model_fields)
    for name in SPECS:
        assert name in options and options[name].option_strings == [option(name)], name
        assert options[name].type in (TYPES[name], None), name  # None: --method, a choice
        assert options[name].default == getattr(SamplerConfig(), name), name
        assert name in served or not SPECS[name].served, name
    assert config_from_args(parser.parse_args([])) == SamplerConfig()
