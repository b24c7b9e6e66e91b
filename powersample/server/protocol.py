"""The OpenAI wire format: request bodies in (validated), the rule from request fields to a SamplerConfig, and each
sample's output (stop truncation, per-token pieces, ranked log-probs and the echoed prompt); `formats.py` writes the
answers from them.

Field rules (the README's "Serve" section repeats them):

- `temperature`: for the plain methods (`base`, `low-temp`) it is the sampling temperature, and 0 means greedy
  (the proposal truncated to its top token). For the MCMC methods it is ignored and listed in
  `power_sampling.ignored`: p^alpha sets its own sharpness, and clients such as lm-evaluation-harness send
  `temperature: 0` by default. Their proposal temperature is `proposal_temperature` (default 1/alpha).
- `top_p`: the proposal's top-p, for every method.
- `stop`: sampling runs to EOS or `max_tokens` (a stop string does not end a chain: p^alpha is a law over whole
  sequences); the text is then cut before the earliest stop string, with finish_reason "stop".
- `logprobs` (completions: N in 0..5; chat: `logprobs: true` with `top_logprobs` N in 0..20): the base model's log p
  (temperature 1) of each returned token and, for N >= 1, the N likeliest tokens under the base model at its
  position (completions add the returned token when it is not among them, as OpenAI does: up to N + 1 entries).
  With N >= 1 the alternatives and every log p come from one extra forward per sample over its final tokens, once
  its chain has ended (the backend's `Ranking` capability); a backend without it answers 400. A completion's
  log-probs end with its final EOS when it has one (piece "", as vLLM returns it: lm-eval reads the last entry as
  the generated token); chat's leave it out, as OpenAI's do.
- `echo: true` (completions): each choice's text starts with its prompt, and its log-probs cover the prompt's tokens
  first (the first one has `null` log p and `null` top_logprobs: nothing comes before it), then the generated ones;
  `text_offset` counts characters into the echoed text. `max_tokens: 0` is allowed only with echo and without
  stream: it scores the prompt and samples nothing (no chain runs: power_sampling.chains is empty).
- `prompt` (completions): a string, a list of strings, a list of token ids or a list of such lists (as vLLM takes
  them); an id outside the vocabulary is a 400 naming `prompt`. An echoed id prompt's text is its decoded tokens.
- `stream: true`: server-sent events in OpenAI's chunk format (see `sse.py`); power methods send keep-alive
  comments until their chains end, then the text; base and low-temp (without log-probs) send it as it is drawn.
  `stream_options` is allowed only with `stream: true`.
- `stream_options.include_trace: true` (an extension): each chain's trace events (those of `sample --trace`),
  numbered by choice index, as `: trace {json}` comment lines while the chains run, before the chunks (`sse.py`).
- `block_size` past `max_tokens` is one block of `max_tokens`; `proposal_temperature` for a method that draws from
  the base model (base, power-rollout) is ignored and listed in `power_sampling.ignored`.
- A whole number written with a fraction (`2.0`) is the integer it names, as in JSON Schema.
- Unknown fields are ignored and listed in `power_sampling.ignored`.
- Every string of a body, field names included, must be Unicode text: a lone surrogate (JSON's "\\ud800") is a 400
  naming its field, code `invalid_text`, before any work (`requests.check_text`).
- A number that is not finite (the log p of a token the model gives probability 0) is sent as `null`, in JSON answers
  and SSE events alike (`json_bytes`, their one encoder).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from powersample.api import SampleRecord, first_stop
from powersample.config import MEMBER_FIELDS, SCALE_RANGE, SPECS, TYPES, SamplerConfig
from powersample.core.types import Ranked
from powersample.errors import PowerSampleError
from powersample.samplers import registry
from powersample.samplers.bon import bon_budget
from powersample.samplers.chain import json_ready
from powersample.samplers.power import eq12_tokens
from powersample.samplers.registry import MCMC_METHODS, METHOD_KNOBS, PLAIN_METHODS
from powersample.server.deltas import REPLACEMENT


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers  # sent with the response (Retry-After on a 429)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def json_bytes(data: Any) -> bytes:
    """`data` as compact JSON, every non-finite float as null: the one encoder of every JSON answer and SSE event.
    A log p of -inf (a token the model gives probability 0, offered as an alternative) is `null`, as OpenAI's
    clients expect, never the `-Infinity` that strict JSON parsers refuse."""
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # only when a float is not finite: the walk costs nothing on the common path
        text = json.dumps(json_ready(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Over a limit: 400 naming the field (413 for the body)."""

    max_body_bytes: int = 1_000_000  # request body, checked before parsing
    max_tokens: int = 4096  # max_tokens per sample
    max_n: int = 16  # samples per prompt
    max_prompts: int = 16  # prompts per completions request (a list prompt)
    max_stop: int = 16  # stop strings
    request_timeout: float = 600.0  # seconds from arrival; then the request's chains are stopped (504)
    max_queued_chains: int = 256  # chains waiting or running in the engine; more gets 429
    # the work of a request, not its chain count: members = prompts x n x sequences per chain (particles, tries,
    # candidates x rollouts; 1 for power), each set up (a generator) before the first engine request
    max_members: int = 4096  # members of one request; more gets 400 (their setup: about 25 us and 2 KB each)
    max_work: int = 2**22  # members x max_tokens of one request (tokens its sequences may hold); more gets 400
    max_queued_work: int = 2**24  # members x max_tokens of every request waiting or running; more gets 429
    max_mcmc_steps: int = 1000  # mcmc_steps of one request (the MCMC methods, and bon's default budget); more: 400
    max_context: int = 8192  # prompt tokens + max_tokens of one request (below the model's own context: the KV
    # memory a request may take, up to 33 sequences x this on llama.cpp); more gets 400 context_length_exceeded
    retry_after: int = 1  # seconds a 429 tells the client to wait (its Retry-After header)


