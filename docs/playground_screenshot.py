"""Screenshot of the playground (docs/images/playground.png, in serving.md): `powersample serve` on the embedded model
(SmolLM2-135M-Instruct, llama.cpp backend), one finished power run in headless Chromium.

    python docs/playground_screenshot.py [--out docs/images/playground.png] [--chromium /usr/bin/chromium] [--seed 1]

Needs the llamacpp and serve extras, `pip install playwright` and Debian's `chromium` (no `playwright install`).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import httpx
from playwright.sync_api import sync_playwright

PROMPT = "Write one sentence about the sea."
KNOBS = {"alpha": "4", "mcmc_steps": "4", "block_count": "4", "max_tokens": "48", "seed": "1"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/images/playground.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--backend", default="llamacpp")
    ap.add_argument("--seed", default=KNOBS["seed"])
    args = ap.parse_args()
    KNOBS["seed"] = args.seed
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from powersample.cli import main; main()",
            "serve",
            "--quiet",
            "--backend",
            args.backend,
            "--port",
            str(port),
        ]
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server)
        shoot(url, args.chromium, args.out)
    finally:
        server.terminate()
        server.wait(30)
    print(f"wrote {args.out}")
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, within: float = 300.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"powersample serve exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not start in time")


def shoot(url: str, chromium: str, out: str) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url + "/")
            page.fill("#prompt", PROMPT)
            page.select_option("#method", "power")
            for name, value in KNOBS.items():
                page.fill(f"#{name}", value)
            page.click("#run")
            page.wait_for_selector("body[data-state=done]", timeout=600_000)
            page.screenshot(path=out, full_page=True)
        finally:
            browser.close()


if __name__ == "__main__":
    sys.exit(main())
