"""`vllm`: the offline vLLM engine (`vllm.LLM`) behind the backend seam (`base.py`).

vLLM samples; we only read what it returns. The engine runs with prefix caching on and with
`logprobs_mode="processed_logprobs"`, so the log-prob it returns for a sampled token is the log of the very
distribution it drew that token from: the logits at temperature tau, then top-k, then top-p, renormalized (float32).
That is our proposal q (`proposal_logprobs` in base.py), up to ties at a top-k boundary, where vLLM keeps every
tied token.

    extend_continuous(requests, proposal, refill, poll), per request, in one engine loop shared by all:
      1. a draw request:                          tokens, log q       (seeded per request; prefix cache hit)
         and, at pure temperature, log p in the same pass: tau log q + c, c written by LogpChannel (below)
      2. otherwise, when q != p, once 1 is done, a scoring request: log p = prompt log-probs of context + tokens
      3. once the continuation is complete, refill(key, continuation): its chain's next requests join at once
    extend:     the same loop with no refills (a batch of requests, one continuation each)
    score:      prompt log-probs of the given continuation (raw: prompt tokens never go through the sampler)
    rank:       the same request, asking for the n likeliest prompt log-probs at every position
    confidence: one-token requests at temperature 1 returning all V log-probs, sum_x p log p per position

Continuous batching. The loop drives the engine under `vllm.LLM` request by request (`LLMEngine.add_request`,
`step`, `abort_request`), so the engine's batch stays full: a request that finishes is followed at the next step by
its next stage or its chain's next request, instead of waiting for the longest request of a lockstep round. A
chain's requests, seeds and tokens are the same in either schedule; only the batch a token is computed in differs.
If anything raises in the loop (a refill, a poll, a bad request), the requests still in the engine are aborted. So
is a request whose `halt` says so, before the next engine step: its caller gets an empty continuation to discard.

Step 2 is a prefill, not a decode, and it reads the prefix cache too, under a salt of its own: vLLM only returns
prompt log-probs of tokens it computes, and unsalted it would find the continuation itself cached by step 1.
Salted, it finds prompt + x_<i as scored when the current state was proposed, and computes only the new suffix.
When q = p (tau = 1, no truncation) the numbers of step 1 are log p already and step 2 is skipped.

Log p in the draw's pass. vLLM returns one kind of log-prob per engine, so step 2 used to recompute every drawn token
in a prefill. Where engines run vLLM's V1 model runner (the CPU build: no Triton), they carry LogpChannel, a logits
processor that changes no logit and writes, per position, the one number that turns the returned log q into log p,
into a file shared with the engine's worker: step 2 is then skipped for pure-temperature proposals that ask for no
alternatives. Truncated proposals, alternatives and the V2 model runner (CUDA builds) keep step 2.

Randomness: each request draws one 63-bit seed from its chain's generator and hands it to vLLM as the request's
seed, so a chain's tokens depend only on its own generator (and, as with every engine, on the engine's numerics).

Caches: vLLM's prefix cache is shared by all requests and keyed by content, so slots are not needed; a
resampling step from position i finds prompt + x_<i in the cache (in whole KV blocks). `reuse_cache=False` (the
bench's regenerate-from-scratch baseline) makes every request skip the cache and run alone (one in the engine at a
time).

Engines are kept per process and options (`engine`): loading the same model twice, as `powersample bench` does for
its baseline, reuses the running engine.
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

# vLLM logs every step at INFO to stdout, where our CLI prints samples and tables: keep its warnings, on stderr,
# unless the caller set these. Read when vllm is first imported, and inherited by its engine processes.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import vllm  # after the logging settings above (E402 allows them: they only set os.environ)
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from powersample.backends.engine import check_fits, extend_in_one_run
from powersample.backends.hub import dtype_name, eos_ids, is_hub_id
from powersample.backends.tokenizer import encode_message_ids, encode_prompt_ids
from powersample.core.types import Continuation, ExtendRequest, Poll, Proposal, Ranked, Refill, Tokens
from powersample.errors import PowerSampleError, one_line

SCORE_SALT = "powersample-score"  # prefix-cache salt of scoring requests (see VLLMBackend._prompt_logprobs)
CONFIDENCE_BATCH = 16  # positions per engine call in confidence(); each returns V log-probs
MIN_TEMPERATURE = 0.01  # vLLM raises smaller temperatures to 0.01 (`_MAX_TEMP`), which would change q
CPU_MEMORY_FRACTION = 0.3  # default share of memory for weights + KV cache on a CPU-only machine (vLLM's: 0.9)
LOGP_KEY = "powersample_logp"  # SamplingParams.extra_args key: where LogpChannel writes a draw's log p offsets
LOGP_ROWS = 1024  # draws at once that LogpChannel serves; more in flight are scored by prefill


@dataclass(frozen=True)
class EngineOptions:
    """What a `vllm.LLM` is built from; equal options share one running engine."""

    model: str  # a local model folder or a hub id
    dtype: str = "auto"  # vLLM's --dtype: auto, float32, bfloat16, float16
    tensor_parallel_size: int = 1  # GPUs per engine
    gpu_memory_utilization: float = 0.9  # share of (GPU, or on CPU host) memory for weights + KV cache
    max_model_len: int | None = None  # None = the model's own context length
    enforce_eager: bool = False  # True skips torch.compile / CUDA graphs (on CPU compiling costs minutes)
    logp_channel: bool = False  # install LogpChannel: log p of a draw in the draw's own pass (V1 model runner only)

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise PowerSampleError(f"tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise PowerSampleError(f"gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise PowerSampleError(f"max-model-len must be >= 2, got {self.max_model_len}")


_ENGINES: dict[EngineOptions, Any] = {}  # one running vllm.LLM per options, for the life of the process


def engine(options: EngineOptions) -> Any:
    """The process's `vllm.LLM` for these options, started on first use (about a minute on CPU)."""
    if options not in _ENGINES:
        _ENGINES[options] = _start_engine(options)
    return _ENGINES[options]


