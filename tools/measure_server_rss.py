"""Peak RSS of `powersample serve` while it runs many chains at once on the embedded model.

Starts the server in a subprocess, sends `--requests` chat completions of n = `--n` chains each at once (64 chains by
default, max_tokens T = 192), and reads the server process's VmHWM (peak resident set) and VmRSS from /proc while
they run. Prints one JSON object: the peak, the chains, their tokens, the wall time and the server's stderr start
lines (the engine and the memory plan).

    python tools/measure_server_rss.py [--backend auto|hf|llamacpp] [--requests 8] [--n 8] [--max-tokens 192]
        [--max-memory SIZE] [--mcmc-steps 1] [--block-count 4]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

PROMPT = "Write a long story about a lighthouse keeper and the sea, with many details."


def main() -> int:
    args = _parse()
    port = _free_port()
    command = [sys.executable, "-m", "powersample.cli", "serve", "--port", str(port), "--backend", args.backend]
    command += ["--max-new-tokens", str(args.max_tokens), "--mcmc-steps", str(args.mcmc_steps)]
    command += ["--block-count", str(args.block_count), "--request-timeout", "3600"]
    command += ["--max-tokens-limit", str(args.max_tokens)] + (
        ["--max-memory", args.max_memory] if args.max_memory else []
    )
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_up(url, server)
        base = _status(server.pid)
        peak = {"rss": 0}
        done = threading.Event()
        watcher = threading.Thread(target=_watch, args=(server.pid, peak, done), daemon=True)
        watcher.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(args.requests) as pool:
            messages = [{"role": "user", "content": PROMPT}]
            bodies = [
                {"messages": messages, "n": args.n, "max_tokens": args.max_tokens, "seed": i}
                for i in range(args.requests)
            ]
            answers = list(pool.map(lambda body: _post(url, body), bodies))
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
        end = _status(server.pid)
    finally:
        server.terminate()
        _, err = server.communicate(timeout=60)
    tokens = [c["usage"]["completion_tokens"] for c in answers]
    print(
        json.dumps(
            {
                "chains": args.requests * args.n,
                "max_tokens": args.max_tokens,
                "mcmc_steps": args.mcmc_steps,
                "block_count": args.block_count,
                "completion_tokens": sum(tokens),
                "finish_reasons": sorted({c["finish_reason"] for a in answers for c in a["choices"]}),
                "wall_seconds": round(wall, 1),
                "rss_before_mb": base["VmRSS"] // 1024,
                "rss_peak_while_running_mb": peak["rss"] // 1024,
                "vmhwm_mb": end["VmHWM"] // 1024,
                "server_stderr": [line for line in err.splitlines() if line.startswith("powersample:")],
            },
            indent=1,
        )
    )
    return 0


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--mcmc-steps", type=int, default=1)
    p.add_argument("--block-count", type=int, default=4)
    p.add_argument("--max-memory")
    return p.parse_args()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, server: subprocess.Popen, within: float = 300) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read() if server.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not start")


def _post(url: str, body: dict) -> dict:
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=3600)
    if resp.status_code != 200:
        raise SystemExit(f"the server answered {resp.status_code}: {resp.text}")
    return resp.json()


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


def _watch(pid: int, peak: dict, done: threading.Event) -> None:
    while not done.wait(0.2):
        peak["rss"] = max(peak["rss"], _status(pid)["VmRSS"])  # KiB


if __name__ == "__main__":
    raise SystemExit(main())
