"""The two generation endpoints' answers, built as the models of `schema.py` (those /openapi.json describes): a
whole response, or the chunks of a stream (`sse.py` frames them).

A model's fields are sent when they were set: `dump` leaves out only what was never given (a transcript, a
chunk's usage without include_usage, the power_sampling of every chunk but the last), and keeps explicit nulls.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from powersample.api import SampleRecord
from powersample.config import SamplerConfig
from powersample.samplers import registry
from powersample.server import schema
from powersample.server.protocol import Output, json_bytes

Finish = str | None  # a chunk's finish_reason: None until the choice's last chunk


def dump(model: BaseModel) -> bytes:
    """A model as JSON, the fields it was given only (non-finite numbers as null: `protocol.json_bytes`)."""
    return json_bytes(model.model_dump(exclude_unset=True))


def head(kind: str, model: str) -> dict[str, Any]:
    """id, object, created and model of a response (chat: kind "chat.completion")."""
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, outputs: Sequence[Output]) -> schema.Usage:
    completion = sum(o.completion_tokens for o in outputs)
    return schema.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
    )


def power_sampling(
    config: SamplerConfig,
    seed: int,
    records: Sequence[SampleRecord],
    ignored: Sequence[str],
    transcript: Sequence[str] = (),
) -> schema.PowerSampling:
    """The extension object: what ran, and how the chains went; with a `transcript` (chat sent as plain "role:
    content" lines, to a model without a chat template), the role lines that ended each reply."""
    proposals, accepted = sum(r.proposals for r in records), sum(r.accepted for r in records)
    chains = [
        schema.ChainStats(
            index=j,
            logp=r.logp,
            finish_reason=r.finish_reason,
            proposals=r.proposals,
            accepted=r.accepted,
            acceptance_rate=r.acceptance_rate,
            tokens_sampled=r.tokens_generated,
        )
        for j, r in enumerate(records)
    ]
    extra = {"transcript": schema.Transcript(stop=list(transcript))} if transcript else {}
    return schema.PowerSampling(
        **extra,
        method=config.method,
        seed=seed,
        config=registry.resolved(config),
        acceptance_rate=registry.acceptance_rate(config.method, proposals, accepted),
        proposals=proposals,
        accepted=accepted,
        tokens_sampled=sum(r.tokens_generated for r in records),
        wall_seconds=max((r.wall_seconds for r in records), default=0.0),
        chains=chains,
        ignored=list(ignored),
    )


def completion_logprobs(out: Output, top: int) -> schema.CompletionLogprobs:
    """OpenAI's legacy completions log-probs: per token its piece, log p, the `top` likeliest alternatives (plus the
    token itself when it is not among them, as OpenAI does) and its character offset in the choice's text."""
    tops = None
    if top > 0:
        tops = [
            None if alts is None else {**dict(alts), **({} if piece in dict(alts) else {piece: lp})}
            for piece, lp, alts in zip(out.pieces, out.logp, out.top)
        ]
    return schema.CompletionLogprobs(
        tokens=list(out.pieces), token_logprobs=list(out.logp), top_logprobs=tops, text_offset=list(out.offsets)
    )


def chat_logprobs(out: Output, top: int) -> schema.ChatLogprobs:
    """OpenAI's chat log-probs: per token its piece, log p and bytes, and the `top` likeliest alternatives."""

    def entry(piece: str, lp: float) -> dict:
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

    alternatives = out.top if top > 0 else ((),) * len(out.pieces)
    content = [
        schema.TokenLogprob(**entry(piece, lp), top_logprobs=[entry(p, a) for p, a in alts or ()])
        for piece, lp, alts in zip(out.pieces, out.logp, alternatives)
    ]
    return schema.ChatLogprobs(content=content, refusal=None)


@dataclass(frozen=True)
class Format:
    """How one endpoint writes a choice: whole (`choice`), or as a stream's chunk choices (`delta`)."""

    kind: str  # the response's `object`
    chunk_kind: str  # a stream chunk's `object`
    response: type[BaseModel]
    chunk: type[BaseModel]
    logprobs: Callable[[Output, int], BaseModel]  # (output, alternatives per token) -> its log-probs
    choice: Callable[[int, Output, Any], BaseModel]  # (index, output, its log-probs or None) -> a choice
    delta: Callable[[int, str | None, Any, Finish], BaseModel]  # (index, text, log-probs, finish) -> a chunk choice
    role: bool = False  # a choice's first chunk carries the role (chat)


COMPLETIONS = Format(
    "text_completion",
    "text_completion",
    schema.CompletionResponse,
    schema.CompletionChunk,
    completion_logprobs,
    lambda i, out, lp: schema.CompletionChoice(text=out.text, index=i, finish_reason=out.finish_reason, logprobs=lp),
    lambda i, text, lp, end: schema.CompletionChunkChoice(index=i, text=text or "", logprobs=lp, finish_reason=end),
)
CHAT = Format(
    "chat.completion",
    "chat.completion.chunk",
    schema.ChatResponse,
    schema.ChatChunk,
    chat_logprobs,
    lambda i, out, lp: schema.ChatChoice(
        index=i,
        message=schema.AssistantMessage(role="assistant", content=out.text, refusal=None),
        finish_reason=out.finish_reason,
        logprobs=lp,
    ),
    lambda i, text, lp, end: schema.ChatChunkChoice(
        index=i, delta=schema.ChatDelta(**_content(text)), logprobs=lp, finish_reason=end
    ),
    role=True,
)


def _content(text: str | None) -> dict:
    return {} if text is None else {"content": text}


def choice(fmt: Format, i: int, out: Output, logprobs: int | None) -> BaseModel:
    """Choice i of a whole response, with its log-probs when asked for."""
    return fmt.choice(i, out, fmt.logprobs(out, logprobs) if logprobs is not None else None)


def opening(fmt: Format, i: int) -> list[BaseModel]:
    """What a stream sends of choice i before its text: chat, the role; completions, nothing."""
    role = schema.ChatDelta(role="assistant", content="")
    return [schema.ChatChunkChoice(index=i, delta=role, logprobs=None, finish_reason=None)] if fmt.role else []


def choice_chunks(fmt: Format, outputs: Sequence[Output], logprobs: int | None, opened: bool) -> list[BaseModel]:
    """A stream's last choice chunks: per choice, its opening (unless `opened`: sent before the text), the text not
    sent yet (with its log-probs when asked for), then its finish_reason."""
    choices: list[BaseModel] = []
    for i, out in enumerate(outputs):
        choices += [] if opened else opening(fmt, i)
        if out.text:
            choices.append(fmt.delta(i, out.text, fmt.logprobs(out, logprobs) if logprobs is not None else None, None))
        choices.append(fmt.delta(i, None, None, out.finish_reason))
    return choices
