"""What the llamacpp backend finds out by trying: whether llama.cpp decodes this model here without crashing (a child
process, `powersample.backends.probe`), and whether this model's kernels round alike at every batch shape (the
decode layout, `kernels.choose_layout`). Both findings are cached per engine build, CPU, model file and kernel
settings."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from powersample.backends import probe
from powersample.backends.llamacpp.context import N_BATCH, Item, logits, new_context, submit
from powersample.backends.llamacpp.files import Weights, model_path
from powersample.backends.llamacpp.kernels import (
    BATCH_TOKENS,
    Layout,
    Placement,
    choose_layout,
    native_opted_in,
    placement,
    tiled_setting,
)
from powersample.backends.llamacpp.library import import_llama_cpp

PROBE_PREFIX, PROBE_TAIL, PROBE_STREAMS = 8, BATCH_TOKENS, 16  # the layout probe's shapes (`rows_disagree`)
PROBE_CHILD = "import sys; from powersample.backends.llamacpp import probe_child; probe_child(sys.argv[1])"


# -- the crash probe ------------------------------------------------------------------------------------------------


def probe_outcome(model: str | None, quant: str | None = None) -> probe.Outcome:
    """Whether llama.cpp loads and decodes this model here without crashing: a child process (`probe_child`) tries
    it once per (llama.cpp build, CPU, model file, placement), and the outcome is cached."""
    llama_cpp = import_llama_cpp()
    path = model_path(llama_cpp, model, quant)
    return probe.probe(probe_key(llama_cpp, path, placement(native_opted_in())), _probe_command(path))


def _probe_command(path: Path) -> list[str]:
    return [sys.executable, "-c", PROBE_CHILD, str(path)]


def probe_key(llama_cpp: Any, path: Path, where: Placement) -> dict[str, str]:
    """What a probe's finding depends on: the engine build, the CPU, the model file, where its weights go and
    whether llama.cpp's tiled matmul is on."""
    library = Path(llama_cpp.__file__).parent / "lib"
    builds = sorted(
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
        for f in library.iterdir()
        if f.is_file() and not f.is_symlink()
    )
    source = path.resolve()
    return {
        "engine": f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}",
        "build": ";".join(builds),
        "cpu": _cpu_identity(),
        "model": f"{source}:{source.stat().st_size}:{source.stat().st_mtime_ns}",
        "placement": where.label,
        "tiled": tiled_setting(),
    }


def _cpu_identity() -> str:
    """The CPU's model name and feature flags (Linux: /proc/cpuinfo), else what the platform module says."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        info = []
    fields: dict[str, str] = {}
    for line in info:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    flags = hashlib.sha256(fields.get("flags", "").encode()).hexdigest()[:16]
    return f"{platform.machine()}|{fields.get('model name', platform.processor())}|{flags}"


# -- the layout probe -----------------------------------------------------------------------------------------------


def layout_for(lib: Any, weights: Weights, n_vocab: int, quiet: bool) -> Layout:
    """The decode layout (kernels.choose_layout); the probe's finding is cached per engine build, CPU, model file
    and kernel settings."""
    native, threads, experts = weights.native, weights.threads, weights.experts
    if native or threads > 1 or experts:
        return choose_layout(native, threads, None, experts)
    key = {**probe_key(lib, weights.path, weights.placement), "finding": "rows-agree"}

    def run() -> dict[str, str | None]:
        if not quiet:
            print(
                f"powersample: checking once whether {weights.path.name}'s llama.cpp kernels round alike at "
                "every batch shape ...",
                file=sys.stderr,
                flush=True,
            )
        return {"disagreement": rows_disagree(lib, weights, n_vocab)}

    found = probe.remembered(key, run)
    return choose_layout(native, threads, found.get("disagreement"))


def rows_disagree(lib: Any, weights: Weights, n_vocab: int) -> str | None:
    """Where this model's logits depend on how many rows a micro-batch carries; None when nowhere.

    The same PROBE_TAIL ids after a shared prefix are decoded one per llama_decode (the reference), j at once in
    one sequence (j = 2 .. PROBE_TAIL: a prefill's or a draft's shape), and the first of them in n sequences at
    once (n = 2 .. PROBE_STREAMS: a batch of chains); every logit must be bit-equal to the reference's. The kernels
    are chosen by row count alone, so these shapes cover every choice a micro-batch of up to BATCH_TOKENS tokens
    can make. A temporary context; about 80 decodes.
    """
    ids = [int(t) for t in np.random.default_rng(0).integers(0, n_vocab, PROBE_PREFIX + PROBE_TAIL)]
    prefix, tail = ids[:PROBE_PREFIX], ids[PROBE_PREFIX:]
    ctx, _ = new_context(lib, weights, len(ids), n_seq=PROBE_STREAMS + 1, micro_batch=BATCH_TOKENS)
    batch = lib.llama_batch_init(N_BATCH, 0, 1)
    run = _Probe(lib, ctx, batch, n_vocab)
    try:
        submit(lib, ctx, batch, [(t, i, 0, False) for i, t in enumerate(prefix)])
        want = [run.logits([(t, PROBE_PREFIX + i, 0, True)])[0] for i, t in enumerate(tail)]
        for j in range(2, PROBE_TAIL + 1):
            got = run.logits([(t, PROBE_PREFIX + i, 1, True) for i, t in enumerate(tail[:j])], (1,))
            if (gap := _gap(got, want[:j])) is not None:
                return f"{j} tokens of one sequence vs 1: max |logit change| {gap:.3g}"
        for n in range(2, PROBE_STREAMS + 1):
            got = run.logits([(tail[0], PROBE_PREFIX, s, True) for s in range(1, n + 1)], range(1, n + 1))
            if (gap := _gap(got, want[:1] * n)) is not None:
                return f"{n} sequences vs 1: max |logit change| {gap:.3g}"
        return None
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)


class _Probe:
    """The layout probe's temporary context."""

    def __init__(self, lib: Any, ctx: Any, batch: Any, n_vocab: int):
        self.lib, self.ctx, self.batch, self.n_vocab = lib, ctx, batch, n_vocab
        self.memory = lib.llama_get_memory(ctx)

    def logits(self, items: list[Item], fresh: Sequence[int] = ()) -> list[np.ndarray]:
        """The raw logits of one llama_decode of `items`, after resetting the `fresh` sequences to sequence 0's
        prefix (PROBE_PREFIX tokens)."""
        for seq_id in fresh:
            self.lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
            self.lib.llama_memory_seq_cp(self.memory, 0, seq_id, -1, -1)
            self.lib.llama_memory_seq_rm(self.memory, seq_id, PROBE_PREFIX, -1)
        submit(self.lib, self.ctx, self.batch, items)
        return [logits(self.lib, self.ctx, i, self.n_vocab).copy() for i in range(len(items))]


def _gap(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float | None:
    """None when every row of `got` is bit-equal to its row of `want`, else the largest difference."""
    if all(np.array_equal(g, w) for g, w in zip(got, want)):
        return None
    return max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
