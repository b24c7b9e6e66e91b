"""The playground page (`GET /`) in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright runs
one power request on the toy backend and must show the non-streamed text for the same seed and at least one
accepted step, under the page's own Content-Security-Policy."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="needs playwright (pip install playwright; the test extra has it)"
)

from support.server import SlowToy, serve

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not shutil.which(CHROMIUM):
    pytest.skip("needs Debian's chromium (apt-get install chromium)", allow_module_level=True)

PROMPT = "the cat"
KNOBS = {"alpha": "2", "mcmc_steps": "3", "block_count": "3", "max_tokens": "12", "seed": "7"}


@contextmanager
def opened(url: str, problems: list | None = None) -> Iterator:
    """The playground at `url` in headless Chromium; console errors and warnings and script errors go to `problems`
    (when given) from before the page loads."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            if problems is not None:
                page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
                page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(url + "/")
            yield page
        finally:
            browser.close()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_the_page_runs_a_chain_live_and_shows_the_final_text(endpoint):
    text = {"prompt": PROMPT} if endpoint == "completions" else {"messages": [{"role": "user", "content": PROMPT}]}
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    with serve(model_name="toy-words") as url:
        want = httpx.post(
            url + path, json={**text, "method": "power", "n": 1, **{k: int(v) for k, v in KNOBS.items()}}
        ).json()
        problems = []
        with opened(url, problems) as page:
            page.fill("#prompt", PROMPT)
            page.select_option("#endpoint", endpoint)
            page.select_option("#method", "power")
            for name, value in KNOBS.items():
                page.fill(f"#{name}", value)
            page.click("#run")
            page.wait_for_selector("body[data-state=done]", timeout=15_000)
            final = page.text_content("#final")
            accepted = page.locator("#steps li.acc").count()
            spans = page.locator("#state span").count()
            circles = page.locator("#chart circle").count()
            extensions = page.locator("#steps li.info").count()
            shown = page.text_content("#n-accepted")
    choice = want["choices"][0]
    assert final == (choice["text"] if endpoint == "completions" else choice["message"]["content"]) and final
    ps = want["power_sampling"]
    assert accepted >= 1 and int(shown) == accepted == ps["accepted"]
    assert spans >= 1 and extensions >= 1 and circles == ps["proposals"] + extensions + 1  # and the end
    assert problems == []  # no CSP violation, no script error


def test_the_page_shows_base_sampling_as_it_is_drawn():
    """base streams its tokens as they are drawn ("draw" trace events and text chunks): the live state grows one
    span, and the final text is the non-streamed one."""
    with serve(model_name="toy-words") as url:
        want = httpx.post(
            url + "/v1/completions", json={"prompt": PROMPT, "method": "base", "max_tokens": 12, "seed": 7}
        ).json()["choices"][0]["text"]
        with opened(url) as page:
            page.fill("#prompt", PROMPT)
            page.select_option("#endpoint", "completions")
            page.select_option("#method", "base")
            page.fill("#max_tokens", "12")
            page.fill("#seed", "7")
            page.click("#run")
            page.wait_for_selector("body[data-state=done]", timeout=15_000)
            final, state = page.text_content("#final"), page.text_content("#state")
            spans, steps = page.locator("#state span").count(), page.locator("#steps li").count()
    assert final == want and state == want and want  # the toy's words decode token by token
    assert spans == 1 and steps == 0


def test_the_page_shows_a_refused_request_as_one_line():
    with serve(model_name="toy-words") as url:
        with opened(url) as page:
            page.fill("#alpha", "-1")
            page.click("#run")
            page.wait_for_selector("#error:not(:empty)", timeout=10_000)
            error = page.text_content("#error")
    assert error.startswith("error 400: ") and "alpha" in error and "\n" not in error


def test_the_page_sends_the_api_key_and_stop_frees_the_chain():
    with serve(SlowToy(delay=0.01), api_key="sekret") as url:
        with opened(url) as page:
            page.select_option("#method", "power")
            page.fill("#mcmc_steps", "200")
            page.click("#run")
            page.wait_for_selector("#error:not(:empty)", timeout=10_000)
            refused = page.text_content("#error")
            page.fill("#key", "sekret")
            page.click("#run")
            page.wait_for_selector("#steps li.acc, #steps li.rej", timeout=10_000)  # the chain is running
            page.click("#stop")
            page.wait_for_selector("body[data-state=stopped]", timeout=10_000)
            status, kept = page.text_content("#status"), page.evaluate("sessionStorage.length")
        state = idle(url, {"authorization": "Bearer sekret"})  # the page's request was aborted: its chain stopped
    assert refused.startswith("error 401: ") and status == "stopped." and kept == 1
    assert state["chains_in_flight"] == 0 and state["requests_running"] == 0


def idle(url: str, headers: dict, within: float = 10.0) -> dict:
    deadline = time.monotonic() + within
    while True:
        state = httpx.get(f"{url}/health", headers=headers).json()
        if state["chains_in_flight"] == 0 and state["requests_running"] == 0 or time.monotonic() > deadline:
            return state
        time.sleep(0.05)
