"""A memory soak: 500 mixed hostile requests against `powersample serve` on the embedded model (llama.cpp, one
thread), with the server's RSS sampled throughout. Once the first WARMUP ordinary requests have run, the server's
idle RSS at the end must stay within GROWTH_LIMIT of its idle RSS then: room grown for a long request is given back
when its run ends (backends/llamacpp/__init__.py, "Memory").

The mix, in bursts of CONCURRENCY: prompts near --max-context (token ids), prompts past it (400), echo + logprobs
scoring of long prompts, many-turn chats, n=16, power sampling, big max_tokens that the server's --request-timeout
stops (504), and clients that disconnect mid-request. It prints the RSS curve (seconds, MB):

    python -m pytest tests/test_server_soak.py -s
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
REQUESTS, WARMUP, CONCURRENCY = 500, 50, 8
MAX_CONTEXT = 2048  # the server's --max-context: a room of 2048 x 33 sequences is 1.5 GB on SmolLM2-135M
TIMEOUT = 5.0  # the server's --request-timeout (s): stops the big-max_tokens requests (504)
GROWTH_LIMIT = 1.5  # final idle RSS / post-warm-up idle RSS
VOCAB_IDS = range(1000, 40000)  # ordinary ids of SmolLM2's vocabulary, for token-id prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """The process's resident set (psutil when installed, else /proc/<pid>/status VmRSS)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RSS for the server")


class Sampler(threading.Thread):
    """(seconds since start, RSS bytes) of `pid` every `every` seconds until stopped."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.points, self.start_time = pid, every, [], time.monotonic()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.points.append((time.monotonic() - self.start_time, rss_bytes(self.pid)))
            self.done.wait(self.every)


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.choice(VOCAB_IDS) for _ in range(n)]


def ordinary(i: int) -> dict:
    """A warm-up request: short prompts and chats, up to ~900 tokens of room (the backend keeps up to 1024)."""
    rng = random.Random(i)
    kind = i % 5
    if kind == 0 and i % 10 == 0:
        return {"path": "completions", "prompt": ids(rng, 700), "max_tokens": 4, "method": "base"}
    if kind == 1:
        return {"path": "chat/completions", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 8}
    if kind == 2:
        return {"path": "completions", "prompt": f"Count to {i}:", "max_tokens": 6, "n": 4, "method": "base"}
    if kind == 3:
        return {
            "path": "completions",
            "prompt": f"Say {i}",
            "max_tokens": 8,
            "logprobs": 2,
            "method": "power",
            "mcmc_steps": 2,
            "block_size": 4,
        }
    return {"path": "completions", "prompt": ids(rng, 300), "max_tokens": 0, "echo": True, "logprobs": 1}


def hostile(i: int) -> dict:
    """One of the soak's requests (`timeout`: the client's own, after which it disconnects)."""
    rng = random.Random(10_000 + i)
    kind = i % 20
    if kind == 0 and i % 120 == 0:  # near the limit
        return {
            "path": "completions",
            "prompt": ids(rng, MAX_CONTEXT - 8 - rng.randrange(200)),
            "max_tokens": 4,
            "method": "base",
        }
    if kind == 1:  # past it: 400
        return {"path": "completions", "prompt": ids(rng, MAX_CONTEXT), "max_tokens": 16, "expect": (400,)}
    if kind == 2 and i % 80 == 2:  # echo + logprobs scoring of a long prompt
        return {
            "path": "completions",
            "prompt": ids(rng, 1100 + rng.randrange(300)),
            "max_tokens": 0,
            "echo": True,
            "logprobs": 1,
        }
    if kind == 3:  # a many-turn chat
        turns = [{"role": ["user", "assistant"][t % 2], "content": "hi"} for t in range(20 + rng.randrange(40))]
        return {"path": "chat/completions", "messages": turns, "max_tokens": 2, "method": "base"}
    if kind == 4:
        return {"path": "completions", "prompt": f"List {i} things", "max_tokens": 3, "n": 16, "method": "base"}
    if kind == 5 and i % 100 == 5:  # big max_tokens: the server's --request-timeout stops it (504)
        return {"path": "completions", "prompt": "Tell a long story.", "max_tokens": 400, "method": "base"}
    if kind == 6:  # a client that leaves mid-request
        return {"path": "completions", "prompt": ids(rng, 200), "max_tokens": 48, "method": "base", "timeout": 0.3}
    if kind == 7:
        return {
            "path": "completions",
            "prompt": f"Think {i}",
            "max_tokens": 4,
            "method": "power",
            "mcmc_steps": 1,
            "block_size": 2,
            "logprobs": 1,
        }
    if kind == 8:
        return {
            "path": "chat/completions",
            "messages": [{"role": "user", "content": f"q{i}"}],
            "max_tokens": 4,
            "logprobs": True,
            "top_logprobs": 2,
            "stream": True,
        }
    return {"path": "completions", "prompt": f"x{i}", "max_tokens": 1 + i % 4, "method": "base", "seed": i}


def send(http: httpx.Client, url: str, request: dict) -> str:
    """The outcome of one request: its status code, or 'left' when the client disconnected. Any request may get 504
    (its wait in the queue counts against the timeout), none a 500."""
    body = {k: v for k, v in request.items() if k not in ("path", "expect", "timeout")}
    timeout = request.get("timeout", 120.0)
    try:
        resp = http.post(f"{url}/v1/{request['path']}", json=body, timeout=timeout)
    except httpx.TimeoutException:
        if "timeout" in request:
            return "left"
        raise
    status = resp.status_code
    assert status in (*request.get("expect", (200,)), 504), (request["path"], status, resp.text[:300])
    if status == 400:
        assert resp.json()["error"]["code"] == "context_length_exceeded"
    return str(status)


def idle_rss(http: httpx.Client, url: str, pid: int) -> int:
    """The server's RSS once nothing is left in its engine (a run has ended)."""
    deadline = time.monotonic() + 120
    while any(http.get(f"{url}/health").json()[k] for k in ("chains_in_flight", "calls_in_flight")):
        assert time.monotonic() < deadline, "the engine never went idle"
        time.sleep(0.2)
    time.sleep(1.0)  # the engine thread gives the room back as its run returns
    return rss_bytes(pid)


