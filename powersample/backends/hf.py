"""`hf`: a Hugging Face transformers causal LM behind the backend seam (`base.py`).

Per new token, `extend` runs ONE forward pass and derives both distributions from its logits:

    log p = log_softmax(logits)                        # base: temperature 1, no truncation (float64)
    log q = proposal_logprobs(log p, proposal)         # proposal: temperature, top-k, top-p, renormalized
    token = draw(log q, request.rng)                   # all randomness comes from the chain's own generator

Each `slot` owns a `DynamicCache` and the ids it holds. A request crops that cache to its longest common prefix with
the request's context and prefills only the rest, so an MH step that resamples from position i re-reads no tokens
before i. Correctness never depends on the slot: a foreign slot only costs a longer prefill.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from powersample.backends.base import Continuation, ExtendRequest, Proposal, Tokens, draw, proposal_logprobs
from powersample.backends.embedded import embedded_model_dir, quiet_loading
from powersample.errors import PowerSampleError

DTYPES = {  # accepted --dtype spellings; "auto" = whatever the checkpoint says
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "auto": "auto",
}  # fmt: skip
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"; anything else is only a path


@dataclass
class _Slot:
    """One chain's KV cache and the token ids it holds, in order."""

    cache: DynamicCache
    ids: list[int] = field(default_factory=list)