def _start_engine(options: EngineOptions) -> Any:
    try:
        return vllm.LLM(
            model=options.model,
            dtype=options.dtype,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=options.max_model_len,
            enforce_eager=options.enforce_eager,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",  # log q of the token drawn, not log p (see the module docstring)
            max_logprobs=-1,  # confidence() asks for the whole vocabulary
            seed=0,
            logits_processors=[LogpChannel] if options.logp_channel else None,
        )
    except Exception as e:  # noqa: BLE001 - every engine failure becomes one line, never a traceback
        raise PowerSampleError(f"vLLM could not start on {options.model}: {one_line(e)}") from None


@atexit.register
def shutdown_engines() -> None:
    """Stop every engine's worker processes (left to the interpreter's teardown, they may abort the process)."""
    if _ENGINES:  # vLLM logs each shutdown step, to streams that may be closed by now (pytest's capture)
        logging.getLogger("vllm").setLevel(logging.ERROR)
    while _ENGINES:
        _, llm = _ENGINES.popitem()
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


# --- log p in the draw's own pass -------------------------------------------------------------------------------


_Tracked = tuple[np.memmap, int, float, list[int]]  # a tracked draw: shared file, its row, tau, its output ids


class LogpChannel(V1LogitsProcessor):  # type: ignore[misc]  # vllm is untyped here
    """A vLLM logits processor (the V1 model runner's interface) that changes no logit: for each drawing request
    whose extra_args carry LOGP_KEY, it writes at each position the offset c that turns the log q vLLM returns for
    the drawn token into its log p, into a file the backend shares with the engine's worker process:

        log q(x) = l_x / tau - LSE(l / tau)             (vLLM's processed log-prob of the token drawn; l: raw logits)
        log p(x) = l_x - LSE(l) = tau log q(x) + c,     c = tau LSE(l / tau) - LSE(l)

    c depends on the row of logits only, not on the token, so it is known before the draw. Pure temperature only:
    under top-k / top-p, LSE runs over the kept tokens, which vLLM picks after this processor has run.
    """

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool):
        self.requests: dict[int, _Tracked] = {}  # batch index -> what _track keeps
        self.files: dict[tuple[str, int], np.memmap] = {}  # (path, width) -> the shared file, opened once

    def is_argmax_invariant(self) -> bool:
        return False  # so it runs on the raw logits, before temperature (argmax-invariant processors run after)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.requests, batch_update, self._track)

    def _track(self, params: Any, _prompt: Any, output_ids: list[int]) -> _Tracked | None:
        spec = (params.extra_args or {}).get(LOGP_KEY)
        if spec is None:
            return None
        path, width, row, tau = spec
        if (path, width) not in self.files:
            self.files[path, width] = np.memmap(path, dtype=np.float64, mode="r+").reshape(-1, width)
        return self.files[path, width], int(row), float(tau), output_ids  # output_ids: vLLM's live list

    def apply(self, logits: Any) -> Any:
        if not self.requests:
            return logits
        import torch

        index = list(self.requests)
        rows = logits[index].double()  # (R, V) raw logits of the tracked requests
        tau = torch.tensor([self.requests[i][2] for i in index], dtype=torch.float64, device=rows.device)[:, None]
        offsets = (tau[:, 0] * torch.logsumexp(rows / tau, -1) - torch.logsumexp(rows, -1)).tolist()
        for i, c in zip(index, offsets):
            file, row, _, output_ids = self.requests[i]
            file[row, len(output_ids)] = c  # the token drawn from this row is output number len(output_ids)
        return logits