def curve(points: list[tuple[float, int]], every: float = 5.0) -> str:
    """The RSS curve, one point per `every` seconds (the largest sample in each window), as 't s: MB'."""
    windows: dict[int, int] = {}
    for t, rss in points:
        windows[int(t // every)] = max(windows.get(int(t // every), 0), rss)
    return ", ".join(f"{w * every:.0f}s:{rss / 1e6:.0f}" for w, rss in sorted(windows.items()))


def test_memory_stays_bounded_under_500_hostile_requests(tmp_path):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "powersample.cli",
        "serve",
        "--backend",
        "llamacpp",
        "--threads",
        "1",
        "--port",
        str(port),
        "--max-context",
        str(MAX_CONTEXT),
        "--request-timeout",
        str(TIMEOUT),
        "--max-new-tokens",
        "8",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url, start = f"http://127.0.0.1:{port}", time.monotonic()
    outcomes: list[str] = []
    try:
        with httpx.Client(limits=httpx.Limits(max_connections=CONCURRENCY * 2)) as http:
            wait_until_up(http, url, server)
            sampler = Sampler(server.pid)
            sampler.start()
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                outcomes += pool.map(lambda i: send(http, url, ordinary(i)), range(WARMUP))
                warm = idle_rss(http, url, server.pid)
                warm_at = time.monotonic() - sampler.start_time
                order = list(range(REQUESTS - WARMUP))
                random.Random(0).shuffle(order)
                outcomes += pool.map(lambda i: send(http, url, hostile(i)), order)
            final = idle_rss(http, url, server.pid)
            sampler.done.set()
            sampler.join()
            assert http.get(f"{url}/health").json()["engine_alive"]
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=60)
    counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    peak = max(rss for _, rss in sampler.points)
    print(
        f"\nsoak: {len(outcomes)} requests in {time.monotonic() - start:.0f} s, outcomes {counts}; RSS idle after "
        f"warm-up (t={warm_at:.0f} s) {warm / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB, idle at the end "
        f"{final / 1e6:.0f} MB ({final / warm:.2f}x)\nRSS curve (s:MB, max per 5 s): {curve(sampler.points)}"
    )
    assert len(outcomes) == REQUESTS and "Traceback" not in err, err[-2000:]
    assert final <= GROWTH_LIMIT * warm, f"RSS grew from {warm / 1e6:.0f} MB to {final / 1e6:.0f} MB"


def wait_until_up(http: httpx.Client, url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            if http.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, server.communicate()[1][-2000:]
        time.sleep(0.2)
