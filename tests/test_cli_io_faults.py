"""Issue 24: a full disk and a stdout that was never opened. A write the disk refuses is one line and exit 2, and
leaves no torn line; an append after a torn line starts on a fresh one; `>&-` exits as a closed pipe does (141),
after the records are written. The full disk is faked: the write or fsync of powersample.io raises ENOSPC."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from support.eval_toy import eval_argv, write_jsonl, write_spec

from powersample import io
from powersample.cli import main
from powersample.errors import PowerSampleError
from powersample.eval.records import load_records

REPO = Path(__file__).resolve().parent.parent
TOY = ["--backend", "toy", "--toy-spec", str(REPO / "powersample" / "toy_specs" / "early_eos.json")]


def full_disk(monkeypatch, *, after: int = 0, what: str = "write") -> None:
    """powersample.io's os, whose `what` (write or fsync) fails with ENOSPC from its (after + 1)-th call on; a
    failing write first writes half its bytes, as a disk filling up does."""
    calls = {"n": 0}

    def write(fd: int, data) -> int:
        calls["n"] += 1
        if calls["n"] <= after:
            return os.write(fd, data)
        if len(data) > 1 and calls["n"] == after + 1:
            return os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)

    fake = types.SimpleNamespace(**vars(os))
    setattr(fake, what, write if what == "write" else fsync)
    monkeypatch.setattr(io, "os", fake)


def one_line_error(code: int, capsys, *words: str) -> str:
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and err.startswith("powersample: error:"), (code, err)
    assert "Traceback" not in err and all(w in err for w in words), err
    return err


# --- appends: no torn line after a failure, a fresh line after a torn one -----------------------------------------


@pytest.mark.parametrize("what", ["write", "fsync"])
def test_a_failed_append_leaves_the_file_as_it_was(what, tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    io.append_jsonl(path, [{"a": 1}])
    before = path.read_bytes()
    full_disk(monkeypatch, what=what)
    with pytest.raises(PowerSampleError, match="No space left on device") as e:
        io.append_jsonl(path, [{"a": 2}, {"a": 3}])
    assert "\n" not in str(e.value) and path.read_bytes() == before


def test_an_append_after_a_torn_line_starts_on_a_fresh_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b"')  # a writer killed mid-line
    io.append_jsonl(path, [{"a": 3}])
    lines = path.read_text().splitlines()
    assert lines[0] == '{"a": 1}' and json.loads(lines[-1]) == {"a": 3} and path.read_text().endswith("\n")


def test_sample_output_on_a_full_disk_is_one_line_and_the_next_append_is_whole(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["sample", "x", *TOY, "--quiet", "--output", str(out)]) == 0
    capsys.readouterr()
    full_disk(monkeypatch)  # the up-front check (an empty append) writes nothing; the records' write fails
    one_line_error(
        main(["sample", "x", *TOY, "--quiet", "--output", str(out), "--seed", "1"]),
        capsys,
        str(out),
        "No space left on device",
    )
    assert len(out.read_text().splitlines()) == 1 and out.read_text().endswith("\n")
    monkeypatch.undo()  # the disk has room again
    assert main(["sample", "x", *TOY, "--quiet", "--output", str(out), "--seed", "2"]) == 0
    assert [json.loads(line)["seed"] for line in out.read_text().splitlines()] == [0, 2]


# --- eval, report, bench ------------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", [{"problem": f"q{i}", "answer": "1"} for i in range(4)])
    return write_spec(tmp_path), data


@pytest.mark.parametrize("what", ["write", "fsync"])
def test_eval_on_a_full_disk_is_one_line_and_resumes(what, files, tmp_path, monkeypatch, capsys):
    spec, data = files
    out = tmp_path / "run"
    full_disk(monkeypatch, after=1 if what == "write" else 2, what=what)  # one record (and run.json's fsync)
    one_line_error(main(eval_argv(spec, data, out, "--batch", "1")), capsys, "No space left on device")
    text = (out / "records.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 1  # the first record; nothing torn
    monkeypatch.undo()
    assert main(eval_argv(spec, data, out, "--batch", "1")) == 0
    assert len(load_records(out)) == 4


def test_eval_cannot_write_run_json_on_a_full_disk(files, tmp_path, monkeypatch, capsys):
    spec, data = files
    full_disk(monkeypatch, what="fsync")
    one_line_error(main(eval_argv(spec, data, tmp_path / "run")), capsys, "run.json", "No space left on device")
    assert not (tmp_path / "run").exists()


def test_report_on_a_full_disk_is_one_line(files, tmp_path, monkeypatch, capsys):
    spec, data = files
    assert main(eval_argv(spec, data, tmp_path / "run")) == 0
    capsys.readouterr()
    full_disk(monkeypatch, what="fsync")
    code = main(["report", str(tmp_path / "run"), "--plot-dir", str(tmp_path / "plots")])
    one_line_error(code, capsys, "No space left on device")
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "plots").iterdir())


def test_bench_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    full_disk(monkeypatch, what="fsync")
    code = main(["bench", "--quick", *TOY, "--quiet", "--json", str(tmp_path / "bench.json")])
    one_line_error(code, capsys, "bench.json", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_stdout_on_a_full_disk_is_one_line(tmp_path):
    """/dev/full: a real device whose every write fails with ENOSPC."""
    out = tmp_path / "records.jsonl"
    argv = [sys.executable, "-m", "powersample.cli", "sample", "x", *TOY, "--quiet", "--output", str(out)]
    with open("/dev/full", "w") as full:
        done = subprocess.run(argv, cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "powersample: error: cannot write: No space left on device\n"
    assert len(out.read_text().splitlines()) == 1


# --- a stdout never opened (`>&-`) --------------------------------------------------------------------------------


def closed_stdout(argv: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI with descriptor 1 closed before it starts (the shell's `>&-`)."""
    command = " ".join(f"'{a}'" for a in [sys.executable, "-m", "powersample.cli", *argv]) + " >&-"
    return subprocess.run(["bash", "-c", command], cwd=REPO, stderr=subprocess.PIPE, text=True, timeout=300)


def test_sample_with_stdout_never_opened_is_quiet_and_keeps_the_records(tmp_path):
    out = tmp_path / "records.jsonl"
    done = closed_stdout(["sample", "x", *TOY, "--quiet", "--output", str(out), "--num-samples", "3"])
    assert done.returncode == 141 and done.stderr == "", done.stderr
    assert [json.loads(line)["sample_index"] for line in out.read_text().splitlines()] == [0, 1, 2]


def test_report_with_stdout_never_opened_is_quiet(files, tmp_path):
    spec, data = files
    assert main(eval_argv(spec, data, tmp_path / "run")) == 0
    plots = tmp_path / "plots"
    done = closed_stdout(["report", str(tmp_path / "run"), "--plot-dir", str(plots)])
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and (plots / "report.md").exists()
