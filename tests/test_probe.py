"""The engine probe: a native engine's first run on a machine happens in a child process; a crash there makes
`auto` fall back to hf with one line, and an explicit llamacpp a one-line error, never a crash of ours.

A child that kills itself with SIGSEGV stands in for llama.cpp crashing (as it does on AMX CPUs)."""

from __future__ import annotations

import signal
import sys

import pytest

from powersample.backends import probe
from powersample.errors import PowerSampleError

SEGFAULT = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
FAILS = [sys.executable, "-c", "import sys; print('first line', file=sys.stderr); sys.exit('no such engine')"]
WORKS = [sys.executable, "-c", "pass"]
KEY = {"engine": "test 1.0", "cpu": "x86_64|test", "model": "m.gguf:1:2", "placement": "default:0"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POWERSAMPLE_CACHE", str(tmp_path))
    return tmp_path


def counting(tmp_path, then: str) -> list[str]:
    """A child that appends a line to a file each time it runs, then does `then`."""
    counter = tmp_path / "runs.txt"
    code = f"open({str(counter)!r}, 'a').write('ran\\n'); {then}"
    return [sys.executable, "-c", code]


def runs(tmp_path) -> int:
    counter = tmp_path / "runs.txt"
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_a_crashing_child_is_reported_by_its_signal():
    outcome = probe.probe(KEY, SEGFAULT)
    assert not outcome.ok and outcome.detail == "killed by SIGSEGV"
    assert outcome.path.is_file()


def test_a_failing_child_is_reported_with_its_last_line():
    outcome = probe.probe(KEY, FAILS)
    assert not outcome.ok and outcome.detail == "exit code 1: no such engine"


def test_a_hanging_child_times_out():
    outcome = probe.probe(KEY, [sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5)
    assert not outcome.ok and outcome.detail.startswith("timed out")


def test_the_outcome_is_cached_per_key(tmp_path):
    crash = counting(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert not probe.probe(KEY, crash).ok
    assert not probe.probe(KEY, crash).ok and runs(tmp_path) == 1  # the second call reads the cache
    assert probe.probe({**KEY, "model": "other.gguf:1:2"}, counting(tmp_path, "pass")).ok  # another key: probed
    assert runs(tmp_path) == 2


def test_an_unreadable_cache_file_means_probing_again(tmp_path):
    first = probe.probe(KEY, WORKS)
    first.path.write_text("{not json")
    assert probe.probe(KEY, counting(tmp_path, "pass")).ok and runs(tmp_path) == 1


# -- the llamacpp backend's use of it ------------------------------------------------------------------------------


@pytest.fixture
def crashing_llamacpp(monkeypatch):
    """The llamacpp backend with its probe child replaced by one that segfaults."""
    pytest.importorskip("llama_cpp")
    from powersample.backends import llamacpp
    from powersample.backends.embedded import embedded_gguf_path

    try:
        embedded_gguf_path()
    except PowerSampleError as e:
        pytest.skip(str(e))
    monkeypatch.setattr(llamacpp.probing, "_probe_command", lambda path: SEGFAULT)
    monkeypatch.setattr("powersample.backends.spec._has_cuda", lambda: False)
    return llamacpp


def test_auto_falls_back_to_hf_with_one_line_when_the_probe_crashes(crashing_llamacpp, capsys):
    from powersample.backends import BackendSpec

    assert BackendSpec().resolved().name == "hf"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "crashed" in lines[0] and "SIGSEGV" in lines[0] and "hf" in lines[0]


def test_explicit_llamacpp_is_refused_in_one_line_when_the_probe_crashes(crashing_llamacpp):
    from powersample.backends import load_backend

    with pytest.raises(PowerSampleError, match="SIGSEGV") as err:
        load_backend("llamacpp")
    assert "\n" not in str(err.value) and "--backend hf" in str(err.value)


@pytest.mark.slow
def test_the_real_probe_passes_here(monkeypatch):
    """On this machine (AMX or not) the safe placement decodes in a child: auto keeps llama.cpp."""
    pytest.importorskip("llama_cpp")
    from powersample.backends import BackendSpec, llamacpp

    monkeypatch.setattr("powersample.backends.spec._has_cuda", lambda: False)
    try:
        outcome = llamacpp.probe_outcome(None)
    except PowerSampleError as e:
        pytest.skip(str(e))
    assert outcome.ok, outcome.detail
    assert BackendSpec().resolved().name == "llamacpp"


@pytest.mark.slow
def test_sample_command_falls_back_and_answers(crashing_llamacpp, capsys):
    """`powersample sample` with the default --backend auto on a machine where llama.cpp crashes: hf answers."""
    pytest.importorskip("transformers")
    from powersample.cli import main

    code = main(
        ["sample", "What is 2+2?", "--max-new-tokens", "4", "--block-count", "1", "--mcmc-steps", "1", "--quiet"]
    )
    out, err = capsys.readouterr()
    assert code == 0 and out.strip()
    assert [line for line in err.splitlines() if "crashed" in line] == [err.splitlines()[0]]
    assert signal.SIGSEGV.name in err
