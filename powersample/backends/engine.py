"""Helpers shared by the engine backends (hf, llamacpp, vllm): the batch extend on top of a continuous loop, the
cache's common prefix, and the context-length check."""

from __future__ import annotations

from typing import Callable, Sequence

from powersample.core.types import Continuation, ExtendRequest, Proposal, Refill
from powersample.errors import PowerSampleError


def extend_in_one_run(
    run: Callable[[dict[int, "ExtendRequest"], "Proposal", Refill], None],
    requests: Sequence["ExtendRequest"],
    proposal: "Proposal",
) -> list["Continuation"]:
    """`extend` for a backend whose continuous loop is `run(requests, proposal, refill)`: every request in one run,
    none refilled; the continuations in request order."""
    results: dict[int, Continuation] = {}

    def collect(key: int, cont: Continuation) -> dict:
        results[key] = cont
        return {}

    run(dict(enumerate(requests)), proposal, collect)
    return [results[j] for j in range(len(requests))]



def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix; the usual case (b extends a) is one C-speed comparison."""
    if len(a) <= len(b) and list(a) == list(b[: len(a)]):
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_fits(context_length: int | None, context: int, new: int) -> None:
    """A one-line PowerSampleError when `context` + `new` tokens exceed the model's context length."""
    if context_length is not None and context + new > context_length:
        raise PowerSampleError(
            f"{context} context tokens + {new} new tokens exceed the model's context length ({context_length})"
        )

