"""Memory planned, not discovered (backends/memory.py): the KV bytes of a config against a hand count, the
scheduler's admission within a budget (same samples as an unlimited run), the one-line refusal before loading, and
the server's queue under the same budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from powersample.api import make_chains, sample, sample_many
from powersample.backends import memory
from powersample.backends.embedded import embedded_gguf_path
from powersample.backends.memory import KVLayout, gguf_layout, hf_layout, parse_size, planned_layout
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.samplers import programs, registry
from powersample.samplers.driver import Scheduler, Work

WORDS = {
    "vocab": ["the", " cat", " sat", " on", " mat", ".", "\n", "<eos>"],
    "eos_id": 7,
    "default": [0.2, 0.15, 0.15, 0.15, 0.15, 0.1, 0.09, 0.01],
    "next": {"": [0.6, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.0]},
}
POWER = SamplerConfig(max_new_tokens=12, block_size=4, mcmc_steps=3)
PER_TOKEN = 1000  # the instrumented toy's KV bytes per token (one buffer)


class PlannedToy(ToyBackend):
    """The word toy with a KV layout (the PlansMemory capability), recording each extend call's batch size."""

    def __init__(self) -> None:
        super().__init__(ToySpec.from_dict(WORDS))
        self.batch_sizes: list[int] = []

    def kv_layout(self) -> KVLayout:
        return KVLayout(PER_TOKEN, (), 1)

    def extend(self, requests, proposal):
        self.batch_sizes.append(len(requests))
        return super().extend(requests, proposal)


def chain_bytes(config: SamplerConfig, prompt_tokens: int = 0) -> int:
    return PER_TOKEN * (prompt_tokens + config.max_new_tokens) * registry.members(config)


def same(a, b) -> bool:
    return [(r.tokens, r.token_logp) for r in a] == [(r.tokens, r.token_logp) for r in b]


# --- the arithmetic ------------------------------------------------------------------------------------------------


def test_llama_kv_bytes_are_layers_x_2_x_heads_x_head_dim_x_dtype():
    config = AutoConfig.for_model("llama", num_hidden_layers=4, hidden_size=256, num_attention_heads=8)
    layout = hf_layout(config, 4)
    assert layout.per_token == 4 * 2 * 8 * 32 * 4  # no GQA: 8 kv heads of 256 / 8
    assert layout.buffers == memory.HF_BUFFERS and layout.sequence_bytes(100) == 100 * 4 * 2 * 8 * 32 * 4


def test_qwen2_gqa_counts_its_kv_heads_only():
    """Qwen2.5-1.5B's shape: 28 layers, 12 query heads and 2 KV heads of 128, in bf16."""
    config = AutoConfig.for_model(
        "qwen2", num_hidden_layers=28, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2
    )
    layout = hf_layout(config, 2)
    assert layout.per_token == 28 * 2 * 2 * 128 * 2 == 28672
    plan = memory.plan(layout, 3072, 1, None)
    assert plan.per_chain == 3 * 3072 * 28672  # three buffers at T = 3072: 252 MiB a chain


def test_gemma3_sliding_layers_hold_their_window_where_the_engine_keeps_only_it():
    config = AutoConfig.for_model(
        "gemma3_text",
        num_hidden_layers=6,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        sliding_window=16,
    )
    assert config.layer_types.count("sliding_attention") == 5  # gemma3's pattern: 5 sliding, then 1 full
    per_layer = 2 * 1 * 64 * 2
    windowed = hf_layout(config, 2, keeps_windows=True)
    assert windowed.sequence_bytes(100) == per_layer * 100 + 5 * per_layer * 16
    assert windowed.sequence_bytes(10) == 6 * per_layer * 10  # windows still filling
    assert hf_layout(config, 2).sequence_bytes(100) == 6 * per_layer * 100  # hf keeps every position


def test_the_plan_matches_the_bytes_a_real_transformers_cache_holds():
    config = AutoConfig.for_model(
        "qwen2", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=50
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 37, dtype=torch.long), cache=cache, use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == hf_layout(model.config, 4).sequence_bytes(37)


