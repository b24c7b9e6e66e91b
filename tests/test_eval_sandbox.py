"""The sandbox that runs generated code: a program that loops, allocates 10 GB, writes outside its directory,
opens a socket or floods its output fails cleanly, and the next program runs normally."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import time

import pytest

from powersample.eval import sandbox

LEVELS = ["none"] + ([sandbox.isolation_level()] if sandbox.isolation_level() != "none" else [])
LIMITS = sandbox.Limits(timeout=2.0, memory_mb=512)


def run(source: str, level: str, limits: sandbox.Limits = LIMITS) -> sandbox.ExecResult:
    return sandbox.run_python(source, limits, level=level)


@pytest.mark.parametrize("level", LEVELS)
def test_a_normal_program_passes_and_a_failing_one_fails(level):
    assert run("x = [i * i for i in range(10)]\nassert x[3] == 9\nprint('ok')", level).passed
    result = run("assert 1 == 2, 'nope'", level)
    assert result.status == "failed" and "AssertionError: nope" in result.detail


@pytest.mark.parametrize("level", LEVELS)
def test_an_infinite_loop_times_out_and_the_run_goes_on(level):
    start = time.perf_counter()
    result = run("while True:\n    pass\n", level)
    assert result.status in ("timed out", "failed") and not result.passed  # wall timeout or the CPU rlimit
    assert time.perf_counter() - start < 15
    assert run("print('next')", level).passed


@pytest.mark.parametrize("level", LEVELS)
def test_allocating_10_gb_fails_cleanly(level):
    result = run("x = bytearray(10 * 1024 ** 3)\nx[-1] = 1\n", level)
    assert result.status == "failed" and "MemoryError" in result.detail
    assert run("x = bytearray(10 * 1024 ** 2)", level).passed  # 10 MB is fine


@pytest.mark.parametrize("level", LEVELS)
def test_writing_outside_its_directory_fails(level, tmp_path):
    targets = [tmp_path / "escaped.txt", os.path.join(tempfile.gettempdir(), f"powersample-escape-{os.getpid()}")]
    for target in targets:
        result = run(f"open({str(target)!r}, 'w').write('pwned')", level)
        assert not result.passed and not os.path.exists(target), result
    assert not run("open('../escaped.txt', 'w').write('x')", level).passed
    assert not run(f"import os\nos.remove({sys.executable!r})", level).passed
    assert os.path.exists(sys.executable)
    assert run("open('inside.txt', 'w').write('x')\nassert open('inside.txt').read() == 'x'", level).passed


@pytest.mark.parametrize("level", LEVELS)
def test_no_network_no_processes_no_signals(level):
    for source in [
        "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)",
    ]:
        assert not run(source, level).passed, source


@pytest.mark.parametrize("level", LEVELS)
def test_flooding_the_output_is_cut_off(level):
    flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    result = run(flood, level, sandbox.Limits(timeout=10, file_mb=4))
    assert not result.passed


def test_temporary_directories_are_removed():
    pattern = os.path.join(tempfile.gettempdir(), "powersample-sandbox-*")
    before = set(glob.glob(pattern))
    run("open('f.txt', 'w').write('x')", LEVELS[-1])
    run("while True: pass", LEVELS[-1], sandbox.Limits(timeout=1))
    assert set(glob.glob(pattern)) <= before


@pytest.mark.skipif(LEVELS[-1] == "none", reason="no mount/network namespaces (unshare) on this machine")
def test_the_kernel_barrier_holds_without_the_audit_hook(tmp_path):
    """The namespaces alone stop writes outside the directory and the network (no Python guard involved)."""
    base = tempfile.mkdtemp(prefix="powersample-sandbox-test-")
    try:
        work = sandbox._prepare(base, "", LEVELS[-1])
        target = tmp_path / "escaped.txt"
        code = "\n".join(
            [
                "import socket",
                f"try:\n    open({str(target)!r}, 'w')\nexcept OSError as e:\n    print('write', e.errno)",
                "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)",
                "except OSError as e:\n    print('net', e.errno)",
                "open('inside.txt', 'w').write('x')\n",
            ]
        )
        command = sandbox._isolation_prefix(work, LEVELS[-1]) + [sys.executable, "-I", "-c", code]
        out = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "write" in out.stdout and "net" in out.stdout and not target.exists()
        assert os.path.exists(os.path.join(work, "inside.txt"))
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