class _LogpFile:
    """The backend's end of LogpChannel: a shared (LOGP_ROWS, width) float64 file, one row per draw in flight
    (NaN until the engine writes it, so a position it missed is seen)."""

    def __init__(self, width: int):
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()  # memory, where there is some
        _remove_orphans(Path(folder))
        fd, self.path = tempfile.mkstemp(prefix=f"powersample-logp-{os.getpid()}-", suffix=".f64", dir=folder)
        os.close(fd)
        weakref.finalize(self, _unlink, self.path)  # at exit too; a process killed first leaves an orphan
        self.width = width
        self.array = np.memmap(self.path, dtype=np.float64, mode="w+", shape=(LOGP_ROWS, width))
        self.free = list(range(LOGP_ROWS))

    def take(self, tau: float, n: int) -> tuple[int, dict[str, Any]] | None:
        """A free row for a draw of up to n tokens at temperature tau, and the extra_args that name it."""
        if not self.free:
            return None
        row = self.free.pop()
        self.array[row, :n] = np.nan
        return row, {LOGP_KEY: (self.path, self.width, row, tau)}

    def give_back(self, row: int, n: int) -> np.ndarray:
        """The row's first n offsets (float64); the row is free again."""
        offsets = np.array(self.array[row, :n])
        self.free.append(row)
        return offsets