class HFBackend:
    """Sampling and scoring with a transformers causal LM, one KV cache per slot. See the module docstring."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.device
        self.eos_ids = _eos_ids(model, tokenizer)
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)
        self._slots: dict[int, _Slot] = {}
        self._forward_args = _forward_arguments(model)
        self.prefilled_tokens = 0  # context tokens fed to the model by extend(); tests check cache reuse with it

    @classmethod
    def load(cls, model: str | None, *, device: str | None = None, dtype: str | None = None) -> "HFBackend":
        """Load `model`: None = the embedded SmolLM2, a local folder, a .gguf file, or a hub id.

        device None = cuda when available, else cpu; dtype None = float32 on cpu, bfloat16 on cuda. Every failure is
        a one-line PowerSampleError.
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = _parse_dtype(dtype, device)
        folder, gguf_file = _resolve_model(model)
        is_hub = model is not None and not Path(model).expanduser().exists()
        try:
            with quiet_loading():
                lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch_dtype)
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
                lm = lm.to(device)
        except Exception as e:  # noqa: BLE001 - every loader failure becomes one line, never a traceback
            what = f"unknown model path or hub id {model!r}" if is_hub else f"cannot load model {model or folder}"
            raise PowerSampleError(f"{what}: {_one_line(e)}") from None
        return cls(lm, tokenizer)

    def encode(self, prompt: str, chat: bool = True) -> Tokens:
        """Prompt ids; with `chat` and a chat template, the prompt is one user message plus the assistant header."""
        if chat and getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            template = self.tokenizer.apply_chat_template
            ids = template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]  # an empty prompt: sample unconditionally from BOS
        return tuple(int(t) for t in ids)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    @torch.inference_mode()
    def extend(self, requests: Sequence[ExtendRequest], proposal: Proposal) -> list[Continuation]:
        """One continuation per request, in order (batch 1 for now: one request after another)."""
        return [self._extend_one(r, proposal) for r in requests]

    @torch.inference_mode()
    def score(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """log p of each continuation token, from one fresh forward over context + continuation (no cache used)."""
        if not continuation:
            return ()
        if not context:
            raise PowerSampleError("cannot score after an empty context: the prompt encodes to no tokens")
        self._check_length(len(context), len(continuation))
        ids = torch.tensor([list(context) + list(continuation)], device=self.device)
        keep = {"logits_to_keep": len(continuation) + 1} if self._forward_args["logits_to_keep"] else {}
        logits = self.model(input_ids=ids, use_cache=False, **keep).logits[0, -len(continuation) - 1 : -1]  # (T, V)
        logp = torch.log_softmax(logits.double(), dim=-1)
        picked = logp.gather(-1, torch.tensor(list(continuation), device=self.device)[:, None])[:, 0]
        return tuple(picked.cpu().tolist())

    def _extend_one(self, request: ExtendRequest, proposal: Proposal) -> Continuation:
        """Draw up to max_tokens tokens from q after request.context, stopping right after an EOS."""
        self._check_length(len(request.context), request.max_tokens)
        slot = self._slot(request.slot)
        logits = self._prefill(slot, request.context)
        tokens: list[int] = []
        base_logp: list[float] = []
        proposal_logq: list[float] = []
        while True:
            logp = torch.log_softmax(logits.double(), dim=-1).cpu().numpy()  # (V,)
            logq = proposal_logprobs(logp, proposal)
            token = draw(logq, request.rng)
            tokens.append(token)
            base_logp.append(float(logp[token]))
            proposal_logq.append(float(logq[token]))
            if token in self.eos_ids or len(tokens) == request.max_tokens:
                break
            logits = self._forward(slot, [token])
        return Continuation(tuple(tokens), tuple(base_logp), tuple(proposal_logq))

    def _slot(self, index: int) -> _Slot:
        if index not in self._slots:
            self._slots[index] = _Slot(self._new_cache())
        return self._slots[index]

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def _prefill(self, slot: _Slot, context: Sequence[int]) -> torch.Tensor:
        """Crop the slot's cache to its common prefix with `context`, feed the rest; next-token logits (V,).

        At least the last context token is always fed again, since the cache keeps no logits.
        """
        if not context:
            raise PowerSampleError("cannot extend an empty context: the prompt encodes to no tokens")
        keep = min(_common_prefix(slot.ids, context), len(context) - 1)
        self._crop(slot, keep)
        missing = list(context[keep:])
        self.prefilled_tokens += len(missing)
        return self._forward(slot, missing)

    def _crop(self, slot: _Slot, keep: int) -> None:
        """Drop all but the first `keep` cached tokens (a fresh cache when none stay or the cache can't crop)."""
        drop = len(slot.ids) - keep
        if drop == 0:
            return
        if keep > 0:
            try:
                slot.cache.crop(-drop)  # transformers 5.x: a negative count of tokens to remove
            except RuntimeError:  # e.g. a sliding-window layer past its window cannot roll back
                keep = 0
        if keep == 0:
            slot.cache = self._new_cache()
        del slot.ids[keep:]

    def _forward(self, slot: _Slot, ids: list[int]) -> torch.Tensor:
        """Feed `ids` after what the slot's cache holds; logits (V,) for the token after the last one."""
        input_ids = torch.tensor([ids], device=self.device)  # (1, T)
        args = self._forward_args
        kwargs = {args["cache"]: slot.cache, **({"logits_to_keep": 1} if args["logits_to_keep"] else {})}
        try:
            out = self.model(input_ids=input_ids, use_cache=True, **kwargs)
        except BaseException:  # an interrupted forward may have grown only some layers: start this slot afresh
            slot.cache, slot.ids = self._new_cache(), []
            raise
        slot.ids.extend(ids)
        return out.logits[0, -1]

    def _check_length(self, context: int, new: int) -> None:
        if self.context_length is not None and context + new > self.context_length:
            raise PowerSampleError(
                f"{context} context tokens + {new} new tokens exceed the model's context length ({self.context_length})"
            )


def _parse_dtype(dtype: str | None, device: str) -> torch.dtype | str:
    """The torch dtype for a --dtype spelling; None = float32 on cpu, bfloat16 elsewhere."""
    if dtype is None:
        return torch.float32 if device.startswith("cpu") else torch.bfloat16
    try:
        return DTYPES[dtype.lower()]
    except (KeyError, AttributeError):
        raise PowerSampleError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def _resolve_model(model: str | None) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for from_pretrained."""
    if model is None:
        return str(embedded_model_dir()), None
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise PowerSampleError(f"{model} is neither a model folder nor a .gguf file")
    if not HUB_ID.match(model) or model.endswith(".gguf"):
        raise PowerSampleError(f"unknown model path or hub id {model!r}: no such file or folder")
    return model, None  # a hub id; load() turns a failed download into a one-line error


def _forward_arguments(model: Any) -> dict[str, Any]:
    """What model.forward accepts: its KV-cache keyword (`cache` in newer transformers 5.x, else `past_key_values`),
    and whether it takes `logits_to_keep` (which spares computing logits for positions we never read)."""
    params = inspect.signature(model.forward).parameters
    return {"cache": "cache" if "cache" in params else "past_key_values", "logits_to_keep": "logits_to_keep" in params}


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from the generation config (an int or a list) plus the tokenizer's EOS."""
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids if i is not None)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
