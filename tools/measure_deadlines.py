"""Re-measure issue 24's table: how long the engine stays busy after a request's 504.

Starts `powersample serve` (a toy on toy_specs/no_early_eos.json, then the embedded model on llama.cpp at one thread)
with --request-timeout 10, sends each big request, and polls /health until no chain and no call is in flight. One
small request is sent 2 s into each big one; its latency is printed too.

    python tools/measure_deadlines.py [--only toy|embedded]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

TIMEOUT = 10
TOY = [
    ("base n 16, 16 prompts, 4096 tokens", {"prompt": ["hi"] * 16, "method": "base", "n": 16, "max_tokens": 4096}),
    ("the same with logprobs 5", {"prompt": ["hi"] * 16, "method": "base", "n": 16, "max_tokens": 4096, "logprobs": 5}),
    ("scoring 100k ids (echo, logprobs 0)", {"prompt": [0] * 100_000, "max_tokens": 0, "echo": True, "logprobs": 0}),
    (
        "bon, bon_tokens 4e9, block 1",
        {"prompt": "hi", "method": "bon", "bon_tokens": 4_000_000_000, "block_size": 1, "max_tokens": 4096},
    ),
    (
        "power n 16, 1000 steps, block 1",
        {"prompt": "hi", "method": "power", "n": 16, "mcmc_steps": 1000, "block_size": 1, "max_tokens": 4096},
    ),
]
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 900)  # about 8,100 tokens
EMBEDDED = [
    ("base, 2 prompts x n 16 x 4096 tokens", {"prompt": ["hi", "ho"], "method": "base", "n": 16, "max_tokens": 4096}),
    (
        "echo + logprobs 5, 2 prompts of ~8,100 tokens",
        {"prompt": [LONG, LONG + " ok"], "max_tokens": 0, "echo": True, "logprobs": 5},
    ),
    ("power, 4096 tokens, 1000 steps", {"prompt": "hi", "method": "power", "mcmc_steps": 1000, "max_tokens": 4096}),
]
INNOCENT = {"prompt": "hi", "method": "base", "max_tokens": 2}


def start(args: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "powersample.cli",
            "serve",
            "--port",
            str(port),
            "--request-timeout",
            str(TIMEOUT),
            "--quiet",
            *args,
        ],
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def busy(base: str) -> bool:
    health = httpx.get(f"{base}/health", timeout=30).json()
    return bool(health.get("chains_in_flight") or health.get("calls_in_flight"))


def measure(base: str, name: str, body: dict) -> dict:
    innocent: dict = {}

    def send() -> None:
        time.sleep(2)
        t0 = time.monotonic()
        r = httpx.post(f"{base}/v1/completions", json=INNOCENT, timeout=120)
        innocent.update(status=r.status_code, at=time.monotonic(), took=time.monotonic() - t0)

    thread = threading.Thread(target=send)
    thread.start()
    t0 = time.monotonic()
    resp = httpx.post(f"{base}/v1/completions", json=body, timeout=300)
    answered = time.monotonic()
    while busy(base):
        time.sleep(0.05)
    idle = time.monotonic() - answered
    thread.join()
    return {
        "request": name,
        "status": resp.status_code,
        "answered_after_s": round(answered - t0, 2),
        "engine_busy_after_answer_s": round(idle, 2),
        "innocent_status": innocent["status"],
        "innocent_latency_s": round(innocent["took"], 2),
    }


def run(label: str, args: list[str], cases: list, port: int) -> None:
    proc = start(args, port)
    try:
        for name, body in cases:
            print(json.dumps({"server": label, **measure(f"http://127.0.0.1:{port}", name, body)}), flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["toy", "embedded"])
    only = parser.parse_args().only
    spec = os.path.join(os.path.dirname(__file__), "..", "powersample", "toy_specs", "no_early_eos.json")
    if only in (None, "toy"):
        run(
            "toy",
            ["--backend", "toy", "--toy-spec", spec, "--max-body-bytes", "2000000", "--max-context", "200000"],
            TOY,
            8931,
        )
    if only in (None, "embedded"):
        run("embedded llama.cpp, 1 thread", ["--backend", "llamacpp", "--threads", "1"], EMBEDDED, 8932)


if __name__ == "__main__":
    main()