def _remove_orphans(folder: Path) -> None:
    """Remove LogpChannel files left by processes that no longer run (named powersample-logp-PID-...)."""
    for path in folder.glob("powersample-logp-*-*.f64"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _unlink(str(path))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:  # gone already (another process's cleanup)
        pass


@dataclass
class VLLMStats:
    """Diagnostics (not part of the seam): what the backend has done since it was built."""

    engine_calls: int = 0  # engine runs (a generate() call, or one loop of extend / extend_continuous)
    cached_tokens: int = 0  # context tokens extend()'s sampling found in the prefix cache; tests check reuse
    scored_cached_tokens: int = 0  # the same for its scoring (log p) requests, under their salt
    engine_steps: int = 0  # engine steps of extend's loops; tests check that continuous batching saves steps
    most_in_flight: int = 0  # most requests (draws and scorings) in the engine at once; tests check batching
    step_seconds: dict[str, float] = field(default_factory=dict)  # wall time of extend's engine steps, by kind
    scored_tokens: int = 0  # tokens the scoring prefills computed (prompt + tokens less their cache hit)
    logp_in_pass: int = 0  # draws whose log p came from their own pass (LogpChannel), with no scoring prefill

    def add_step(self, stages: set[str], seconds: float) -> None:
        """Book one engine step's wall time under what was in flight: draw, score (score or rescore) or mixed."""
        kinds = {"draw" if stage == "draw" else "score" for stage in stages}
        kind = kinds.pop() if len(kinds) == 1 else "mixed"
        self.step_seconds[kind] = self.step_seconds.get(kind, 0.0) + seconds


class VLLMBackend:
    """Sampling and scoring with vLLM: one engine call per batch of requests, prefix caching, exact log p and q."""

    HINTS: frozenset[str] = frozenset()  # vLLM draws whole continuations: no drafts of ours, no floor

    def __init__(self, llm: Any, reuse_cache: bool = True, logp_in_pass: bool = True):
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        config = llm.llm_engine.model_config
        self.context_length: int | None = int(config.max_model_len)
        channel = logp_in_pass and LogpChannel in (config.logits_processors or ())
        self.logp_file = _LogpFile(int(config.max_model_len) + 1) if channel else None  # None: log p by prefill
        self.eos_ids = _eos_ids(self.tokenizer, config.model)
        self.device = _device_name()
        self.reuse_cache = reuse_cache  # False: every request skips the prefix cache and runs alone (bench baseline)
        self.stats = VLLMStats()  # diagnostics, for tests and tools

    @classmethod
    def load(
        cls,
        model: str | None,
        *,
        dtype: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        reuse_cache: bool = True,
    ) -> VLLMBackend:
        """Load `model` (None = the embedded SmolLM2, converted once to a folder; a folder; a hub id).

        dtype None = float32 on CPU (as the hf backend), else the checkpoint's; gpu_memory_utilization None = 0.3
        on a CPU-only machine, else vLLM's 0.9. Every failure is a one-line PowerSampleError.
        """
        cpu = _device_name() == "cpu"
        options = EngineOptions(
            model=_resolve_model(model),
            dtype=_parse_dtype(dtype, cpu),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization or (CPU_MEMORY_FRACTION if cpu else 0.9),
            max_model_len=max_model_len,
            enforce_eager=cpu,
            logp_channel=_runs_v1_model_runner(),
        )
        return cls(engine(options), reuse_cache=reuse_cache)

    def encode(self, prompt: str, chat: bool = True) -> Tokens:
        """Prompt ids; with `chat` and a chat template, the prompt is one user message plus the assistant header."""
        return encode_prompt_ids(self.tokenizer, prompt, chat)

    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> Tokens:
        """Ids of a chat conversation plus the assistant header (see backends/tokenizer.py)."""
        return encode_message_ids(self.tokenizer, messages)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def vocab_size(self) -> int:
        """Ids both the tokenizer and the model's embedding know (the `Vocabulary` capability)."""
        return min(len(self.tokenizer), self._vocab_size())

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def extend(self, requests: Sequence[ExtendRequest], proposal: Proposal) -> list[Continuation]:
        """One continuation per request, in order: all requests in one engine loop, a request's scoring (q != p)
        starting as soon as its draw is done."""
        return extend_in_one_run(self.extend_continuous, requests, proposal)

    def extend_continuous(
        self, requests: Mapping[int, ExtendRequest], proposal: Proposal, refill: Refill, poll: Poll | None = None
    ) -> None:
        """Run `requests` (by key) in one engine loop that stays full: when a request's continuation is complete,
        refill(key, continuation) gives the requests that start now, and poll(), called once per engine step, those
        that arrived; both join the engine's batch at its next step. Returns once nothing is in flight and poll()
        has nothing. On any exception the requests still in the engine are aborted."""
        engine = self.llm.llm_engine
        capacity = None if self.reuse_cache else 1  # the baseline runs one request at a time
        waiting: deque[_Job] = deque()  # jobs whose next stage is not in the engine yet
        flight: dict[str, _Job] = {}  # engine request id -> job

        def intake(new: Mapping[int, ExtendRequest]) -> None:
            for request in new.values():  # every request checked before any draws its seed
                self._check_context(request.context, request.max_tokens)
                self._check_proposal(request.drawn_from(proposal))
                self._check_report(request)
            waiting.extend(self._job(key, r, r.drawn_from(proposal)) for key, r in new.items())

        try:
            intake(requests)
            self.stats.engine_calls += 1
            while True:
                intake(poll() if poll else {})
                while waiting and (capacity is None or len(flight) < capacity):
                    job = waiting.popleft()
                    flight[self._submit(job)] = job
                if not flight:
                    return
                self.stats.most_in_flight = max(self.stats.most_in_flight, len(flight))
                self.stats.engine_steps += 1
                for request_id in [rid for rid, job in flight.items() if job.request.halted()]:
                    engine.abort_request([request_id], internal=False)  # its caller discards the cut continuation
                    job = flight.pop(request_id)
                    self._release(job)
                    intake(refill(job.key, Continuation((), (), ())))
                if not flight:
                    continue
                started = time.perf_counter()
                outputs = engine.step()
                self.stats.add_step({job.stage for job in flight.values()}, time.perf_counter() - started)
                for out in outputs:
                    if not out.finished:  # a drawing request reporting its tokens (RequestOutputKind.CUMULATIVE)
                        if out.request_id in flight:
                            self._report(flight[out.request_id], tuple(out.outputs[0].token_ids))
                        continue
                    job = flight.pop(out.request_id, None)
                    if job is None:
                        continue
                    if not self._advance(job, out, proposal):
                        waiting.appendleft(job)  # its next stage goes first
                    else:
                        intake(refill(job.key, job.continuation()))
        except BaseException:
            if flight:  # leave nothing running in the engine: a later call would collect it
                engine.abort_request(list(flight), internal=False)
                for job in flight.values():
                    self._release(job)
            raise

    def score(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """log p of each continuation token given context and the tokens before it (prompt log-probs)."""
        if not continuation:
            return ()
        self._check_context(context, len(continuation))
        [(logp, _)] = self._prompt_logprobs([tuple(context)], [tuple(continuation)], [0])
        return tuple(logp)

    def rank(self, context: Sequence[int], continuation: Sequence[int], n: int) -> tuple[Ranked, ...]:
        """Each continuation token's log p and the n likeliest tokens before it (the `Ranking` capability): the
        prompt log-probs request of `score`, with prompt_logprobs = n (vLLM adds the prompt token's own entry)."""
        if not continuation:
            return ()
        self._check_context(context, len(continuation))
        [out] = self._prompt_outputs([tuple(context)], [tuple(continuation)], [n])
        rows, start = out.prompt_logprobs, len(context)
        return tuple(
            Ranked(_logprob_of(rows, start + i, token), _top(rows, start + i, n))
            for i, token in enumerate(continuation)
        )

    def confidence(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """Sum_x p log p of the next-token distribution before each continuation token (Eq. 13).

        One one-token request per position, at temperature 1 and asking for the whole vocabulary's log-probs:
        the request's prompt is the prefix before that position, found in the prefix cache (the sampling requests
        cached it). Positions go CONFIDENCE_BATCH to an engine call, so memory stays at that many times V numbers
        whatever the length (prompt log-probs would return V numbers for every prompt position too).
        """
        if not continuation:
            return ()
        self._check_context(context, len(continuation))
        ids = tuple(context) + tuple(continuation)
        params = self._params(max_tokens=1, temperature=1.0, logprobs=self._vocab_size())  # q = p: log p
        values: list[float] = []
        for lo in range(len(context), len(ids), CONFIDENCE_BATCH):
            prefixes = [ids[:end] for end in range(lo, min(lo + CONFIDENCE_BATCH, len(ids)))]
            outs = self._generate(prefixes, [params] * len(prefixes))
            values += [_negative_entropy(out.outputs[0].logprobs, 0) for out in outs]
        return tuple(values)

    def _vocab_size(self) -> int:
        """Width of the model's logits (may exceed the tokenizer's vocabulary)."""
        return int(self.llm.llm_engine.model_config.get_vocab_size())

    # --- engine calls ---------------------------------------------------------------------------------------------

    def _sampling(self, request: ExtendRequest, proposal: Proposal) -> Any:
        """The request's SamplingParams: q's temperature and truncation, a seed from the chain, EOS as stop."""
        return self._params(
            temperature=proposal.temperature,
            top_k=proposal.top_k,  # 0 = off
            top_p=proposal.top_p,
            max_tokens=request.max_tokens,
            seed=int(request.rng.integers(0, 2**63 - 1)),
            logprobs=request.report.alternatives if proposal.is_base else 0,  # the sampled token's (+ top-k for p = q)
            stop_token_ids=sorted(self.eos_ids),
        )

    def _params(self, read_cache: bool = False, **kwargs: Any) -> Any:
        """SamplingParams with ids only; read_cache lets a prompt log-probs request read the prefix cache."""
        skip_cache = True if not self.reuse_cache else (False if read_cache else None)  # None: vLLM's default
        return vllm.SamplingParams(detokenize=False, flat_logprobs=True, skip_reading_prefix_cache=skip_cache, **kwargs)

    def _submit(self, job: _Job) -> str:
        """Add the job's current stage to the engine as one request; its request id."""
        request = job.request
        if job.stage == "draw":
            prompt, params, salt = request.context, job.params, None
            taken = self.logp_file.take(job.tau, request.max_tokens) if self.logp_file and job.tau else None
            if taken is not None:  # LogpChannel writes this draw's log p offsets into row job.row
                job.row, params.extra_args = taken
        else:  # score (salted, reading the cache) or rescore (unsalted, computing everything): see _prompt_logprobs
            scored = job.stage == "score"
            prompt, salt = tuple(request.context) + job.tokens, SCORE_SALT if scored else None
            params = self._params(scored, max_tokens=1, prompt_logprobs=request.report.alternatives)
        live = job.stage == "draw" and request.report.on_draw is not None  # an output every step, its tokens so far
        params.output_kind = RequestOutputKind.CUMULATIVE if live else RequestOutputKind.FINAL_ONLY  # else at the end
        extra = {"cache_salt": salt} if salt and self.reuse_cache else {}
        request_id = str(next(self.llm.request_counter))  # the counter LLM.generate() numbers its requests with
        render = getattr(self.llm, "_preprocess_cmpl_one", None)  # what LLM.generate() adds; else the raw prompt
        try:
            engine_input = TokensPrompt(prompt_token_ids=list(prompt), **extra)
            self.llm.llm_engine.add_request(request_id, render(engine_input) if render else engine_input, params)
        except (ValueError, TypeError) as e:  # vLLM's checks of a request
            self._release(job)
            raise PowerSampleError(f"vLLM refused the request: {one_line(e)}") from None
        return request_id

    def _advance(self, job: _Job, out: Any, proposal: Proposal) -> bool:
        """Read a finished stage of `job` into it; True once its continuation is complete, else it moves on to its
        next stage (scoring when q != p; rescoring without the cache when the salted hit reached the tokens)."""
        request = job.request
        if job.stage == "draw":
            job.tokens = self._tokens(out, request)
            self._report(job, job.tokens)  # what the last step drew
            self.stats.cached_tokens += out.num_cached_tokens or 0
            job.logq = _sampled_logprobs(out.outputs[0].logprobs, job.tokens)
            if request.drawn_from(proposal).is_base:  # q = p: the numbers vLLM returned are log p already
                job.logp, job.alternatives = job.logq, _top(out.outputs[0].logprobs, 0, request.report.alternatives)
                return True
            offsets = self._release(job)
            if offsets is not None and np.all(np.isfinite(offsets)):  # log p = tau log q + c (LogpChannel)
                job.logp = (job.tau * np.asarray(job.logq) + offsets).tolist()
                self.stats.logp_in_pass += 1
                return True
            job.stage = "score"
            return False
        cached = out.num_cached_tokens or 0
        self.stats.scored_tokens += len(request.context) + len(job.tokens) - cached
        if job.stage == "score" and cached > len(request.context) - 1:
            job.stage = "rescore"
            return False
        if job.stage == "score":
            self.stats.scored_cached_tokens += cached
        job.logp, job.alternatives = _scored(out, len(request.context), job.tokens, request.report.alternatives)
        return True

    def _job(self, key: int, request: ExtendRequest, proposal: Proposal) -> _Job:
        """A request as it enters the loop: its draw's SamplingParams (seeded now) and how it gets log p."""
        return _Job(key, request, self._sampling(request, proposal), tau=self._in_pass_tau(request, proposal))

    def _in_pass_tau(self, request: ExtendRequest, proposal: Proposal) -> float:
        """The temperature (as vLLM's float32 holds it) at which LogpChannel can give this draw's log p in its own
        pass; 0 = it cannot: no channel, q = p (not needed), truncation (LSE over a set vLLM picks later), or the
        request wants the likeliest first tokens too (those come from the scoring prefill)."""
        plain = proposal.top_k == 0 and proposal.top_p >= 1.0 and not proposal.is_base
        if self.logp_file is None or not plain or request.report.alternatives:
            return 0.0
        return float(np.float32(proposal.temperature))

    def _release(self, job: _Job) -> np.ndarray | None:
        """Free the job's LogpChannel row; its offsets for the tokens drawn (None if it had no row)."""
        if job.row is None or self.logp_file is None:
            return None
        offsets, job.row = self.logp_file.give_back(job.row, len(job.tokens)), None
        return offsets

    def _generate(self, contexts: Sequence[Tokens], params: Sequence[Any], salt: str | None = None) -> list[Any]:
        """One `LLM.generate` over token prompts (one per request when the cache is off: the batch-1 baseline);
        `salt` keeps the requests' prefix cache apart from unsalted requests'."""
        if not self.reuse_cache and len(contexts) > 1:
            return [self._generate([c], [p], salt)[0] for c, p in zip(contexts, params)]
        extra = {"cache_salt": salt} if salt and self.reuse_cache else {}
        prompts = [TokensPrompt(prompt_token_ids=list(c), **extra) for c in contexts]
        self.stats.engine_calls += 1
        try:
            return self.llm.generate(prompts, list(params), use_tqdm=False)
        except (ValueError, TypeError) as e:  # vLLM's checks of a request
            raise PowerSampleError(f"vLLM refused the request: {one_line(e)}") from None

    def _prompt_logprobs(
        self, contexts: Sequence[Tokens], continuations: Sequence[Tokens], alternatives: Sequence[int]
    ) -> list[tuple[list[float], tuple[tuple[int, float], ...]]]:
        """Per request: log p of each continuation token, and the `alternatives` likeliest first tokens (id, log p)."""
        outs = self._prompt_outputs(contexts, continuations, alternatives)
        return [_scored(out, len(c), t, k) for out, c, t, k in zip(outs, contexts, continuations, alternatives)]

    def _prompt_outputs(
        self, contexts: Sequence[Tokens], continuations: Sequence[Tokens], alternatives: Sequence[int]
    ) -> list[Any]:
        """Per request, the output of scoring context + continuation at temperature 1 with prompt_logprobs = its
        `alternatives`, in one engine call.

        vLLM returns prompt log-probs only from the first token it computes, so these requests read the prefix cache
        under their own salt: unsalted, the blocks the sampling request has just cached would swallow the
        continuation's rows; salted, the hit is the context as scored before (prompt + x_<i was scored when it was
        proposed). A request whose hit still reaches into its continuation (those tokens were scored before) is redone
        without the cache.
        """
        prompts = [c + t for c, t in zip(contexts, continuations)]
        outs = self._generate(
            prompts, [self._params(True, max_tokens=1, prompt_logprobs=k) for k in alternatives], salt=SCORE_SALT
        )
        redo = [j for j, (out, c) in enumerate(zip(outs, contexts)) if (out.num_cached_tokens or 0) > len(c) - 1]
        kept = (out for j, out in enumerate(outs) if j not in redo)
        self.stats.scored_cached_tokens += sum(out.num_cached_tokens or 0 for out in kept)
        if redo:
            again = self._generate(
                [prompts[j] for j in redo], [self._params(max_tokens=1, prompt_logprobs=alternatives[j]) for j in redo]
            )
            for j, out in zip(redo, again):
                outs[j] = out
        return outs

    def _report(self, job: _Job, drawn: Sequence[int]) -> None:
        """Hand the tokens the job's draw has added since its last report to its request's `on_draw`."""
        new = tuple(int(t) for t in drawn[job.reported :])
        on_draw = job.request.report.on_draw
        if new and on_draw is not None:
            on_draw(new)
            job.reported += len(new)

    def _tokens(self, out: Any, request: ExtendRequest) -> Tokens:
        """The request's new ids; vLLM includes the stop token. Anything but EOS-or-max_tokens is an engine error."""
        completion = out.outputs[0]
        tokens = tuple(int(t) for t in completion.token_ids)
        complete = bool(tokens) and tokens[-1] in self.eos_ids
        if not tokens or (len(tokens) < request.max_tokens and not complete):
            raise PowerSampleError(
                f"vLLM stopped after {len(tokens)} of {request.max_tokens} tokens without EOS "
                f"(finish_reason={completion.finish_reason}, stop_reason={completion.stop_reason})"
            )
        if any(t in self.eos_ids for t in tokens[:-1]):
            raise PowerSampleError("vLLM went on after an EOS token; is an EOS id missing from its stop tokens?")
        return tokens

    def _check_proposal(self, proposal: Proposal) -> None:
        if proposal.temperature < MIN_TEMPERATURE:
            raise PowerSampleError(
                f"the vllm backend needs a proposal temperature >= {MIN_TEMPERATURE} (vLLM raises smaller ones to "
                f"{MIN_TEMPERATURE}), got {proposal.temperature:g}"
            )

    def _check_report(self, request: ExtendRequest) -> None:
        """Refuse what vLLM cannot report: a sampled token's row holds its top-k log-probs only, and the whole row,
        per position, would cost V numbers per token as Python objects."""
        if request.report.entropy:
            raise PowerSampleError(
                "the vllm backend does not report per-token entropies (power-cut needs them); use "
                "the hf or llamacpp backend"
            )
        if request.report.logq_under:
            raise PowerSampleError(
                "the vllm backend reports log q under the drawn proposal only (power-pt's rungs at their own "
                "temperatures need the others); give every rung one with --proposal-temperature, or use the hf or "
                "llamacpp backend"
            )

    def _check_context(self, context: Sequence[int], new: int) -> None:
        if not context:
            raise PowerSampleError("cannot extend or score an empty context: the prompt encodes to no tokens")
        check_fits(self.context_length, len(context), new)


@dataclass
class _Job:
    """One ExtendRequest on its way through the engine loop: drawn, then (q != p) scored, rescored if need be."""

    key: int  # the caller's key
    request: ExtendRequest
    params: Any  # the draw's SamplingParams, seeded from the chain's generator when the request came in
    stage: str = "draw"  # draw -> score -> rescore (only when the salted hit reached into the tokens)
    tokens: Tokens = ()
    logq: list[float] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    alternatives: tuple[tuple[int, float], ...] = ()
    reported: int = 0  # tokens of the draw handed to the request's on_draw so far
    tau: float = 0.0  # the draw's temperature when LogpChannel gives its log p in its own pass; 0 = scored by prefill
    row: int | None = None  # its row in the backend's LogpChannel file while it draws

    def continuation(self) -> Continuation:
        return Continuation(self.tokens, tuple(self.logp), tuple(self.logq), self.alternatives)


# --- reading vLLM's log-probs -----------------------------------------------------------------------------------


def _scored(out: Any, start: int, tokens: Tokens, k: int) -> tuple[list[float], tuple[tuple[int, float], ...]]:
    """From a prompt log-probs output of context + tokens (context of length `start`): log p of each token, and the
    k likeliest first tokens (id, log p)."""
    rows = out.prompt_logprobs
    return [_logprob_of(rows, start + i, token) for i, token in enumerate(tokens)], _top(rows, start, k)


def _entries(rows: Any, position: int) -> tuple[list[int], list[float]]:
    """(ids, log-probs) vLLM returned at `position` (FlatLogprobs, or a list of {id: Logprob})."""
    if hasattr(rows, "start_indices"):  # FlatLogprobs: one flat list per field, sliced per position
        lo, hi = rows.start_indices[position], rows.end_indices[position]
        return rows.token_ids[lo:hi], rows.logprobs[lo:hi]
    entry = rows[position] or {}
    return list(entry), [lp.logprob for lp in entry.values()]


def _logprob_of(rows: Any, position: int, token: int) -> float:
    ids, logprobs = _entries(rows, position)
    for i, lp in zip(ids, logprobs):
        if i == token:
            return float(lp)
    raise PowerSampleError(f"vLLM returned no log-prob for token {token} at position {position}")


def _sampled_logprobs(rows: Any, tokens: Tokens) -> list[float]:
    """The log-prob vLLM returned for each sampled token (the processed log q of the token drawn)."""
    return [_logprob_of(rows, i, t) for i, t in enumerate(tokens)]


def _top(rows: Any, position: int, k: int) -> tuple[tuple[int, float], ...]:
    """The k likeliest (id, log-prob) at `position`, likeliest first, ties by the smaller id (as `top_alternatives`)."""
    if k <= 0:
        return ()
    ids, logprobs = _entries(rows, position)
    unique = dict(zip(ids, logprobs))  # flat log-probs list the sampled token again when it is among the top k
    ranked = sorted(unique.items(), key=lambda e: (-e[1], e[0]))[:k]
    return tuple((int(i), float(lp)) for i, lp in ranked)


def _negative_entropy(rows: Any, position: int) -> float:
    """Sum_x p log p at `position` from the full-vocabulary log-probs (float64; 0 log 0 = 0)."""
    ids, logprobs = _entries(rows, position)
    unique = dict(zip(ids, logprobs))  # the sampled token comes first and again in its place in the vocabulary
    logp = np.fromiter(unique.values(), dtype=np.float64, count=len(unique))
    p = np.exp(logp)
    return float(np.sum(np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0)))


# --- loading ----------------------------------------------------------------------------------------------------


def _resolve_model(model: str | None) -> str:
    """The folder or hub id vLLM loads; None = the embedded model's converted folder."""
    if model is None:
        from powersample.backends.embedded import embedded_model_dir

        return str(embedded_model_dir())
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix == ".gguf":
        raise PowerSampleError(f"the vllm backend loads model folders and hub ids, not .gguf files: {model}")
    if path.exists() or not is_hub_id(model):
        raise PowerSampleError(f"unknown model path or hub id {model!r}: no such folder")
    return model  # a hub id; vLLM downloads it, or fails in one line


def _parse_dtype(dtype: str | None, cpu: bool) -> str:
    """The name vLLM gets for a --dtype spelling (hub.DTYPES); None = float32 on CPU, else the checkpoint's."""
    return dtype_name(dtype, "float32" if cpu else "auto")


def _runs_v1_model_runner() -> bool:
    """Whether engines started here run vLLM's V1 model runner, whose logits-processor interface LogpChannel
    implements: without Triton (the CPU build) vLLM falls back to it, unless VLLM_USE_V2_MODEL_RUNNER forces V2.
    With Triton (CUDA) it runs the V2 runner, whose own interface (vllm.v1.worker.gpu.sample.logits_processor)
    rejects V1 processors at startup: there log p stays with the scoring prefill."""
    from vllm.triton_utils import HAS_TRITON

    return not HAS_TRITON and os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").lower() not in ("1", "true")


def _device_name() -> str:
    """ "cpu" on vLLM's CPU build, else the accelerator's name (cuda, rocm, ...)."""
    from vllm.platforms import current_platform  # resolved on first use, not at import

    return "cpu" if current_platform.is_cpu() else str(current_platform.device_type or "gpu")


def _eos_ids(tokenizer: Any, model: str) -> frozenset[int]:
    """EOS ids as vLLM stops on them: the tokenizer's EOS plus the generation config's (an int or a list)."""
    try:
        from transformers import GenerationConfig

        generation = GenerationConfig.from_pretrained(model).eos_token_id
    except (OSError, ValueError):  # no generation config: the tokenizer's EOS only
        generation = None
    return eos_ids(tokenizer.eos_token_id, generation)
