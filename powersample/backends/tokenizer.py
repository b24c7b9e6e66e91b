"""Prompt formatting: the plain transcript of a chat for models without a template (every engine), and prompt
encoding with a Hugging Face tokenizer, shared by the engines that use one (hf, vllm)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from powersample.core.types import Tokens


def encode_prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> Tokens:
    """Prompt ids; with `chat` and a chat template, the prompt is one user message plus the assistant header."""
    if chat and getattr(tokenizer, "chat_template", None):
        return encode_message_ids(tokenizer, [{"role": "user", "content": prompt}])
    ids = tokenizer(prompt)["input_ids"]
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]  # an empty prompt: sample unconditionally from BOS
    return tuple(int(t) for t in ids)


def encode_message_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> Tokens:
    """Ids of a chat conversation ({"role", "content"} dicts) plus the assistant header, through the chat template;
    a tokenizer without one gets the plain transcript "role: content" per line, then "assistant:"."""
    if not getattr(tokenizer, "chat_template", None):
        return encode_prompt_ids(tokenizer, plain_transcript(messages), chat=False)
    template = tokenizer.apply_chat_template
    ids = template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return tuple(int(t) for t in ids)


def plain_transcript(messages: Sequence[Mapping[str, str]]) -> str:
    """A chat conversation as plain text for models without a chat template: "role: content" per line, then
    "assistant:"."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def transcript_stops(messages: Sequence[Mapping[str, str]]) -> tuple[str, ...]:
    """What ends the assistant's turn in a plain transcript: a line that starts another turn, "\n<role>:" for each
    role of the transcript (the user's and the assistant's always), so the model does not write the next turn."""
    roles = dict.fromkeys([*(m["role"] for m in messages), "user", "assistant"])
    return tuple(f"\n{role}:" for role in roles)