def test_a_model_folder_is_planned_from_its_config_before_loading(tmp_path):
    config = AutoConfig.for_model(
        "qwen2", num_hidden_layers=3, hidden_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    config.save_pretrained(tmp_path)  # a config alone: no weights to load
    assert planned_layout("hf", str(tmp_path), "bfloat16", "cpu") == hf_layout(config, 2)
    assert planned_layout("hf", str(tmp_path), None, "cpu") == hf_layout(config, 4)
    assert planned_layout("vllm", str(tmp_path), None, None) is None  # vLLM's block manager owns its memory
    assert planned_layout("toy", None, None, None) is None


def test_the_embedded_gguf_is_planned_from_its_metadata():
    """SmolLM2-135M: 30 layers, 3 KV heads of 576 / 9 = 64; llama.cpp in f16, hf's copy in float32 on the CPU."""
    assert gguf_layout(embedded_gguf_path()) == KVLayout(30 * 2 * 3 * 64 * 2, (), memory.LLAMACPP_BUFFERS)
    assert planned_layout("llamacpp", None, None, None) == gguf_layout(embedded_gguf_path())
    assert planned_layout("hf", None, None, "cpu") == KVLayout(30 * 2 * 3 * 64 * 4, (), memory.HF_BUFFERS)


@pytest.mark.parametrize(
    "text, size",
    [("2GiB", 2 * 2**30), ("500MB", 500 * 10**6), ("123456", 123456), ("1.5e3", 1500), (" 64 kib ", 65536)],
)
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "2 GX", "-1", "0", "1.2.3", "GiB"])
def test_bad_sizes_are_one_line_errors(text):
    with pytest.raises(PowerSampleError, match="--max-memory must be"):
        parse_size(text)


def test_members_multiply_a_chain_and_a_chain_too_big_names_the_figures():
    smc = SamplerConfig(method="power-smc", particles=8, max_new_tokens=10)
    plan = memory.plan(KVLayout(100, (), 2), 10, registry.members(smc), budget=10_000)
    assert plan.per_chain == 2 * 8 * 10 * 100 and plan.chains_at_once == 0
    with pytest.raises(PowerSampleError) as error:
        plan.check()
    message = str(error.value)
    assert "one chain needs 15.6 KiB" in message and "budget 9.8 KiB" in message and "\n" not in message
    assert memory.plan(KVLayout(100, (), 2), 10, 1, 10_000).chains_at_once == 5


# --- admission -----------------------------------------------------------------------------------------------------


def test_a_budget_of_3_chains_runs_8_chains_3_at_a_time_with_the_same_samples():
    budget = 3 * chain_bytes(POWER) + 1  # fits 3 chains, not 4 (the toy's prompt has no ids)
    unlimited, limited = PlannedToy(), PlannedToy()
    want = sample(unlimited, "x", POWER, seed=3, num_samples=8)
    have = sample(limited, "x", POWER, seed=3, num_samples=8, max_memory=budget)
    assert max(unlimited.batch_sizes) == 8 and max(limited.batch_sizes) == 3
    assert same(have, want)


def test_members_count_against_the_budget():
    smc = SamplerConfig(method="power-smc", particles=4, max_new_tokens=8, block_size=4)
    budget = 2 * chain_bytes(smc)  # two chains of 4 particles
    backend = PlannedToy()
    have = sample(backend, "x", smc, seed=1, num_samples=5, max_memory=budget)
    assert max(backend.batch_sizes) == 2 * 4
    assert same(have, sample(PlannedToy(), "x", smc, seed=1, num_samples=5))


def test_sample_many_jobs_share_the_budget_and_keep_their_samples():
    jobs = [("x", 1), ("y", 2), ("z", 3)]
    backend = PlannedToy()
    have = sample_many(backend, jobs, POWER, num_samples=3, max_memory=4 * chain_bytes(POWER))
    want = sample_many(PlannedToy(), jobs, POWER, num_samples=3)
    assert max(backend.batch_sizes) == 4
    assert all(same(h, w) for h, w in zip(have, want))


def test_a_chain_bigger_than_the_budget_is_refused_before_sampling():
    backend = PlannedToy()
    with pytest.raises(PowerSampleError, match="one chain needs"):
        sample(backend, "x", POWER, num_samples=2, max_memory=chain_bytes(POWER) - 1)
    assert backend.batch_sizes == []
    [error] = sample_many(backend, [("x", 0)], POWER, max_memory=10)
    assert isinstance(error, PowerSampleError)


def test_the_continuous_schedule_admits_waiting_chains_as_others_finish():
    from support.toy import ContinuousToy

    toy = ContinuousToy(ToySpec.from_dict(WORDS))
    chains = make_chains(5, 7)
    results: list = []
    size = chain_bytes(POWER)
    work = [Work(p, results.append, size) for p in programs(toy, (), POWER, chains)]
    scheduler = Scheduler(toy, registry.proposal(POWER), budget=2 * size)
    scheduler.run(work)
    assert len(results) == 7 and scheduler.peak_in_flight == 2 and scheduler.in_flight == scheduler.held == 0