# --- request bodies ---------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`."""

    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool | None = None  # a last chunk with `usage` and no choices, before [DONE]
    include_trace: bool | None = None  # extension: the chains' trace events as `: trace {json}` comments (sse.py)


class _Strict(BaseModel):
    """A request body: strict types ("5" is not a number here), unknown fields kept (and reported as ignored)."""

    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """A field sent as null takes its default, as in OpenAI's API."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, data: Any) -> Any:
        """A whole number written with a fraction (`5.0`) is the integer 5: JSON has one number type, and JSON Schema's
        "integer" means any whole number, so `{"n": 2.0}` is as valid as `{"n": 2}` (`2.5` stays a 400)."""
        return _whole(data)


def _whole(value: Any) -> Any:
    """`value` with every float that is a whole number, in lists and objects at any depth, made an int (a float field
    takes the int back: strict mode allows int for float)."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, list):
        return [_whole(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    return value


class _Body(_Strict):
    """Fields both generation endpoints share."""

    model: str | None = None  # echoed back; the server serves one model whatever the name
    max_tokens: int | None = None  # default: the server's --max-new-tokens
    n: int = 1
    seed: int | None = None  # None: a random seed, reported in power_sampling.seed
    stop: str | list[str] | None = None
    temperature: float | None = None
    stream: bool | None = None  # server-sent events (sse.py)
    stream_options: StreamOptions | None = None  # only with stream: true
    user: str | None = None
    # + one optional field per sampler field (method, alpha, top_p, ..., tries, particles, ...; the openai SDK's
    # extra_body): see _with_sampler_fields. None = the server's command-line default


# The request fields that set a SamplerConfig field of the same name: every shared field the config declares served
# (max_new_tokens is max_tokens here) and every knob of a method in the registry
SAMPLER_FIELDS = tuple(name for name, spec in SPECS.items() if spec.served and (not spec.knob or name in METHOD_KNOBS))


def _with_sampler_fields(base: type[BaseModel]) -> type[BaseModel]:
    """`base` plus one optional request field per SAMPLER_FIELDS name, typed as in SamplerConfig, so that a new
    field or a new sampler's knobs are request fields without an edit here."""
    extra: dict[str, Any] = {name: (TYPES[name] | None, None) for name in SAMPLER_FIELDS}
    return create_model(base.__name__, __base__=base, __module__=base.__module__, **extra)


_Body = _with_sampler_fields(_Body)


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids (as vLLM takes them)
    logprobs: int | None = None  # 0..5: OpenAI's legacy completions field
    echo: bool = False  # prepend the prompt to each choice (its tokens to the log-probs); max_tokens 0 scores it


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens; wins when both are given
    logprobs: bool = False
    top_logprobs: int | None = None  # 0..20, with logprobs


class TokenizeBody(_Strict):
    """POST /tokenize, in vLLM's shape: a prompt, or a conversation (through the chat template); one of the two."""

    model: str | None = None
    prompt: str | None = None  # encoded as /v1/completions encodes a text prompt
    messages: list[Message] | None = None  # encoded as /v1/chat/completions encodes its messages
    add_special_tokens: bool = True  # accepted for vLLM's clients; the ids are always those the endpoints use


class DetokenizeBody(_Strict):
    """POST /detokenize, in vLLM's shape."""

    model: str | None = None
    tokens: list[int]


_SHARED = set(_Body.model_fields)


def parse_body(model: type[BaseModel], data: Any) -> Any:
    """Validate a parsed JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        loc = [str(part) for part in error["loc"]]
        field = loc[0] if loc else None
        where = ".".join(loc) or "body"
        if error["type"] == "missing":
            raise ApiError(400, f"'{where}' is required", param=field, code="missing_field") from None
        raise ApiError(400, f"'{where}': {error['msg']}", param=field, code="invalid_type") from None


def check_limits(body: _Body, limits: Limits) -> None:
    """Limits and unsupported options, each a 400 naming the field."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    max_tokens = _max_tokens(body)
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens and not scores_only(body):
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        zero = " (0 only with echo: true)" if isinstance(body, CompletionBody) else ""
        raise ApiError(400, f"{param} must be between 1 and {limits.max_tokens}{zero}, got {max_tokens}", param=param)
    if not 1 <= body.n <= limits.max_n:
        raise ApiError(400, f"n must be between 1 and {limits.max_n}, got {body.n}", param="n")
    if body.seed is not None and body.seed < 0:
        raise ApiError(400, f"seed must be >= 0, got {body.seed}", param="seed")
    stops = stop_strings(body)
    if len(stops) > limits.max_stop or any(not s for s in stops):
        raise ApiError(400, f"stop must be at most {limits.max_stop} non-empty strings", param="stop")
    _check_counts(body, limits)
    if body.temperature is not None and not _temperature_ok(body.temperature):
        lo = SCALE_RANGE[0]
        raise ApiError(
            400, f"temperature must be 0 (greedy) or between {lo:g} and 2, got {body.temperature}", param="temperature"
        )
    if isinstance(body, CompletionBody):
        _check_completion(body, limits)
    elif isinstance(body, ChatBody):
        _check_chat(body)


def _temperature_ok(temperature: float) -> bool:
    """0 (greedy), or a temperature a plain method can draw at (SCALE_RANGE's floor, whatever the method: the rule
    stays one field's, as the served document gives it)."""
    return temperature == 0 or (math.isfinite(temperature) and SCALE_RANGE[0] <= temperature <= 2)


def field_caps(limits: Limits) -> dict[str, int]:
    """The most a sampler request field may be, whatever the method: the server's limits (the served document's
    maxima). Each member field (SamplerConfig's `members=True`: particles, tries, ...) is capped at max_members."""
    members = {name: limits.max_members for name in MEMBER_FIELDS if name in SAMPLER_FIELDS}
    return {"mcmc_steps": limits.max_mcmc_steps, "block_size": limits.max_tokens, **members}


def _check_counts(body: _Body, limits: Limits) -> None:
    """Counts sent past what any request may run are refused whatever the method (the served document's ranges)."""
    for name, cap in field_caps(limits).items():
        value = getattr(body, name)
        if value is not None and value > cap:
            raise ApiError(400, f"{name} must be at most {cap}, got {value}", param=name, code="over_limit")


def _check_completion(body: CompletionBody, limits: Limits) -> None:
    prompts = prompt_list(body)
    if not prompts:
        raise ApiError(400, "prompt must be a string, a token-id list, or a non-empty list of those", param="prompt")
    if len(prompts) > limits.max_prompts:
        raise ApiError(400, f"prompt may hold at most {limits.max_prompts} prompts, got {len(prompts)}", param="prompt")
    if any(not (p.strip() if isinstance(p, str) else p) for p in prompts):
        raise ApiError(400, "the prompt is empty", param="prompt")
    if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise ApiError(400, f"logprobs must be between 0 and 5, got {body.logprobs}", param="logprobs")
    if scores_only(body) and body.stream:
        raise ApiError(
            400, "max_tokens 0 (prompt scoring) is not streamed: send it without stream: true", param="stream"
        )


def _check_chat(body: ChatBody) -> None:
    if not any(m.text().strip() for m in body.messages):
        raise ApiError(400, "the messages are empty: no message has any text", param="messages")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise ApiError(400, f"top_logprobs must be between 0 and 20, got {body.top_logprobs}", param="top_logprobs")


def prompt_list(body: CompletionBody) -> list[str] | list[list[int]]:
    """The prompts: texts, or token-id lists."""
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # type: ignore[return-value]
    return list(prompt)  # type: ignore[return-value]


def scores_only(body: _Body) -> bool:
    """A completions request that scores its prompt and samples nothing: echo with max_tokens 0."""
    return isinstance(body, CompletionBody) and body.echo and body.max_tokens == 0


def wanted_logprobs(body: _Body) -> int | None:
    """How many alternatives per token a request asks for: completions' `logprobs`, chat's `top_logprobs` (0 when
    unset) with `logprobs: true`; None when it asks for no log-probs at all."""
    if isinstance(body, ChatBody):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs  # type: ignore[attr-defined]


def stop_strings(body: _Body) -> list[str]:
    if body.stop is None:
        return []
    return [body.stop] if isinstance(body.stop, str) else list(body.stop)


def _max_tokens(body: _Body) -> int | None:
    newer = getattr(body, "max_completion_tokens", None)
    return newer if newer is not None else body.max_tokens


# --- request -> sampler config ------------------------------------------------------------------------------------


def check_budget(config: SamplerConfig, prompts: int, n: int, limits: Limits) -> int:
    """The request's work (members x max_tokens), checked against the per-request limits: each a 400 naming the
    field that sets it. Checked before any chain exists, so a huge request costs nothing."""
    if config.method in MCMC_METHODS and config.mcmc_steps > limits.max_mcmc_steps:
        raise ApiError(
            400,
            f"mcmc_steps must be at most {limits.max_mcmc_steps}, got {config.mcmc_steps}",
            param="mcmc_steps",
            code="over_limit",
        )
    if registry.method(config.method).family == "bon":
        _check_bon_budget(config, limits)
    members = prompts * n * registry.members(config)
    what = f"{prompts} prompt(s) x n {n} x {registry.member_field(config)} {registry.members(config)}"
    param = registry.member_field(config) if registry.members(config) > 1 else "n"
    if members > limits.max_members:
        raise ApiError(
            400,
            f"the request asks for {members} sequences ({what}); the server's limit is {limits.max_members}",
            param=param,
            code="over_limit",
        )
    work = members * config.max_new_tokens
    if work > limits.max_work:
        param = "max_tokens" if registry.members(config) == 1 and n == 1 else param
        raise ApiError(
            400,
            f"the request asks for {work} tokens of sequences ({what} x max_tokens "
            f"{config.max_new_tokens}); the server's limit is {limits.max_work}",
            param=param,
            code="over_limit",
        )
    return work


def _check_bon_budget(config: SamplerConfig, limits: Limits) -> None:
    """bon's tokens per chain: its budget (bon_tokens, or the Eq. 12 cost set by mcmc_steps) costs what a power run
    with at most max_mcmc_steps steps would."""
    param = "bon_tokens" if config.bon_tokens else "mcmc_steps"
    most = math.ceil(eq12_tokens(config.max_new_tokens, config.block, limits.max_mcmc_steps))
    if bon_budget(config) > most:
        raise ApiError(
            400,
            f"bon's budget of {bon_budget(config)} tokens is over the server's limit of {most} (the "
            f"cost of {limits.max_mcmc_steps} MCMC steps at this max_tokens and block size)",
            param=param,
            code="over_limit",
        )


def sampler_config(body: _Body, defaults: SamplerConfig) -> tuple[SamplerConfig, list[str]]:
    """The request's SamplerConfig (the server's defaults, overridden by the body), and the fields ignored."""
    over: dict[str, Any] = {"method": defaults.method if body.method is None else body.method}
    for name in (n for n in SAMPLER_FIELDS if n not in ("method", "block_count")):
        if getattr(body, name) is not None:
            over[name] = getattr(body, name)
    if body.block_count is not None:
        over.update(block_count=body.block_count, block_size=None if body.block_size is None else body.block_size)
    max_tokens = _max_tokens(body)
    if max_tokens is not None and not scores_only(body):  # max_tokens 0 runs no sampler: the defaults stand in
        over["max_new_tokens"] = max_tokens
        if body.block_size is None and body.block_count is None and defaults.block_size is not None:
            # the server's fixed default B, clipped to this request's T
            over["block_size"] = min(defaults.block_size, max_tokens)
    if over.get("block_size") is not None:  # a block past T is one block of T
        over["block_size"] = min(over["block_size"], over.get("max_new_tokens", defaults.max_new_tokens))
    ignored = sorted(set(body.model_extra or {}))
    if isinstance(body, ChatBody) and body.top_logprobs is not None and not body.logprobs:
        ignored.append("top_logprobs")  # alternatives come only with logprobs: true
    if body.temperature is not None:
        if over["method"] in PLAIN_METHODS:
            over.update(registry.plain_temperature(over["method"], body.temperature, body.proposal_temperature))
        else:
            ignored.append("temperature")
    if "proposal_temperature" in over and _draws_at_one(over["method"]):
        del over["proposal_temperature"]  # the method draws from the base model: no proposal temperature to set
        ignored.append("proposal_temperature")
    try:
        config = replace(defaults, **over)
        registry.check(config)
        return config, ignored
    except PowerSampleError as e:
        raise ApiError(400, str(e), param=_param_of(str(e), over)) from None


def _draws_at_one(method: str) -> bool:
    """Whether `method` draws from the base model itself (tau = 1: base, power-rollout), where a proposal temperature
    means nothing (power-rollout's own check refuses one; a request's is ignored and listed instead)."""
    entry = registry.REGISTRY.get(method)
    return entry is not None and entry.temperature is registry.base_tau


def _param_of(message: str, over: dict) -> str | None:
    """The request field a SamplerConfig message is about (its messages start with the field's name)."""
    if message.startswith("unknown method"):
        return "method"
    first = message.split(" ", 1)[0]
    return {"max_new_tokens": "max_tokens"}.get(first, first if first in over or first in _SHARED else None)


def new_seed() -> int:
    return secrets.randbits(31)


# --- responses ------------------------------------------------------------------------------------------------------


Alternatives = tuple[tuple[str, float], ...]  # (piece, base log p) of the likeliest tokens at one position


@dataclass(frozen=True)
class Output:
    """One returned sample: its text after stop truncation, and the tokens behind it."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    tokens: tuple[int, ...]  # the returned tokens: a final EOS and tokens after a stop string dropped
    pieces: tuple[str, ...]  # text of each returned token (empty unless asked for)
    offsets: tuple[int, ...]  # character offset of each token's piece in `text` (empty unless asked for)
    logp: tuple[float | None, ...]  # base log p of each returned token (None: an echoed prompt's first token)
    completion_tokens: int  # returned tokens, the final EOS counted when it ends the sample
    top: tuple[Alternatives | None, ...] = ()  # per token, when asked (logprobs N >= 1): the N likeliest tokens
    # (piece, base log p), likeliest first; None where no distribution comes before the token; () when not asked


def finish(
    decode,
    record: SampleRecord,
    stops: Sequence[str],
    want_pieces: bool,
    check: Callable[[], None] | None = None,
    keep_eos: bool = False,
) -> Output:
    """Cut the record's text before its earliest stop string, and find the tokens behind what is left (`keep_eos`:
    a final EOS stays among them, with the piece ""). `check` is called before each token's piece (it raises to stop
    the work: the client left, or the deadline passed)."""
    ended = record.finish_reason == "eos"
    tokens = record.tokens[:-1] if ended and not keep_eos else record.tokens
    cut = first_stop(record.text, stops)
    text = record.text if cut < 0 else record.text[:cut]
    if cut < 0 and not want_pieces:
        return Output(
            text, "stop" if ended else "length", tokens, (), (), record.token_logp[: len(tokens)], len(record.tokens)
        )
    pieces, offsets = _pieces(decode, tokens, check)
    keep = len(tokens) if cut < 0 else sum(1 for o in offsets if o < cut)
    count = len(record.tokens) if cut < 0 else keep
    return Output(
        text,
        "stop" if ended or cut >= 0 else "length",
        tokens[:keep],
        pieces[:keep],
        offsets[:keep],
        record.token_logp[:keep],
        count,
    )


PIECE_WINDOW = 8  # tokens of context each token's piece is decoded with (detokenizers look only a few tokens back)


def _window_start(i: int, window: int = PIECE_WINDOW) -> int:
    """Where the decode window of token i starts: a multiple of `window`, between `window` and 2 `window` back."""
    return max(0, (i // window - 1) * window)


def _pieces(
    decode, tokens: Sequence[int], check: Callable[[], None] | None = None, window: int = PIECE_WINDOW
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Each token's text as the growth of the decoded text when the token is added, so the pieces add up to the text.

    Incremental: the growth is measured on a window that starts at a multiple of `window` tokens, between `window`
    and 2 `window` tokens back, so one decode of at most 2 `window` + 1 tokens per token (and one more per window
    move): linear in T, where decoding every prefix is quadratic. Both texts of a growth are decoded from the same
    start, so a detokenizer's handling of a sequence's first token (a dropped leading space) cancels out.

    At character boundaries: a character whose bytes span several tokens (byte tokens of "漢") belongs whole to the
    token that completes it, the tokens before it having the piece "" (`_settled`: the U+FFFD a detokenizer shows
    for the bytes so far is not text yet), as vLLM's pieces do; the last token takes whatever is left."""
    pieces, offsets, start, before, offset = [], [], 0, "", 0
    for i in range(len(tokens)):
        if check is not None:
            check()
        begin = _window_start(i, window)
        if begin != start:
            start, before = begin, _settled(decode(tokens[begin:i]))
        text = decode(tokens[start : i + 1])
        text = text if i == len(tokens) - 1 else _settled(text)
        piece = text[min(len(before), len(text)) :]
        pieces.append(piece)
        offsets.append(offset)
        offset += len(piece)
        before = text
    return tuple(pieces), tuple(offsets)


