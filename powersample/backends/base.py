"""The backend seam: the only thing samplers know about an engine.

Of any prefix a backend answers two questions:

1. `extend`: sample a continuation of up to n tokens from the proposal q (the model at temperature tau, optionally
   truncated by top-k / top-p), stopping early at EOS, and return for every new token both its base log-prob
   log p (temperature 1, no truncation) and its proposal log-prob log q.
2. `score`: the base log-prob log p of every token of a given continuation.

Requests come in batches (one per chain) so that an engine can serve all chains with one forward per step. Each
request carries its chain's random generator, so a chain's draws never depend on the rest of the batch, and a
`slot` naming the cache it may reuse: a backend keeps one cache per slot and reuses its longest common prefix
with the request's context, so correctness never depends on the hint.

`Backend` is what every backend implements. What only some do is an optional capability, each its own Protocol:

- `ContinuousBatching`: `extend_continuous`, a batch that stays full as rows finish (the driver's schedule);
- `ChatMessages`: `encode_messages`, a whole conversation through the model's chat template (the server);
- `Confidence`: `confidence`, the per-position confidence of the paper's Eq. 13 (evaluation);
- `Speculation`: `default_speculate`, how many guessed tokens per forward the engine is fastest with (requests
  whose sampler leaves `speculate` to the engine);
- `Ranking`: `rank`, each continuation token's log p with the n likeliest tokens at its position, in one forward
  (the server's `logprobs` / `top_logprobs`, and prompt scoring with `echo`);
- `Vocabulary`: `vocab_size` and `token_text`, what the ids are (the server's token-id prompts and tokenizer
  endpoints);
- `PlansMemory`: `kv_layout`, the KV cache one sequence holds per token (backends/memory.py: the chains a memory
  budget admits at once).

A request's `hints` (core.types.Hints: a draft to verify, a floor to stop below) may be ignored. A backend declares
the ones it honours as `HINTS`, a class attribute (`hints_honoured` reads it; none when absent): "speculate" (it
verifies `draft` up to `speculate` tokens per forward) and "floor" (it stops a row once it falls below `floor`).
The conformance suite checks that each one it claims changes the forwards a request costs, never its tokens.

Whether the model has a chat template is no capability of its own: `has_chat_template` reads it off `encode`, which
ignores `chat` where there is none, so the toy and every engine answer alike.

Callers ask `capability(backend, ContinuousBatching)`, the one place that checks: it returns the backend typed as
the capability when it has every method the Protocol declares, else None. It looks the methods up with `getattr`,
so a wrapper that forwards attributes (`__getattr__`) offers what it wraps, on every Python version (an `isinstance`
check of a runtime Protocol would not see those since Python 3.12). The conformance suite that a backend's promises
are checked with is `powersample.backends.conformance`.

Diagnostics are not part of the seam: a backend may count its work (calls, forwards, tokens fed, cache hits) in a
`stats` attribute, a dataclass of counters of its own (ToyStats, HFStats, ...), read by tests and tools, never by
samplers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Protocol, Sequence, TypeVar

from powersample.core.types import Continuation, ExtendRequest, Poll, Proposal, Ranked, Refill, Tokens

if TYPE_CHECKING:
    from powersample.backends.memory import KVLayout


class Backend(Protocol):
    """What samplers may call, and what every backend implements. See the module docstring."""

    # Read-only to callers (properties here), so a backend may hold them as plain attributes of a narrower type
    # (the toy's context_length is always None).
    @property
    def eos_ids(self) -> frozenset[int]:
        """Ids that end a sequence."""
        ...

    @property
    def context_length(self) -> int | None:
        """Most tokens (prompt + generated) the model accepts; None = unbounded."""
        ...

    def encode(self, prompt: str, chat: bool) -> Tokens:
        """Prompt ids; `chat` applies the model's chat template (ignored where there is none)."""
        ...

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of generated ids, special tokens dropped."""
        ...

    def extend(self, requests: Sequence[ExtendRequest], proposal: Proposal) -> list[Continuation]:
        """One continuation per request, in order."""
        ...

    def score(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """log p of each continuation token given context and the tokens before it."""
        ...


class ContinuousBatching(Protocol):
    """A backend whose batch stays full: finished rows are refilled at once instead of waiting for a round."""

    def extend_continuous(
        self, requests: Mapping[int, ExtendRequest], proposal: Proposal, refill: Refill, poll: Poll | None = None
    ) -> None:
        """Decode `requests` (by key, one slot each) as one batch. When a row finishes, refill(key, continuation)
        returns the requests that start now; before each step poll() returns those that arrived meanwhile. Returns
        once no row is left and poll() has nothing."""
        ...


class ReleasesMemory(Protocol):
    """A backend that holds memory grown for past work (a bigger KV cache) and can give it back between requests."""

    def release_memory(self) -> None:
        """Give back what past work grew, keeping the results of later calls unchanged (cached prefixes may go).
        The server's engine calls it whenever it goes idle."""
        ...


