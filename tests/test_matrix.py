"""The model matrix (powersample.tools.matrix, `powersample conformance --matrix`): our GGUF writer, the conversions'
agreement with transformers, llama.cpp's quantized copies, the runner, the support table and the command line.

The fast lane runs a slice of the matrix: llama at Q4_1 on llamacpp and gemma3 on hf (its sliding window is shorter
than the prompt). The whole matrix is marked `matrix`: every supported cell must pass every conformance check. The
models are built once per machine into the cache (about 10 s each, the first time).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from powersample.backends import conformance
from powersample.cli import main
from powersample.errors import PowerSampleError

pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from powersample.tools.matrix import (
    ARCHS,
    MatrixOptions,
    convert,
    models,
    promises,
    render_table,
    run_matrix,
    total_units,
)
from powersample.tools.matrix import agreement as agree
from powersample.tools.matrix.archs import SHAPE, WINDOW, config_kwargs
from powersample.tools.matrix.cells import FP32, PROMPT, Cell, cells, not_built
from powersample.tools.matrix.run import (
    FAIL,
    NOT_APPLICABLE,
    PASS,
    CellResult,
    MatrixResult,
    Outcome,
    failure_line,
)

CONVERTED = [a for a in ARCHS.values() if a.gguf_arch]


@pytest.fixture(scope="module")
def tokenizer_gguf():
    from powersample.backends.embedded import embedded_gguf_path

    try:
        return embedded_gguf_path()
    except PowerSampleError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A GGUF holding only a three-token tokenizer: the writer's metadata tests read back in milliseconds (a file with
    the embedded 49k vocabulary takes gguf's reader about 5 s)."""
    path = tmp_path_factory.mktemp("tok") / "tok.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_token_types([3, 1, 1])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_chat_template("{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def config_of(arch):
    from transformers import AutoConfig

    return AutoConfig.for_model(arch.model_type, **config_kwargs(arch))


def fields(path) -> dict:
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


def failures(result: MatrixResult) -> str:
    """The failures and conversions of a result, for an assertion's message."""
    return render_table(result)


# --- the GGUF writer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", CONVERTED, ids=lambda a: a.name)
def test_the_writer_gives_each_arch_the_keys_its_loader_reads(arch, tiny_tokenizer, tmp_path):
    config = config_of(arch)
    convert.write_gguf(arch, config, {}, tmp_path / "m.gguf", tiny_tokenizer)  # metadata only
    have = fields(tmp_path / "m.gguf")
    name = have["general.architecture"]
    assert name == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]]
    assert arch.name not in have["general.name"] and "phi3" not in have["general.name"]  # llama.cpp keys on it
    assert have["general.file_type"] == gguf.LlamaFileType.ALL_F32
    want = {
        "context_length": 512,
        "embedding_length": 256,
        "block_count": config.num_hidden_layers,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.key_length": 64,
        "attention.value_length": 64,
        "rope.dimension_count": 64,
        "vocab_size": SHAPE["vocab_size"],
    }
    assert {k: have[f"{name}.{k}"] for k in want} == want
    assert have[f"{name}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert have["tokenizer.ggml.tokens"] == ["<s>", "a", "b"] and have["tokenizer.ggml.merges"] == ["a b"]
    assert have["tokenizer.chat_template"] == "{{ messages }}" and have["tokenizer.ggml.bos_token_id"] == 0
    if arch.window:
        assert have[f"{name}.attention.sliding_window"] == WINDOW
        assert have[f"{name}.attention.sliding_window_pattern"] == [
            t == "sliding_attention" for t in config.layer_types
        ]
    else:
        assert not [k for k in have if "sliding_window" in k]


@pytest.mark.slow
def test_the_embedded_tokenizer_is_copied_key_for_key(tokenizer_gguf, tmp_path):
    arch = ARCHS["llama"]
    convert.write_gguf(arch, config_of(arch), {}, tmp_path / "m.gguf", tokenizer_gguf)
    have = fields(tmp_path / "m.gguf")
    want = {key: value for key, value, _, _ in convert.tokenizer_fields(tokenizer_gguf)}
    assert len(want["tokenizer.ggml.tokens"]) == SHAPE["vocab_size"] and "tokenizer.chat_template" in want
    assert {k: v for k, v in have.items() if k.startswith("tokenizer.")} == want


def test_gemma_layers_slide_as_in_transformers_and_gemma3_has_two_rope_bases(tiny_tokenizer, tmp_path):
    for name, pattern in (("gemma2", [True, False]), ("gemma3", [True] * 5 + [False])):
        arch = ARCHS[name]
        convert.write_gguf(arch, config_of(arch), {}, tmp_path / f"{name}.gguf", tiny_tokenizer)
        have = fields(tmp_path / f"{name}.gguf")
        assert have[f"{name}.attention.sliding_window_pattern"] == pattern
    gemma2, gemma3 = fields(tmp_path / "gemma2.gguf"), fields(tmp_path / "gemma3.gguf")
    assert gemma2["gemma2.attn_logit_softcapping"] == 50.0 and gemma2["gemma2.final_logit_softcapping"] == 30.0
    assert gemma3["gemma3.rope.freq_base"] == 1e6 and gemma3["gemma3.rope.freq_base_swa"] == 1e4
    assert "gemma3.final_logit_softcapping" not in gemma3


def test_moe_keys(tiny_tokenizer, tmp_path):
    arch = ARCHS["qwen3_moe"]
    convert.write_gguf(arch, config_of(arch), {}, tmp_path / "m.gguf", tiny_tokenizer)
    have = fields(tmp_path / "m.gguf")
    assert (have["qwen3moe.expert_count"], have["qwen3moe.expert_used_count"]) == (4, 2)
    assert have["qwen3moe.expert_feed_forward_length"] == 256


@pytest.mark.parametrize("arch", CONVERTED, ids=lambda a: a.name)
def test_every_tensor_gets_a_gguf_name(arch):
    model = models.build_model(arch)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    written = dict(convert.gguf_tensors(arch, model.config, state))
    split = sum(name.endswith("experts.gate_up_proj") for name in state)  # each becomes gate and up
    assert len(written) == len(state) - model.config.tie_word_embeddings + split
    assert all(name.endswith((".weight", ".bias")) for name in written)
    assert ("output.weight" in written) == (not model.config.tie_word_embeddings)
    if arch.norm_offset:  # gemma: every norm is w + 1
        np.testing.assert_array_equal(
            written["blk.0.attn_norm.weight"], state["model.layers.0.input_layernorm.weight"] + 1
        )


def test_moe_experts_are_split_gate_first():
    arch = ARCHS["qwen3_moe"]
    model = models.build_model(arch)
    fused = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"].numpy()  # (E, 2I, H)
    written = dict(convert.gguf_tensors(arch, model.config, {"model.layers.1.mlp.experts.gate_up_proj": fused}))
    np.testing.assert_array_equal(written["blk.1.ffn_gate_exps.weight"], fused[:, :256])
    np.testing.assert_array_equal(written["blk.1.ffn_up_exps.weight"], fused[:, 256:])


def test_rope_rows_permuted_make_pairwise_rotation_equal_half_rotation():
    """HF rotates (x_i, x_{i+d/2}); llama.cpp's normal rope rotates (x_2i, x_2i+1). With q's rows reordered by
    rope_interleaved, llama.cpp's rotation of the reordered q is HF's rotation of q, reordered."""
    rng = np.random.default_rng(0)
    heads, d = 3, 8
    q = rng.normal(size=heads * d)
    angles = rng.uniform(0, 6, size=d // 2)
    cos, sin = np.cos(angles), np.sin(angles)

    def hf_rope(x):  # halves
        a, b = x[: d // 2], x[d // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin])

    def pairs_rope(x):  # consecutive pairs
        a, b = x[0::2], x[1::2]
        out = np.empty_like(x)
        out[0::2], out[1::2] = a * cos - b * sin, b * cos + a * sin
        return out

    want = convert.rope_interleaved(np.concatenate([hf_rope(h) for h in q.reshape(heads, d)]), heads)
    have = np.concatenate([pairs_rope(h) for h in convert.rope_interleaved(q, heads).reshape(heads, d)])
    np.testing.assert_allclose(have, want, atol=1e-12)
    bias_like = np.arange(heads * d)
    assert sorted(convert.rope_interleaved(bias_like, heads)) == list(bias_like)  # a permutation


def test_an_arch_without_a_gguf_says_why(tiny_tokenizer, tmp_path):
    arch = ARCHS["mistral"]
    with pytest.raises(PowerSampleError, match="no sliding window"):
        convert.write_gguf(arch, config_of(arch), {}, tmp_path / "m.gguf", tiny_tokenizer)


# --- built files, conversions, quants ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tokenizer_gguf):
    pytest.importorskip("llama_cpp")
    return models.built(ARCHS["llama"])


@pytest.fixture(scope="module")
def gemma3(tokenizer_gguf):
    pytest.importorskip("llama_cpp")
    return models.built(ARCHS["gemma3"])


def test_built_once_and_reused(llama, monkeypatch):
    monkeypatch.setattr(models, "_build", lambda *a: pytest.fail("rebuilt a built model"))
    assert models.built(ARCHS["llama"]) == llama
    assert (llama.hf / "model.safetensors").is_file() and (llama.hf / "tokenizer.json").is_file()
    assert llama.gguf().is_file()
    assert not [p for p in llama.folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    other = replace(ARCHS["llama"], init=0.3)
    assert models.content_key(other) != models.content_key(ARCHS["llama"])


def test_both_engines_tokenize_alike(llama):
    from powersample.backends.hf import HFBackend
    from powersample.backends.llamacpp import LlamaCppBackend

    hf = HFBackend.load(str(llama.hf), device="cpu", dtype="float32")
    cpp = LlamaCppBackend.load(str(llama.gguf()), n_ctx=512)
    try:
        for text in (PROMPT, "Écris un poème sur la mer 🌊\n  x<|im_end|>y"):
            assert hf.encode(text, chat=True) == cpp.encode(text, chat=True)
            assert hf.encode(text, chat=False) == cpp.encode(text, chat=False)
        assert hf.eos_ids == cpp.eos_ids == {2}
        assert len(hf.encode(PROMPT, chat=True)) > WINDOW  # every check runs past the window
    finally:
        cpp.close()


def test_weights_are_seeded():
    a, b = models.build_model(ARCHS["qwen3"]), models.build_model(ARCHS["qwen3"])
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert (x == y).all(), name


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_the_conversion_agrees_with_transformers(name, llama, gemma3):
    files = {"llama": llama, "gemma3": gemma3}[name]
    measured = agree.agreement(files)
    assert measured.ok, measured
    assert measured.positions == agree.SEQUENCES * (agree.LENGTH - 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, change",
    [("llama", {"interleaved_rope": False}), ("gemma3", {"norm_offset": 0.0}), ("gemma3", "a window twice too wide")],
)
def test_a_wrong_conversion_is_caught(name, change, llama, gemma3, tokenizer_gguf, tmp_path, monkeypatch):
    """The agreement check is not blind: without the rope permutation or the norms' + 1 the gap is nats, not
    hundredths; with the wrong window it is right within the window and wrong past it."""
    files = {"llama": llama, "gemma3": gemma3}[name]
    arch = files.arch
    if isinstance(change, dict):
        arch = replace(arch, **change)
    else:

        def too_wide(writer, config):
            writer.add_sliding_window(2 * config.sliding_window)
            writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])

        monkeypatch.setattr(convert, "_sliding", too_wide)
    model = models.build_model(files.arch)
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    convert.write_gguf(arch, model.config, tensors, tmp_path / "wrong.gguf", tokenizer_gguf)
    wrong = agree.measure(files.hf, tmp_path / "wrong.gguf")
    assert not wrong.ok and wrong.max_gap > 10 * agree.TOLERANCE
    if not isinstance(change, dict):
        assert wrong.max_gap_in_window <= agree.TOLERANCE


def test_q4_k_m_is_llama_cpps_mix_and_q4_0_is_pure(gemma3):
    mix = models.tensor_types(models.quantized(gemma3, "q4_k_m"))
    assert models.tensor_types(gemma3.gguf("q4_k_m")) == mix  # read once, then from its .types.json
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(mix)  # FFN rows of 640 fall back from Q4_K / Q6_K
    pure = models.tensor_types(models.quantized(gemma3, "q4_0"))
    assert set(pure) == {"F32", "Q4_0"}  # norms stay F32
    assert models.quantized(gemma3, "q4_0") == gemma3.gguf("q4_0")  # made once, beside its source


# --- cells, options, outcomes ------------------------------------------------------------------------------------


def test_every_cell_is_planned_and_unbuilt_ones_say_why():
    planned = cells(("hf", "llamacpp", "vllm"), tuple(ARCHS), ("q4_0", "q4_k_m"))
    assert len(planned) == len(ARCHS) * (1 + 2 + 1)
    assert Cell("hf", "gemma3", FP32) in planned and Cell("llamacpp", "gemma3", "q4_k_m") in planned
    assert "sliding window" in not_built(Cell("llamacpp", "mistral", "q4_0"))
    assert "vLLM" in not_built(Cell("vllm", "llama", FP32))
    assert not_built(Cell("hf", "mistral", FP32)) == ""


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"archs": ("llama", "nope")}, "unknown arch 'nope'"),
        ({"engines": ("tgi",)}, "unknown engine 'tgi'"),
        ({"quants": ("q3_k",)}, "unknown quant 'q3_k'"),
        ({"archs": ()}, "no arch given"),
        ({"quants": ("q4_0", "q4_0")}, "given twice"),
        ({"threads": 0}, "threads must be >= 1"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(PowerSampleError, match=message) as e:
        MatrixOptions(**kwargs)
    assert "\n" not in str(e.value)


def test_a_failure_is_one_line_saying_what_broke():
    try:
        conformance._close([0.0, 1.0], [0.0, 1.5], 1e-4, "score vs extend")
    except AssertionError as e:
        line = failure_line(e)
    assert line.startswith("score vs extend; Mismatched elements: 1 / 2") and "0.5" in line and "\n" not in line
    crash = RuntimeError("The size of tensor a (20)\nmust match")
    assert failure_line(crash) == "RuntimeError: The size of tensor a (20)"
    assert failure_line(AssertionError("EOS before the last token")) == "EOS before the last token"


def test_the_table_names_failures_not_applicable_checks_and_unbuilt_cells():
    checks = ("alpha", "beta")
    ok = CellResult(Cell("hf", "llama", FP32), "", (Outcome("alpha", PASS), Outcome("beta", NOT_APPLICABLE, "no x")))
    bad = CellResult(
        Cell("hf", "gemma3", FP32),
        "",
        (Outcome("alpha", FAIL, "IndexError: boom"), Outcome("beta", FAIL, "IndexError: boom")),
    )
    unbuilt = [CellResult(Cell("llamacpp", "mistral", q), "no window here") for q in ("q4_0", "q8_0")]
    result = MatrixResult(MatrixOptions(), "now", checks, (), (ok, bad, *unbuilt), 1.0)
    table = render_table(result)
    assert not result.ok and "1 cells fail" in table
    assert "| hf | llama | fp32 | ✓ | – | pass" in table
    assert "| hf | gemma3 | fp32 | ✗ | ✗ | **2 failed**" in table
    assert "- hf gemma3 fp32, checks 1, 2: IndexError: boom" in table
    assert "- 2 `beta` on hf llama fp32: no x" in table
    assert "| llamacpp | mistral | q4_0, q8_0 |" in table and "not built here: no window here" in table
    assert MatrixResult(MatrixOptions(), "now", checks, (), (ok, *unbuilt), 1.0).ok


# --- the runner and the command line on a slice -----------------------------------------------------------------


def assert_every_check_passes(result: MatrixResult) -> None:
    built = [c for c in result.cells if not c.not_built]
    assert built, "no cell was built"
    for c in built:
        assert [o.check for o in c.outcomes] == list(result.checks)
    assert result.ok, failures(result)
    assert all(o.status == PASS or (o.status == NOT_APPLICABLE and o.reason) for c in built for o in c.outcomes)


@pytest.mark.slow
def test_slice_llama_q4_1_on_llamacpp(llama):
    options = MatrixOptions(engines=("llamacpp",), archs=("llama",), quants=("q4_1",))
    ticks = []
    result = run_matrix(options, lambda what, n: ticks.append(n))
    assert sum(ticks) == total_units(options) == 1 + 1 + len(conformance.CHECKS) + len(promises.PROMISES)
    assert_every_check_passes(result)
    [report] = result.archs
    assert report.agreement is not None and report.agreement.ok
    assert set(report.sizes) == {"hf", "f32", "q4_1"} and report.tensor_types == {}  # types: of mixes only


@pytest.mark.slow
def test_slice_gemma3_on_hf_past_its_window(gemma3):
    """gemma3's sliding layers see 32 tokens; the prompt alone is longer."""
    result = run_matrix(MatrixOptions(engines=("hf",), archs=("gemma3",)))
    assert_every_check_passes(result)


def test_llama_cpps_own_kernels_fail_the_invariance_and_the_promises(gemma3, monkeypatch):
    """The mutation: POWERSAMPLE_LLAMACPP_NATIVE=1 (repacked Q4_K, batched) on gemma3's Q4_K_M mix."""
    monkeypatch.setenv("POWERSAMPLE_LLAMACPP_NATIVE", "1")
    checks = (conformance.log_p_is_batch_invariant, *promises.PROMISES)
    result = run_matrix(MatrixOptions(engines=("llamacpp",), archs=("gemma3",), quants=("q4_k_m",)), checks=checks)
    [cell] = result.cells
    assert [o.status for o in cell.outcomes] == [FAIL] * len(checks), render_table(result)


def test_the_command_prints_the_table_and_exits_1_on_a_failure(llama, tmp_path, monkeypatch, capsys):
    def passes(s):
        pass

    def fails(s):
        raise AssertionError("the log p moved\nsecond line")

    def does_not_apply(s):
        raise conformance.NotApplicable("needs a thing")

    monkeypatch.setattr(conformance, "CHECKS", (passes, fails, does_not_apply))
    monkeypatch.setattr(promises, "PROMISES", ())
    argv = [
        "conformance",
        "--matrix",
        "--engines",
        "llamacpp,vllm",
        "--archs",
        "llama, mistral",
        "--quants",
        "q4_1",
        "--json",
        str(tmp_path / "m.json"),
        "--quiet",
    ]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "| llamacpp | llama | q4_1 | ✓ | ✗ | – |" in out
    assert "- llamacpp llama q4_1, check 2: the log p moved" in out and "- 3 `does_not_apply`" in out
    assert "| llamacpp | mistral | q4_1 |" in out and "| vllm | llama, mistral | fp32 |" in out
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["ok"] is False and saved["checks"] == ["passes", "fails", "does_not_apply"]
    monkeypatch.setattr(conformance, "CHECKS", (passes, does_not_apply))
    assert main(argv[:-3] + ["--quiet"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give --matrix"),
        (["--matrix", "--archs", "llama,falcon"], "unknown arch 'falcon'"),
        (["--matrix", "--quants", "q2_k"], "unknown quant 'q2_k'"),
        (["--matrix", "--engines", "hf,ollama"], "unknown engine 'ollama'"),
        (["--matrix", "--json", "/no/such/dir/m.json"], "cannot write"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(["conformance", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# --- the whole matrix --------------------------------------------------------------------------------------------


@pytest.mark.matrix
def test_every_supported_cell_passes_every_check(tokenizer_gguf):
    result = run_matrix(MatrixOptions())
    unbuilt = [c for c in result.cells if c.not_built]
    assert {c.cell.engine for c in unbuilt} >= {"vllm"} and all(c.not_built for c in unbuilt)
    assert {c.cell for c in unbuilt if c.cell.engine == "llamacpp"} == {
        Cell("llamacpp", "mistral", q) for q in result.options.quants
    }
    assert all(a.agreement is not None for a in result.archs if ARCHS[a.arch].gguf_arch)
    assert_every_check_passes(result)
