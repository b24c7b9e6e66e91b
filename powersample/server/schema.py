"""The served OpenAPI document (`GET /openapi.json`): request bodies from the very models that validate them
(`protocol.CompletionBody`, `protocol.ChatBody`, power-sampling fields included) and the response models below,
which are what the handlers build their answers from (`formats.py`): one definition is both the code and the
document, and a fuzzer (schemathesis) checks every answer against it. The handlers parse bodies themselves (size
first, then JSON, then the model: see `requests.read_json`), so the request bodies are added to FastAPI's document here.
A streamed answer (`stream: true`) is `text/event-stream`; its chunk objects are the components CompletionChunk and
ChatChunk (see `sse.py`). A server with an API key declares HTTP bearer auth (`components.securitySchemes`) on the
routes that need the key (`requests.authenticate`); /health answers anyone.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from powersample.config import MAX_INT, SCALE_RANGE, SPECS, TYPES
from powersample.samplers.registry import METHODS
from powersample.server.protocol import (
    SAMPLER_FIELDS,
    ChatBody,
    CompletionBody,
    DetokenizeBody,
    Limits,
    TokenizeBody,
    field_caps,
)

_REF = "#/components/schemas/{model}"


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Out):
    """OpenAI's error body, for every 4xx and 5xx."""

    error: ErrorDetail


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChainStats(_Out):
    index: int
    logp: float
    finish_reason: Literal["eos", "length"]
    proposals: int
    accepted: int
    acceptance_rate: float | None  # null where no MH proposal was made
    tokens_sampled: int


class Transcript(_Out):
    """Chat sent as a plain transcript ("role: content" lines, then "assistant:"): the model has no chat template.
    `stop` holds the role lines that end a reply, added to the request's own stop strings."""

    stop: list[str]


class PowerSampling(_Out):
    """The extension object of every generation response (formats.power_sampling)."""

    transcript: Transcript | None = None  # chat to a model without a chat template; absent otherwise

    method: str
    seed: int
    config: dict[str, Any]  # SamplerConfig.resolved()
    acceptance_rate: float | None  # null where no MH proposal was made
    proposals: int
    accepted: int
    tokens_sampled: int
    wall_seconds: float
    chains: list[ChainStats]
    ignored: list[str]


class CompletionLogprobs(_Out):
    """Per token (an echoed prompt's first, then generated ones): null log p and top_logprobs for an echoed prompt's
    first token; top_logprobs null unless logprobs >= 1."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(_Out):
    text: str
    index: int
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    power_sampling: PowerSampling


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob]
    refusal: None


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChatLogprobs | None


class ChatResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    power_sampling: PowerSampling


class CompletionChunkChoice(_Out):
    text: str
    index: int
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None


class _Chunk(_Out):
    """What every `data:` event of a stream carries (sse.py): the last choice chunk carries power_sampling, and the
    usage chunk (stream_options.include_usage) has no choices."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    power_sampling: PowerSampling | None = None


class CompletionChunk(_Chunk):
    """One `data:` event of a streamed completion."""

    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice]


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChatLogprobs | None


class ChatChunk(_Chunk):
    """One `data:` event of a streamed chat completion; the first delta of each choice carries the role."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizerInfo(_Out):
    """GET /tokenizer_info: what lm-evaluation-harness's remote tokenizer reads (vLLM's endpoint)."""

    eos_token: str | None
    model_max_length: int | None
    vocab_size: int | None


class Tokenized(_Out):
    """POST /tokenize (vLLM's shape)."""

    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: None


class Detokenized(_Out):
    """POST /detokenize (vLLM's shape)."""

    prompt: str


class Health(BaseModel):
    """{"status": "ok"}; with the API key (or without a key) also the model, the backend and the engine's state."""

    status: Literal["ok"]
    model: str | None = None
    backend: str | None = None
    chains_in_flight: int | None = None
    requests_waiting: int | None = None
    requests_running: int | None = None
    calls_in_flight: int | None = None  # scoring and ranking calls waiting or running (they run in steps)
    scheduler_runs: int | None = None
    peak_chains: int | None = None
    engine_alive: bool | None = None


_ERRORS = {
    401: "no valid API key",
    403: "a foreign Host or Origin",
    500: "the engine failed",
    503: "too many connections or requests at once (Retry-After)",
}
_BODY_ERRORS = {
    400: "a bad field or a limit (param names the field)",
    408: "the body did not arrive in time",
    413: "the body is too large",
    415: "the body is not application/json",
    499: "the client closed the request",
}
_GENERATION_ERRORS = {
    **_BODY_ERRORS,
    429: "the server is full (Retry-After)",
    503: "stopped by a shutdown, or too many connections or requests at once (Retry-After)",
    504: "past the request timeout",
}


def responses(
    model: type[BaseModel], generation: bool = False, chunk: type[BaseModel] | None = None, body: bool = False
) -> dict[int | str, dict]:
    """The `responses` of a route: `model` for 200 (and server-sent `chunk`s with `stream: true`), the error body
    for each error status it can answer (`body`: a route that reads a JSON body)."""
    errors = {**_ERRORS, **(_GENERATION_ERRORS if generation else _BODY_ERRORS if body else {})}
    ok: dict[str, Any] = {"model": model}
    if chunk is not None:
        ok["content"] = {"text/event-stream": {"schema": sse_event(chunk)}}
    return {200: ok, **{s: {"model": ErrorResponse, "description": d} for s, d in errors.items()}}


_STREAM = (
    "with stream: true, server-sent events: ': keep-alive' comments while the chains run (base and "
    "low-temp without logprobs: their text chunks as it is drawn; and, with "
    "stream_options.include_trace, one ': trace {{json}}' comment per chain trace event: the events of "
    "`powersample sample --trace`, their 'chain' the choice index), then 'data: {{json}}' events, each a "
    "{chunk} (components), or one ErrorResponse when the request fails after the stream has started, then "
    "'data: [DONE]'"
)


def sse_event(chunk: type[BaseModel]) -> dict:
    """One server-sent event, as the OpenAPI specification's generic text/event-stream schema describes it (OpenAPI
    3.1 has no itemSchema: tools read `schema` as one event's): its `data` is JSON text, a `chunk` or an
    ErrorResponse, or the literal [DONE]."""
    return {
        "type": "object",
        "description": _STREAM.format(chunk=chunk.__name__),
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "contentMediaType": "application/json"},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
    }


