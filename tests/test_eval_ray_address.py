"""Issue 24: `eval --ray ADDRESS` with an address that cannot be one is refused at once, and with one where nothing
answers within distributed.CONNECT_TIMEOUT, where Ray alone waits minutes: one line, exit 2, no run directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.eval_toy import eval_argv, write_jsonl, write_spec

from powersample.cli import main
from powersample.eval import distributed

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parent.parent
NOWHERE = "192.0.2.77:6379"  # TEST-NET-1 (RFC 5737): a connection hangs or finds no route (10.255.255.1 is answered
# by this sandbox's network proxy, so it would test Ray's own timeout instead)


@pytest.fixture
def argv(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", [{"problem": "q", "answer": "1"}])
    return lambda address: eval_argv(write_spec(tmp_path), data, tmp_path / "run", "--ray", address)


def closed_port() -> int:
    """A local port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(argv, capsys, *words) -> float:
    """Run the CLI; check one line and exit 2; return the seconds it took."""
    start = time.monotonic()
    code = main(argv)
    took = time.monotonic() - start
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("powersample: error:"), (code, err)
    assert all(w in err for w in words), err
    return took


@pytest.mark.parametrize("address", ["999.1.1.1:1", "10.0.0.1:99999", "10.0.0.1", "[::zz]:1", "a b:1", ":6379"])
def test_an_address_that_cannot_be_one_is_refused_at_once(address, argv, tmp_path, capsys):
    assert refused(argv(address), capsys, "bad Ray address") < 5
    assert not (tmp_path / "run").exists()


def test_a_refused_address_is_one_line_at_once(argv, tmp_path, capsys):
    address = f"127.0.0.1:{closed_port()}"
    assert refused(argv(address), capsys, "cannot connect to the Ray cluster at", address) < 5
    assert not (tmp_path / "run").exists()


def test_an_address_that_never_answers_is_refused_within_the_timeout(argv, tmp_path, capsys, monkeypatch):
    """The bound is cut to 1 s here."""
    monkeypatch.setattr(distributed, "CONNECT_TIMEOUT", 1.0)
    assert refused(argv(NOWHERE), capsys, f"cannot connect to the Ray cluster at {NOWHERE}") < 5
    assert not (tmp_path / "run").exists()


def test_ray_address_from_the_environment_is_checked_too(argv, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    assert refused(argv(""), capsys, "cannot connect to the Ray cluster at 127.0.0.1") < 5


def test_the_stated_bound_holds_on_the_command_line(argv):
    """The real bound (10 s, as --ray's help says), in a fresh process: Ray would wait minutes."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "powersample.cli", *argv(NOWHERE)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert time.monotonic() - start < distributed.CONNECT_TIMEOUT + 15
