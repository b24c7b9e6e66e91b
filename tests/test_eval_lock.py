"""One writer per records file: a second writer is refused wherever it runs, reading the records
does not free the lock, and a forked child does not keep it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.eval_toy import eval_argv, write_jsonl, write_spec

from powersample.errors import PowerSampleError
from powersample.eval.records import RecordWriter, load_records, repair_tail

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def spec(tmp_path) -> Path:
    return write_spec(tmp_path)


# --- E1: one writer per records file ------------------------------------------------------------------------------


def test_a_second_writer_in_the_same_process_is_refused_even_after_reads(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"problem_id": "a", "seed": 0}\n')  # an existing file: the writer repairs its tail
    with RecordWriter(path) as writer:
        load_records(tmp_path)  # reading the records (resume) must not free the lock
        repair_tail(path)
        with pytest.raises(PowerSampleError, match="another eval is writing"):
            RecordWriter(path)
        writer.write({"problem_id": "b", "seed": 0})
    with RecordWriter(path) as writer:  # free once closed
        writer.write({"problem_id": "c", "seed": 0})
    assert [r["problem_id"] for r in load_records(tmp_path)] == ["a", "b", "c"]


HOLD = """
import sys
from pathlib import Path
from powersample.eval.records import RecordWriter, load_records
with RecordWriter(Path(sys.argv[1])) as w:
    load_records(Path(sys.argv[1]).parent)
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_writer_in_another_process_is_refused(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"problem_id": "a", "seed": 0}\n')
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"locked\n"  # the handshake: the other process holds the lock
        with pytest.raises(PowerSampleError, match="another eval is writing"):
            RecordWriter(path)
    finally:
        holder.communicate(b"\n", timeout=60)
    assert holder.returncode == 0
    with RecordWriter(path) as writer:
        writer.write({"problem_id": "b", "seed": 0})
    assert path.read_text().count("\n") == 2


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """The math grader forks a worker that can outlive its parent: once the parent lets go (or is killed), the lock
    must be free, though the worker still runs."""
    path = tmp_path / "records.jsonl"
    writer = RecordWriter(path)
    from_parent, to_child = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: say it runs, wait for the parent's word, then leave
        try:
            os.write(to_parent, b"r")
            os.read(from_parent, 1)
        finally:
            os._exit(0)
    assert os.read(from_child, 1) == b"r"  # the handshake: the child is past fork
    try:
        writer.close()  # the parent is done; the child lives on
        with RecordWriter(path) as again:
            again.write({"problem_id": "a", "seed": 0})
    finally:
        os.write(to_child, b"x")
        os.waitpid(pid, 0)
        for fd in (from_parent, to_child, from_child, to_parent):
            os.close(fd)
    assert [r["problem_id"] for r in load_records(tmp_path)] == ["a"]


def test_two_evals_on_one_directory(spec, tmp_path):
    """The same eval twice on one directory (the reported failure). The second is refused with one line naming
    the directory, before loading the model; the first loses nothing and writes every record once."""
    data = write_jsonl(tmp_path / "math.jsonl", [{"problem": f"q{i}", "answer": "1"} for i in range(40)])
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "powersample.cli", *eval_argv(spec, data, out, "--seeds", "0-4")]
    argv.remove("--quiet")  # the progress bar appears once the first run holds the lock: the handshake
    first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = b""
        while b"math500 power" not in seen:
            chunk = first.stderr.read1(4096)
            assert chunk, f"the first run ended early: {seen.decode()[-500:]}"
            seen += chunk
        first.send_signal(signal.SIGSTOP)  # it holds the lock and cannot finish while the second one runs
        assert first.poll() is None
        second = subprocess.run(argv + ["--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    _, rest = first.communicate(timeout=300)
    assert first.returncode == 0, rest.decode()[-500:]
    assert second.returncode == 2 and second.stdout == ""
    assert second.stderr.count("\n") == 1 and "another eval is writing" in second.stderr
    assert str(out) in second.stderr, second.stderr
    lines = (out / "records.jsonl").read_text().splitlines()
    keys = [(r["problem_id"], r["seed"]) for r in map(json.loads, lines)]
    assert len(keys) == len(set(keys)) == 200