class ChatMessages(Protocol):
    """A backend that renders a whole conversation through the model's chat template."""

    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> Tokens:
        """Ids of a conversation ({"role", "content"} dicts) plus the assistant header."""
        ...


class Confidence(Protocol):
    """A backend that reports the base model's confidence before each token."""

    def confidence(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """Sum_x p(x | prefix) log p(x | prefix) (minus the entropy) of the base next-token distribution before
        each continuation token: the per-position confidence of the paper's Eq. 13."""
        ...


class Speculation(Protocol):
    """A backend that verifies a request's draft several tokens per forward (Hints.draft, Hints.speculate)."""

    def default_speculate(self) -> int:
        """The most draft tokens per forward this engine, as loaded, is fastest with; 0 when a forward of k tokens
        costs about k forwards of one, so drafts cost more than they save."""
        ...


class Ranking(Protocol):
    """A backend that ranks the base next-token distribution at every position of a continuation."""

    def rank(self, context: Sequence[int], continuation: Sequence[int], n: int) -> tuple[Ranked, ...]:
        """One Ranked per continuation token, from one forward over context + continuation: the token's base log p
        (what `score` gives) and the n likeliest tokens (id, base log p) of the distribution it was drawn from,
        likeliest first, ties by the smaller id (as core.numerics.top_alternatives ranks them)."""
        ...


class Vocabulary(Protocol):
    """A backend that says what its token ids are."""

    def vocab_size(self) -> int:
        """How many ids the backend takes: every id in [0, vocab_size()) can be decoded and scored, no other."""
        ...

    def token_text(self, token: int) -> str:
        """The text of one id, special tokens spelled out ("<|im_end|>"), unlike `decode`."""
        ...


class PlansMemory(Protocol):
    """A backend that says how much KV cache one sequence holds (backends/memory.py)."""

    def kv_layout(self) -> KVLayout:
        """The engine's KV layout as loaded: bytes per token of its model and cache dtype, buffers per slot."""
        ...


HINTS = frozenset({"speculate", "floor"})  # the hints a backend may honour (core.types.Hints; module docstring)


def hints_honoured(backend: object) -> frozenset[str]:
    """The request hints `backend` declares it honours (its `HINTS`; none when it declares none)."""
    return frozenset(getattr(backend, "HINTS", frozenset())) & HINTS


C = TypeVar("C")


def capability(backend: object, protocol: type[C]) -> C | None:
    """`backend` as the optional capability `protocol` (ContinuousBatching, ChatMessages, Confidence,
    Speculation, Ranking, Vocabulary) when it has every method the Protocol declares, else None."""
    methods = [name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")]
    if all(callable(getattr(backend, name, None)) for name in methods):
        return backend  # type: ignore[return-value]
    return None


CHAT_PROBE = "Hello."  # any text: a chat template turns it into a conversation, other ids than the text's own


def has_chat_template(backend: Backend) -> bool:
    """Whether `encode(prompt, chat=True)` goes through a chat template: then its ids differ from the plain prompt's
    (`encode` ignores `chat` where the model has none). The toy, whose prompt is ignored, has none."""
    return tuple(backend.encode(CHAT_PROBE, True)) != tuple(backend.encode(CHAT_PROBE, False))