# --- before loading ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["sample", "hi"], ["bench", "--quick"]])
def test_a_chain_too_big_is_one_line_and_exit_2_before_loading(command, monkeypatch, capsys):
    from powersample.cli import main, options

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(options.BackendSpec, "load", no_load)
    code = main([*command, "--backend", "hf", "--device", "cpu", "--max-new-tokens", "64", "--max-memory", "1MB"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "one chain needs 8.4 MiB of KV cache (3 buffers x 1 member x 64 tokens x 45.0 KiB/token)" in err
    assert "more than the memory budget 976.6 KiB" in err


def test_a_bad_max_memory_is_exit_2(capsys):
    from powersample.cli import main

    assert main(["sample", "hi", "--backend", "hf", "--max-memory", "lots"]) == 2
    assert "--max-memory must be a size" in capsys.readouterr().err


# --- the server ----------------------------------------------------------------------------------------------------


def test_the_server_queues_chains_within_its_budget_and_refuses_a_chain_that_never_fits():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from support.server import DEFAULTS, serve

    backend = PlannedToy()
    budget = 3 * chain_bytes(DEFAULTS, prompt_tokens=0)
    with serve(backend, max_memory=budget) as url:
        body = {"prompt": "x", "n": 8, "seed": 4}
        resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200 and len(resp.json()["choices"]) == 8
        assert max(backend.batch_sizes) == 3
        too_long = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 200}, timeout=60)
        error = too_long.json()["error"]
        assert too_long.status_code == 400 and error["code"] == "memory_budget" and error["param"] == "max_tokens"
        assert "one chain needs" in error["message"] and "memory budget" in error["message"]
    with serve(PlannedToy()) as url:
        free = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in free["choices"]] == [c["text"] for c in resp.json()["choices"]]


# --- the embedded model --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_embedded_model_runs_8_chains_3_at_a_time_with_the_same_samples():
    from powersample import load_backend

    backend = load_backend("hf", device="cpu")
    config = SamplerConfig(max_new_tokens=2, block_size=1, mcmc_steps=1)
    prompt = "The sky is"  # plain text: three ids to prefill, not the chat template's thirty
    ids = backend.encode(prompt, False)
    per_chain = memory.plan(backend.kv_layout(), len(ids) + 2, 1, None).per_chain
    in_flight = [0, 0]  # rows decoding now, the most at once
    extend = backend.extend_continuous

    def counted(requests, proposal, refill, poll=None):
        def counting_refill(key, cont):
            new = refill(key, cont)
            in_flight[0] += len(new) - 1
            in_flight[1] = max(in_flight)
            return new

        in_flight[:] = [len(requests), len(requests)]
        return extend(requests, proposal, counting_refill, poll)

    want = sample(backend, prompt, config, seed=2, num_samples=8, chat=False)
    backend.extend_continuous = counted
    have = sample(backend, prompt, config, seed=2, num_samples=8, chat=False, max_memory=3 * per_chain)
    assert in_flight == [0, 3]  # three chains start; each later one only as another finishes
    assert [r.tokens for r in have] == [r.tokens for r in want]  # log p up to the batch's numerics (~2e-5 seen)
    assert np.allclose([r.token_logp for r in have], [r.token_logp for r in want], atol=1e-4)


def test_a_gguf_header_with_per_layer_kv_heads_and_key_lengths(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "shape.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_embedding_length(256)
    writer.add_head_count(8)
    writer.add_head_count_kv([2, 4, 8])
    writer.add_key_length(48)
    writer.add_value_length(32)
    writer.add_token_list(["a", "b", "c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_layout(path) == KVLayout((2 + 4 + 8) * (48 + 32) * 2, (), memory.LLAMACPP_BUFFERS)
    with pytest.raises(PowerSampleError, match="cannot read the GGUF metadata"):
        gguf_layout(tmp_path)


def test_the_start_line_says_the_plan_and_the_default_budget_is_a_share_of_free_memory(capsys):
    import argparse

    from powersample.backends.spec import BackendSpec
    from powersample.cli.options import plan_memory

    args = argparse.Namespace(max_memory=None, quiet=False)
    budget = plan_memory(args, BackendSpec("llamacpp"), SamplerConfig(max_new_tokens=100))
    assert budget is not None and 0 < budget <= memory.free_ram()
    err = capsys.readouterr().err
    assert "memory plan: 4.4 MiB per chain (2 buffers x 1 member x 100 tokens x 22.5 KiB/token), budget" in err
    assert plan_memory(argparse.Namespace(max_memory="1GiB", quiet=True), BackendSpec("llamacpp"), SamplerConfig())
    assert capsys.readouterr().err == ""
    toy = BackendSpec("toy", toy_spec="x.json")
    assert plan_memory(argparse.Namespace(max_memory=None, quiet=False), toy, SamplerConfig()) is None