def _settled(text: str) -> str:
    """`text` without the U+FFFD at its end: what a detokenizer shows for a character whose last bytes have not come
    yet (the next token may complete it; it is no text of its own before then)."""
    return text.rstrip(REPLACEMENT)


def ranked(decode, out: Output, ranks: Sequence[Ranked], check: Callable[[], None] | None = None) -> Output:
    """`out` with each token's log p and likeliest alternatives from `ranks` (Ranking.rank of its tokens)."""
    tops = _named(decode, out.tokens, [r.top for r in ranks], check)
    return replace(out, logp=tuple(r.base_logp for r in ranks), top=tops)


def echoed(
    decode,
    out: Output,
    prompt: Sequence[int],
    text: str | None,
    ranks: Sequence[Ranked] | None,
    top: bool,
    check: Callable[[], None] | None = None,
) -> Output:
    """`out` with its prompt in front (echo): the prompt's text (`text`, or its tokens' pieces joined for an id
    prompt) and tokens, with the log p and (`top`) the alternatives that `ranks` gives every prompt token after the
    first (None: no log-probs asked). The first prompt token has neither: None."""
    pieces, offsets = _pieces(decode, prompt, check)
    text = "".join(pieces) if text is None else text
    head = (None,) if prompt else ()
    logp = head + (tuple(r.base_logp for r in ranks) if ranks is not None else (None,) * max(len(prompt) - 1, 0))
    tops = head + _named(decode, prompt, [r.top for r in ranks or ()], check, first=1) + out.top if top else ()
    return replace(
        out,
        text=text + out.text,
        tokens=tuple(prompt) + out.tokens,
        pieces=pieces + out.pieces,
        offsets=offsets + tuple(len(text) + o for o in out.offsets),
        logp=logp + out.logp,
        top=tops,
    )


def _named(
    decode,
    tokens: Sequence[int],
    tops: Sequence[tuple[tuple[int, float], ...]],
    check: Callable[[], None] | None = None,
    first: int = 0,
) -> tuple[Alternatives, ...]:
    """Each position's (id, log p) alternatives as (piece, log p), from position `first` of `tokens` on: a token's
    piece is what its text adds after the tokens before it, decoded as `_pieces` decodes the token there (the same
    window, held at a character boundary alike), so the piece of the token actually there is its own piece."""
    named = []
    for i, top in enumerate(tops, start=first):
        if check is not None:
            check()
        begin, last = _window_start(i), i == len(tokens) - 1
        before = _settled(decode(tokens[begin:i]))
        texts = ((decode([*tokens[begin:i], t]), lp) for t, lp in top)
        named.append(tuple(((text if last else _settled(text))[len(before) :], lp) for text, lp in texts))
    return tuple(named)
