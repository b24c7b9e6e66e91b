"""The two generation endpoints' answers, built as the models of `schema.py` (those /openapi.json describes): a
whole response, or the chunks of a stream (`sse.py` frames them).

A model's fields are sent when they were set: `dump` leaves out only what was never given (a transcript, a
chunk's usage without include_usage, the power_sampling of every chunk but the last), and keeps explicit nulls.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
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
    return schema.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                        total_tokens=prompt_tokens + completion)  # fmt: skip


def power_sampling(config: SamplerConfig, seed: int, records: Sequence[SampleRecord], ignored: Sequence[str],
                   transcript: Sequence[str] = ()) -> schema.PowerSampling:  # fmt: skip
    """The extension object: what ran, and how the chains went; with a `transcript` (chat sent as plain "role:
    content" lines, to a model without a chat template), the role lines that ended each reply."""
    proposals, accepted = sum(r.proposals for r in records), sum(r.accepted for r in records)
    chains = [schema.ChainStats(index=j, logp=r.logp, finish_reason=r.finish_reason, proposals=r.proposals,
                                accepted=r.accepted, acceptance_rate=r.acceptance_rate,
                                tokens_sampled=r.tokens_generated) for j, r in enumerate(records)]  # fmt: skip
    extra = {"transcript": schema.Transcript(stop=list(transcript))} if transcript else {}
    return schema.PowerSampling(
        **extra, method=config.method, seed=seed, config=registry.resolved(config),
        acceptance_rate=registry.acceptance_rate(config.method, proposals, accepted), proposals=proposals,
        accepted=accepted, tokens_sampled=sum(r.tokens_generated for r in records),
        wall_seconds=max((r.wall_seconds for r in records), default=0.0), chains=chains, ignored=list(ignored),
    )  # fmt: skip


def completion_logprobs(out: Output, top: int) -> schema.CompletionLogprobs:
    """OpenAI's legacy completions log-probs: per token its piece, log p, the `top` likeliest alternatives (plus the
    token itself when it is not among them, as OpenAI does) and its character offset in the choice's text."""
    tops = None
    if top > 0:
        tops = [None if alts is None else {**dict(alts), **({} if piece in dict(alts) else {piece: lp})}
                for piece, lp, alts in zip(out.pieces, out.logp, out.top)]  # fmt: skip
    return schema.CompletionLogprobs(tokens=list(out.pieces), token_logprobs=list(out.logp), top_logprobs=tops,
                                     text_offset=list(out.offsets))  # fmt: skip


def chat_logprobs(out: Output, top: int) -> schema.ChatLogprobs:
    """OpenAI's chat log-probs: per token its piece, log p and bytes, and the `top` likeliest alternatives."""

    def entry(piece: str, lp: float) -> dict:
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

    alternatives = out.top if top > 0 else ((),) * len(out.pieces)
    content = [schema.TokenLogprob(**entry(piece, lp), top_logprobs=[entry(p, a) for p, a in alts or ()])
               for piece, lp, alts in zip(out.pieces, out.logp, alternatives)]  # fmt: skip
    return schema.ChatLogprobs(content=content, refusal=None)


class Completions:
    """/v1/completions: a choice is its text; a stream's chunks carry text."""

    kind = "text_completion"
    chunk_kind = "text_completion"
    response, chunk = schema.CompletionResponse, schema.CompletionChunk

    @staticmethod
    def choice(i: int, out: Output, logprobs: int | None) -> schema.CompletionChoice:
        lp = completion_logprobs(out, logprobs) if logprobs is not None else None
        return schema.CompletionChoice(text=out.text, index=i, finish_reason=out.finish_reason, logprobs=lp)

    @staticmethod
    def delta(i: int, text: str | None, logprobs: BaseModel | None = None,
              finish: Finish = None) -> schema.CompletionChunkChoice:  # fmt: skip
        return schema.CompletionChunkChoice(index=i, text=text or "", logprobs=logprobs, finish_reason=finish)

    @staticmethod
    def opening(i: int) -> list[BaseModel]:
        return []

    logprobs = staticmethod(completion_logprobs)


class Chat:
    """/v1/chat/completions: a choice is an assistant message; a stream's first chunk of a choice carries its role."""

    kind = "chat.completion"
    chunk_kind = "chat.completion.chunk"
    response, chunk = schema.ChatResponse, schema.ChatChunk

    @staticmethod
    def choice(i: int, out: Output, logprobs: int | None) -> schema.ChatChoice:
        message = schema.AssistantMessage(role="assistant", content=out.text, refusal=None)
        lp = chat_logprobs(out, logprobs) if logprobs is not None else None
        return schema.ChatChoice(index=i, message=message, finish_reason=out.finish_reason, logprobs=lp)

    @staticmethod
    def delta(i: int, text: str | None, logprobs: BaseModel | None = None,
              finish: Finish = None) -> schema.ChatChunkChoice:  # fmt: skip
        delta = schema.ChatDelta() if text is None else schema.ChatDelta(content=text)
        return schema.ChatChunkChoice(index=i, delta=delta, logprobs=logprobs, finish_reason=finish)

    @staticmethod
    def opening(i: int) -> list[BaseModel]:
        role = schema.ChatDelta(role="assistant", content="")
        return [schema.ChatChunkChoice(index=i, delta=role, logprobs=None, finish_reason=None)]

    logprobs = staticmethod(chat_logprobs)


Format = type[Completions] | type[Chat]


def choice_chunks(fmt: Format, outputs: Sequence[Output], logprobs: int | None, opened: bool) -> list[BaseModel]:
    """A stream's last choice chunks: per choice, its opening (unless `opened`: sent before the text), the text not
    sent yet (with its log-probs when asked for), then its finish_reason."""
    choices: list[BaseModel] = []
    for i, out in enumerate(outputs):
        choices += [] if opened else fmt.opening(i)
        if out.text:
            choices.append(fmt.delta(i, out.text, fmt.logprobs(out, logprobs) if logprobs is not None else None))
        choices.append(fmt.delta(i, None, finish=out.finish_reason))
    return choices
