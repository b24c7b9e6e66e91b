"""The lm-evaluation-harness model `powersample`: lm-eval's tasks and graders, with power sampling in-process.

Importing this module registers the model (lm-eval 0.4.13 has no entry points: `@register_model` registers a class
only in the process that imports it); `powersample lm-eval ARGS` imports it, then hands ARGS unchanged to lm-eval's
own command line (`run_cli`).

- `--model_args` (`parse_model_args`): the backend's options (BackendSpec's fields; `backend` names the engine),
  `seed`, `chat`, and every SamplerConfig field, each checked against its one declaration; an unknown or bad one is
  a one-line error naming it. lm-eval's `--batch_size`, `--max_batch_size` and `--device` (which it passes to every
  model, the device as cuda:0 by default) are ignored: all requests of a call form one batch, and the device is
  model_args' `device`.
- `generate_until`: every request of a call is a job of one engine run (api.sample_many), so the chains of all the
  problems decode together. A request's generation kwargs are read as the server reads a request's fields: `until`
  (with the model's EOS text, which lm-eval adds) are stop strings: the chain runs to EOS or its budget, then its text
  is cut before the earliest one (api.first_stop, the server's cut); `max_gen_toks` is max_new_tokens; `temperature`
  applies to the plain methods only (registry.plain_temperature), and is lm-eval's 0 (greedy) when absent unless
  `do_sample` is true; a SamplerConfig field overrides the model_args' one, and `seed` the model_args' seed.
  Identical requests (a task's `repeats`) are chains 0, 1, ... of one job, so they differ.
- `loglikelihood` and `loglikelihood_rolling`: lm-eval's own token boundaries (TemplateLM's, which
  `local-completions` gets through the server's /tokenize: the backend's plain `encode`), each distinct pair ranked
  once by the backend (`Ranking.rank`, one forward: the continuation's log p, and whether every token of it is the
  likeliest), pairs that share a context one after another (a backend reuses the prefix it scored last).

A backend whose `encode` ignores text (the toy, whose prompt is ignored) samples from its start whatever the prompt,
as `powersample sample` does; for scoring, its context is ignored too and a continuation is spelled in its
vocabulary (longest token first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import typing
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences
from tqdm import tqdm

from powersample.api import chain_seeds, first_stop, sample_many, sampling_bar
from powersample.backends import Backend, BackendSpec
from powersample.backends.base import Ranking, Vocabulary, capability
from powersample.config import OPTIONAL, SPECS, TYPES, SamplerConfig, without_none
from powersample.core.types import Proposal, Tokens
from powersample.errors import PowerSampleError, one_line
from powersample.io import notice_once
from powersample.samplers import registry

MODEL_NAME = "powersample"  # lm-eval's --model
DEFAULT_SEED = 1234  # lm-eval's own default seed: what `local-completions` sends the server
_SPEC_KINDS = {name: without_none(hint) for name, hint in typing.get_type_hints(BackendSpec).items()}
BACKEND_ARGS = {"backend": "name", **{n: n for n in _SPEC_KINDS if n not in ("name", "reuse_cache", "quiet")}}
RUN_KINDS: dict[str, type] = {"seed": int, "chat": bool}
KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
DEBUG_FLAG = "--verbosity"  # lm-eval's; with it, lm-eval's own errors keep their traceback
TEXT_PROBE = "Hello."  # any text: a backend that encodes it to no ids ignores its prompts (the toy)

Pair = tuple[Tokens, Tokens]  # (context ids, continuation ids)


@dataclass(frozen=True)
class Settings:
    """What --model_args set."""

    spec: BackendSpec  # the backend to load
    config: SamplerConfig  # every request's config, before its generation kwargs
    seed: int = DEFAULT_SEED  # every request's seed, unless its generation kwargs give one
    chat: bool = False  # generate prompts go through the model's chat template (as one user message)


def parse_model_args(args: Mapping[str, Any]) -> Settings:
    """--model_args (as lm-eval parsed them: "4" is 4, "true" True, "none" None), checked: a one-line error names
    the first unknown or bad argument."""
    known = (*BACKEND_ARGS, *RUN_KINDS, *SPECS)
    unknown = [name for name in args if name not in known]
    if unknown:
        raise PowerSampleError(f"model_args: unknown argument {unknown[0]!r}; known: {', '.join(known)}")
    with _about("model_args"):
        spec = BackendSpec(
            **{BACKEND_ARGS[k]: coerce(k, v, _SPEC_KINDS[BACKEND_ARGS[k]], True) for k, v in _of(args, BACKEND_ARGS)}
        )
        config = SamplerConfig(**{k: coerce(k, v, TYPES[k], k in OPTIONAL) for k, v in _of(args, SPECS)})
        registry.check(config)
        run = {k: coerce(k, v, RUN_KINDS[k], False) for k, v in _of(args, RUN_KINDS)}
        chain_seeds(run.get("seed", DEFAULT_SEED), 1)  # a seed the chains take (>= 0), checked now
        return Settings(spec, config, **run)


def _of(args: Mapping[str, Any], names: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in args.items() if k in names]


@contextlib.contextmanager
def _about(what: str) -> Iterator[None]:
    """A PowerSampleError raised within says where its value came from: "model_args: alpha must be ..."."""
    try:
        yield
    except PowerSampleError as e:
        raise PowerSampleError(f"{what}: {e}") from None


def coerce(name: str, value: Any, kind: type, optional: bool) -> Any:
    """`value` as the type `kind` of field `name` (None where the field may be None); else a one-line error."""
    if optional and (value is None or str(value).lower() == "none"):  # lm-eval's command line keeps "none" text
        return None
    out = _as(kind, value)
    if out is None:
        raise PowerSampleError(f"{name} must be {KIND_WORDS[kind]}, got {value!r}")
    return out


def _as(kind: type, value: Any) -> Any:
    """`value` as `kind` (an integer-valued float is an int, a number's text the number); None when it is not."""
    if isinstance(value, bool) or kind is bool:
        lowered = str(value).lower()
        return {"true": True, "false": False}.get(lowered) if kind is bool else None
    if kind is str:
        return str(value) if isinstance(value, (str, int, float)) else None
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if kind is not int or number == float(value) else None


@dataclass(frozen=True)
class Job:
    """One generate_until request, as it runs."""

    prompt: str
    seed: int
    config: SamplerConfig
    stops: tuple[str, ...]  # its text is cut before the earliest one found (api.first_stop)


def request_config(base: SamplerConfig, kwargs: dict[str, Any]) -> SamplerConfig:
    """A generate request's config: `base` with its generation kwargs over it, read as the server reads a request's
    fields (module docstring). Consumes what it reads from `kwargs`; says once which others it ignores."""
    do_sample = kwargs.pop("do_sample", False)
    temperature = kwargs.pop("temperature", None if do_sample else 0.0)
    over = {k: coerce(k, kwargs.pop(k), TYPES[k], k in OPTIONAL) for k in list(kwargs) if k in SPECS}
    if "max_gen_toks" in kwargs:
        over["max_new_tokens"] = coerce("max_gen_toks", kwargs.pop("max_gen_toks"), int, False)
    if kwargs:
        notice_once(f"lm-eval generation kwargs ignored: {', '.join(sorted(kwargs))}")
    block, budget = over.get("block_size", base.block_size), over.get("max_new_tokens", base.max_new_tokens)
    if block is not None and block > budget:
        over["block_size"] = budget  # a block past T is one block of T, as on the server
    method = over.get("method", base.method)
    if temperature is not None and method in registry.PLAIN_METHODS:
        tau = coerce("temperature", temperature, float, False)
        over |= registry.plain_temperature(method, tau, over.get("proposal_temperature"))
    config = dataclasses.replace(base, **over)
    registry.check(config)
    return config


def generate(engine: Backend, jobs: Sequence[Job], chat: bool, quiet: bool = False) -> list[str]:
    """Each job's text, cut at its stops: the jobs that share a proposal run as one engine run."""
    texts = [""] * len(jobs)
    groups: dict[Proposal, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(registry.proposal(job.config), []).append(i)
    for group in groups.values():
        for i, text in zip(group, _sample_group(engine, [jobs[i] for i in group], chat, quiet)):
            cut = first_stop(text, jobs[i].stops)
            texts[i] = text if cut < 0 else text[:cut]
    return texts


def _sample_group(engine: Backend, jobs: Sequence[Job], chat: bool, quiet: bool) -> list[str]:
    """The sampled text of each job (one proposal among them), uncut: equal jobs are chains 0, 1, ... of one."""
    counts = Counter((job.prompt, job.seed, job.config) for job in jobs)
    distinct, chains = list(counts), max(counts.values())
    with sampling_bar(jobs[0].config, quiet, "powersample: generate_until", len(distinct) * chains) as bar:
        outcomes = sample_many(
            engine,
            [(prompt, seed) for prompt, seed, _ in distinct],
            jobs[0].config,
            num_samples=chains,
            chat=chat,
            progress=bar,
            configs=[config for _, _, config in distinct],
        )
    found = dict(zip(distinct, outcomes))
    taken: Counter = Counter()
    texts = []
    for job in jobs:
        key = (job.prompt, job.seed, job.config)
        records = found[key]
        if isinstance(records, PowerSampleError):
            raise PowerSampleError(f"generate_until on the prompt {job.prompt[:60]!r}: {records}")
        texts.append(records[taken[key]].text)
        taken[key] += 1
    return texts


def loglikelihoods(engine: Backend, pairs: Sequence[Pair], quiet: bool = False) -> list[tuple[float, bool]]:
    """(log p of the continuation after its context, whether each of its tokens is the likeliest there) per pair;
    each distinct pair ranked once, in sorted order, so pairs that share a context come one after another."""
    ranking = capability(engine, Ranking)
    if ranking is None:
        raise PowerSampleError("loglikelihood needs a backend that ranks tokens (the Ranking capability)")
    scored = {}
    for pair in tqdm(sorted(set(pairs)), desc="powersample: loglikelihood", disable=quiet, file=sys.stderr):
        scored[pair] = loglikelihood(ranking, *pair)
    return [scored[pair] for pair in pairs]


def loglikelihood(ranking: Ranking, context: Tokens, continuation: Tokens) -> tuple[float, bool]:
    """(sum of the continuation's log p, every token the likeliest): a token tied with the likeliest counts as
    greedy, as lm-eval reads OpenAI log-probs (its `local-completions`)."""
    if not continuation:
        return 0.0, True
    ranks = ranking.rank(context, continuation, 1)
    return math.fsum(r.base_logp for r in ranks), all(r.base_logp >= r.top[0][1] for r in ranks)


def fitted(context: Tokens, continuation: Tokens, most: int | None) -> Pair:
    """The pair within `most` tokens (the model's context length): the context loses its first tokens, as lm-eval
    truncates; a continuation that does not fit after one context token is a one-line error."""
    if most is None or len(context) + len(continuation) <= most:
        return context, continuation
    keep = most - len(continuation)
    if keep < 1:
        raise PowerSampleError(
            f"a loglikelihood continuation of {len(continuation)} tokens does not fit the model's {most}-token context"
        )
    return context[-keep:], continuation


def spell(vocabulary: Mapping[str, int], longest: int, text: str) -> Tokens:
    """`text` as ids of a vocabulary's texts, the longest one that matches first; a one-line error where none does."""
    ids, at = [], 0
    while at < len(text):
        size = next((n for n in range(min(longest, len(text) - at), 0, -1) if text[at : at + n] in vocabulary), 0)
        if not size:
            raise PowerSampleError(f"the model's vocabulary cannot spell {text[at:]!r} (in {text!r})")
        ids.append(vocabulary[text[at : at + size]])
        at += size
    return tuple(ids)


@register_model(MODEL_NAME)
class PowerSampleLM(TemplateLM):
    """lm-eval's model `powersample` (module docstring). `PowerSampleLM(**model_args)` loads the backend they name;
    `from_backend` wraps one already loaded."""

    def __init__(self, **model_args: Any) -> None:
        settings = parse_model_args(model_args)
        self._setup(settings.spec.load(), settings, settings.spec.describe())

    @classmethod
    def from_backend(
        cls, engine: Backend, config: SamplerConfig = SamplerConfig(), *, seed: int = DEFAULT_SEED, chat: bool = False
    ) -> PowerSampleLM:
        """The model around `engine` (for `lm_eval.simple_evaluate(model=...)` in Python)."""
        registry.check(config)
        lm = cls.__new__(cls)
        lm._setup(engine, Settings(BackendSpec(), config, seed, chat), type(engine).__name__)
        return lm

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> PowerSampleLM:
        """From "key=value,..." model_args; lm-eval's own (batch size, device) are ignored (module docstring)."""
        return cls(**lm_utils.simple_parse_args_string(arg_string))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> PowerSampleLM:
        """From model_args as a dict (lm-eval's command line parses them so)."""
        return cls(**arg_dict)

    def _setup(self, engine: Backend, settings: Settings, name: str) -> None:
        super().__init__()
        self.engine = engine  # not `backend`: TemplateLM's `backend` says "causal"
        self.config, self.seed, self.chat, self.name = settings.config, settings.seed, settings.chat, name
        vocab = capability(engine, Vocabulary)
        self.eos_text = vocab.token_text(min(engine.eos_ids)) if vocab is not None and engine.eos_ids else None
        self.spelled: dict[str, int] | None = None  # for a backend whose encode ignores text: its vocabulary
        if not engine.encode(TEXT_PROBE, False):
            if vocab is None:
                raise PowerSampleError("the backend encodes no text and does not say what its ids are (Vocabulary)")
            self.spelled = {vocab.token_text(t): t for t in reversed(range(vocab.vocab_size()))}  # the smaller id
            self.longest = max(map(len, self.spelled))

    # --- what TemplateLM asks of a model --------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return min(self.engine.eos_ids)

    @property
    def tokenizer_name(self) -> str:
        return f"powersample:{self.name}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The ids of lm-eval's text: the backend's plain encoding (the server's /tokenize), or its vocabulary's."""
        if self.spelled is None:
            return list(self.engine.encode(string, False))
        return list(spell(self.spelled, self.longest, string))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if self.spelled is None:
            return super()._encode_pair(context, continuation)
        spaces = context[len(context.rstrip()) :]  # lm-eval moves them onto the continuation
        return [], self.tok_encode(spaces + continuation)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        most = self.engine.context_length
        pairs = [fitted(self._context(ctx), tuple(cont), most) for _, ctx, cont in requests]
        results = loglikelihoods(self.engine, pairs, quiet=disable_tqdm)
        for (strings, _, _), result in zip(requests, results):
            if strings is not None:  # None: a window of loglikelihood_rolling
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def _context(self, ids: Sequence[int]) -> Tokens:
        """A context's ids as scored: none for a backend that ignores its prompt (the toy)."""
        return () if self.spelled is not None else tuple(ids)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's log p after the EOS token, in lm-eval's rolling windows of the model's context length."""
        windows = [self._windows(request.args[0]) for request in requests]
        flat = [(None, context, continuation) for each in windows for context, continuation in each]
        scores = iter(self._loglikelihood_tokens(flat, disable_tqdm=disable_tqdm))
        totals = [math.fsum(next(scores)[0] for _ in each) for each in windows]
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        ids = self.tok_encode(text)
        most = self.engine.context_length
        rolling = lm_utils.get_rolling_token_windows(
            token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=most - 1 if most else max(len(ids), 1),
            context_len=1,
        )  # fmt: skip
        return [lm_utils.make_disjoint_window(window) for window in rolling]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Every request's text, all of them sampled in one engine run (module docstring)."""
        jobs = [self._job(context, gen_kwargs) for context, gen_kwargs in (request.args for request in requests)]
        texts = generate(self.engine, jobs, self.chat, quiet=disable_tqdm)
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _job(self, context: str, gen_kwargs: Mapping[str, Any]) -> Job:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None)
        with _about("gen_kwargs"):
            try:
                stops = handle_stop_sequences(list(until) if isinstance(until, list) else until, self.eos_text)
            except ValueError:
                raise PowerSampleError(f"until must be a string or a list of strings, got {until!r}") from None
            seed = coerce("seed", kwargs.pop("seed", self.seed), int, False)
            config = request_config(self.config, kwargs)
        return Job(context, seed, config, tuple(s for s in stops if s))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        raise PowerSampleError(
            "--apply_chat_template: powersample applies the model's chat template itself; pass chat=true in "
            "--model_args instead"
        )


def run_cli(argv: Sequence[str]) -> int:
    """lm-eval's own command line on `argv`, unchanged (this module imported: the model `powersample` is
    registered)."""
    from lm_eval.__main__ import cli_evaluate  # lm-eval's console script `lm-eval`

    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli_evaluate()
    except PowerSampleError:  # ours (a ValueError too): already one line
        raise
    except (ValueError, FileNotFoundError) as e:  # lm-eval's word on bad input ("Tasks not found: ..."): one line
        if DEBUG_FLAG in argv:
            raise
        raise PowerSampleError(f"lm-eval: {one_line(e)} ({DEBUG_FLAG} DEBUG shows its traceback)") from None
    finally:
        sys.argv = saved
    return 0