def request_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` declaring `model` as the route's JSON body."""
    ref = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def openapi(app: FastAPI, limits: Limits, vocab_size: int | None = None) -> dict:
    """The app's OpenAPI document, with the request-body models added to its components and each field's range
    under this server's `limits` and token ids under its `vocab_size` (built once), so that a body the document
    accepts is served. One rule is the handlers' alone: the budget of a request (prompts x n x the members of a chain,
    times max_tokens; bon's token budget), a product of fields that JSON Schema cannot state: over it, a 400 whose
    message starts "the request asks for" or "bon's budget" (`protocol.check_budget`). So is power-pt's ladder (as
    many powers in `alphas` as `replicas`, increasing, ending at `alpha`; `alpha_min` below `alpha`:
    samplers/tempering.check_ladder), and a prompt longer than the model's context (400 context_length_exceeded:
    tokens, not characters)."""
    if app.openapi_schema is None:
        doc = get_openapi(
            title=app.title,
            version=app.version,
            routes=app.routes,
            description="power sampling p(x)^alpha behind the OpenAI API",
        )
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in (CompletionBody, ChatBody, TokenizeBody, DetokenizeBody):
            body = model.model_json_schema(ref_template=_REF)
            components.update(body.pop("$defs", {}))
            components[model.__name__] = _bounded(body, limits, model is CompletionBody, vocab_size)
        _joined(components, vocab_size)
        for chunk in (CompletionChunk, ChatChunk):
            out = chunk.model_json_schema(ref_template=_REF, mode="serialization")
            components.update({k: v for k, v in out.pop("$defs", {}).items() if k not in components})
            components[chunk.__name__] = out
        app.openapi_schema = doc
    return app.openapi_schema


def field_ranges(limits: Limits) -> dict[str, dict]:
    """JSON-schema constraints of the request fields the handlers range-check (config.py, protocol.check_limits):
    every sampler field's from its declaration (SamplerConfig's Spec), under this server's caps."""
    lo, caps = SCALE_RANGE[0], field_caps(limits)
    return {
        "max_tokens": {"minimum": 1, "maximum": limits.max_tokens},
        "max_completion_tokens": {"minimum": 1, "maximum": limits.max_tokens},
        "n": {"minimum": 1, "maximum": limits.max_n},
        "seed": {"minimum": 0},
        "temperature": {"anyOf": [{"const": 0}, {"minimum": lo, "maximum": 2}]},  # 0 = greedy
        "method": {"enum": list(METHODS)},
        **{name: sampler_range(name, caps.get(name)) for name in SAMPLER_FIELDS if name != "method"},
        "logprobs": {"minimum": 0, "maximum": 5},
        "top_logprobs": {"minimum": 0, "maximum": 20},
    }


def sampler_range(name: str, cap: int | None = None) -> dict:
    """One sampler field's range in JSON Schema's terms: its declared bounds (exclusive where open), the server's
    `cap` in place of its upper bound when there is one, and below 2^62 for an integer (SamplerConfig's limit)."""
    spec, out = SPECS[name], {}
    if spec.pattern is not None:
        out["pattern"] = spec.pattern
    if spec.lo is not None:
        out["exclusiveMinimum" if spec.lo_open else "minimum"] = spec.lo
    if cap is not None:
        out["maximum"] = cap
    elif isinstance(spec.hi, (int, float)):
        out["exclusiveMaximum" if spec.hi_open else "maximum"] = spec.hi
    elif TYPES[name] is int:
        out["maximum"] = MAX_INT - 1
    return out


@functools.cache
def text_pattern() -> str:
    """A string with some text: a character that is not whitespace as Python's str.strip() sees it (which the
    handlers use: it counts U+001C..U+001F and U+0085 as space, where a JSON Schema pattern's \\s does not)."""
    spaces = "".join(f"\\u{ord(c):04x}" for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
    return f"[^{spaces}]"


def _ids(items: dict, vocab_size: int | None) -> None:
    """Token ids, in place: 0 .. vocab_size - 1 (a server whose backend gives no vocabulary refuses every id)."""
    items["minimum"] = 0
    if vocab_size is not None:
        items["maximum"] = vocab_size - 1


def _bound_prompt(prompt: dict, limits: Limits, vocab_size: int | None = None) -> None:
    """Every prompt holds some text (a non-space character) or at least one id in the vocabulary; a list holds
    1..max_prompts of them."""
    for branch in prompt.get("anyOf", [prompt]):
        if branch.get("type") == "string":
            branch["pattern"] = text_pattern()
            continue
        items = branch.get("items", {})
        if items.get("type") == "string":  # list[str]
            items["pattern"] = text_pattern()
        elif items.get("type") == "integer":  # one id prompt: 1 or more ids
            _ids(items, vocab_size)
            branch["minItems"] = 1
            continue
        else:  # list[list[int]]
            items.update(minItems=1)
            _ids(items.get("items", {}), vocab_size)
        branch.update(minItems=1, maxItems=limits.max_prompts)


def _joined(components: dict, vocab_size: int | None) -> None:
    """The rules that join fields, in JSON Schema's terms (protocol.check_limits and the handlers give their 400s):
    stream_options only with stream: true; max_tokens 0 only with echo: true and no stream (completions); chat needs
    a message with some text; /tokenize takes exactly one of prompt and messages; token ids lie in the vocabulary."""
    streamed = {
        "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
        "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
    }
    scoring = {
        "if": {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}},
        "then": {"required": ["echo"], "properties": {"echo": {"const": True}, "stream": {"enum": [False, None]}}},
    }
    components["CompletionBody"]["allOf"] = [streamed, scoring]
    components["ChatBody"]["allOf"] = [streamed]
    text = {"type": "string", "pattern": text_pattern()}
    some_text = {
        "required": ["content"],
        "properties": {
            "content": {
                "anyOf": [text, {"type": "array", "contains": {"required": ["text"], "properties": {"text": text}}}]
            }
        },
    }
    components["ChatBody"]["properties"]["messages"]["contains"] = some_text
    one_of = [
        {"required": [given], "properties": {given: {"not": {"type": "null"}}, other: {"type": "null"}}}
        for given, other in (("prompt", "messages"), ("messages", "prompt"))
    ]
    components["TokenizeBody"]["oneOf"] = one_of
    _ids(components["DetokenizeBody"]["properties"]["tokens"]["items"], vocab_size)


def _nullable(prop: dict) -> None:
    """prop, in place, as anyOf [prop, null] (its title and default stay outside)."""
    meta = {k: prop.pop(k) for k in ("title", "default", "description") if k in prop}
    inner = dict(prop)
    prop.clear()
    prop.update(
        anyOf=inner.pop("anyOf") + [{"type": "null"}] if "anyOf" in inner else [inner, {"type": "null"}], **meta
    )


def _bounded(body: dict, limits: Limits, completions: bool = False, vocab_size: int | None = None) -> dict:
    """`body`'s schema with field_ranges applied to the non-null branch of each field (completions: max_tokens may be
    0, with echo, and the prompt's forms are bounded)."""
    ranges = field_ranges(limits)
    if completions:
        ranges["max_tokens"] = {**ranges["max_tokens"], "minimum": 0}
    required = set(body.get("required", []))
    for name, prop in body.get("properties", {}).items():
        if name not in required and not any(b.get("type") == "null" for b in prop.get("anyOf", [])):
            _nullable(prop)  # null takes the default (protocol._Strict._null_is_default)
    if completions:
        _bound_prompt(body["properties"]["prompt"], limits, vocab_size)
    for branch in body.get("properties", {}).get("stop", {}).get("anyOf", []):  # 1..max_stop non-empty strings
        if branch.get("type") == "string":
            branch["minLength"] = 1
        elif branch.get("type") == "array":
            branch.update(maxItems=limits.max_stop, items={"type": "string", "minLength": 1})
    for name, prop in body.get("properties", {}).items():
        extra = ranges.get(name)
        if extra is None:
            continue
        branches = prop.get("anyOf", [prop])
        for branch in branches:
            kind = branch.get("type")
            if (
                kind in ("integer", "number")
                and "enum" not in extra
                or kind == "string"
                and extra.keys() & {"enum", "pattern"}
            ):
                branch.update(extra)
    return body
