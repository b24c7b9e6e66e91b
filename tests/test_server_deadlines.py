"""A deadline is a deadline, for every kind of work: a request past its request timeout (or whose client left) frees
the engine within one forward, whether its work is plain chains, bon rounds, rollouts, MCMC chains, or scoring and
ranking calls; and an innocent request sent meanwhile is answered as soon as the big one stops (or before: calls take
turns with chains). Toy backend on a spec whose EOS has probability 0, so nothing ends early."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from support.server import serve

import powersample
from powersample.backends.toy import ToyBackend, ToySpec
from powersample.config import SamplerConfig
from powersample.server.protocol import Limits

NO_EOS = Path(powersample.__file__).parent / "toy_specs" / "no_early_eos.json"
TIMEOUT = 1.5  # the server's request timeout, seconds
IDLE_WITHIN = 2.0  # the engine is idle this soon after the 504
INNOCENT_WITHIN = 1.0
FORWARD = 0.0005  # an innocent request is answered this soon after the big one's 504
LIMITS = Limits(
    request_timeout=TIMEOUT,
    max_body_bytes=2_000_000,
    max_work=2**24,
    max_queued_work=2**25,
    max_queued_chains=300,
    max_context=500_000,
)
BIG = {
    "base n 16": {"prompt": ["hi"] * 16, "method": "base", "n": 16, "max_tokens": 4096},
    "base with logprobs": {"prompt": ["hi"] * 16, "method": "base", "n": 16, "max_tokens": 4096, "logprobs": 3},
    "scoring 400k ids": {"prompt": [0] * 400_000, "max_tokens": 0, "echo": True, "logprobs": 0},
    "scoring with alternatives": {"prompt": [0] * 300_000, "max_tokens": 0, "echo": True, "logprobs": 3},
    "bon": {"prompt": "hi", "method": "bon", "bon_tokens": 4_000_000, "block_size": 1, "max_tokens": 4096},
    "power": {"prompt": "hi", "method": "power", "n": 16, "mcmc_steps": 1000, "block_size": 1, "max_tokens": 4096},
    "mtm": {"prompt": "hi", "method": "power-mtm", "mcmc_steps": 1000, "block_size": 4, "max_tokens": 4096},
    "smc": {"prompt": "hi", "method": "power-smc", "particles": 64, "max_tokens": 4096, "block_size": 1},
    "rollout": {"prompt": "hi", "method": "power-rollout", "candidates": 8, "rollouts": 8, "max_tokens": 4096},
}
INNOCENT = {"prompt": "hi", "method": "base", "max_tokens": 2}


def engine_busy(base: str) -> bool:
    health = httpx.get(f"{base}/health", timeout=10).json()
    return bool(health["chains_in_flight"] or health["calls_in_flight"])


def idle_after(base: str, since: float) -> float:
    """Seconds from `since` until the engine has nothing in flight (fails the test past IDLE_WITHIN + 5 s)."""
    while engine_busy(base):
        assert time.monotonic() - since < IDLE_WITHIN + 5, "the engine still works for a request that timed out"
        time.sleep(0.02)
    return time.monotonic() - since


class SlowToy(ToyBackend):
    """The toy at FORWARD seconds per next-token row, sampled or scored: every big request takes minutes unless the
    engine stops it."""

    def _table(self, generated, proposal):
        time.sleep(FORWARD)
        return super()._table(generated, proposal)

    def score(self, context, continuation):
        time.sleep(FORWARD * len(continuation))
        return super().score(context, continuation)


@pytest.fixture(scope="module")
def url():
    defaults = SamplerConfig(max_new_tokens=8, block_size=4, mcmc_steps=2)
    with serve(SlowToy(ToySpec.load(NO_EOS)), defaults=defaults, limits=LIMITS) as base:
        yield base


@pytest.mark.parametrize("kind", list(BIG))
def test_a_timed_out_request_frees_the_engine_and_the_innocent_are_served(url, kind):
    innocent: dict = {}

    def send_innocent() -> None:
        time.sleep(0.3)  # while the big one runs
        resp = httpx.post(f"{url}/v1/completions", json=INNOCENT, timeout=30)
        innocent.update(status=resp.status_code, at=time.monotonic())

    sender = threading.Thread(target=send_innocent)
    sender.start()
    resp = httpx.post(f"{url}/v1/completions", json=BIG[kind], timeout=60)
    stopped = time.monotonic()
    assert resp.status_code == 504, resp.text[:300]
    assert resp.json()["error"]["code"] == "timeout"
    assert idle_after(url, stopped) < IDLE_WITHIN
    sender.join(30)
    assert innocent["status"] in (200, 504)  # sent 0.3 s in, its own deadline falls 0.3 s after the big one's
    if innocent["status"] == 200:
        assert innocent["at"] - stopped < INNOCENT_WITHIN


def test_a_client_that_leaves_frees_the_engine(url):
    """A scoring call whose client hangs up is stopped at its next chunk, like a chain at its next forward."""
    for body in (BIG["scoring 400k ids"], BIG["base n 16"]):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
        assert idle_after(url, time.monotonic()) < IDLE_WITHIN


def test_scoring_work_is_budgeted():
    """Scoring counts in the work budget: prompt tokens x (1 + logprobs); over the per-request limit is a 400."""
    limits = Limits(max_work=1000, request_timeout=30)
    with serve(ToyBackend(ToySpec.load(NO_EOS)), limits=limits) as base:
        ok = httpx.post(
            f"{base}/v1/completions",
            json={"prompt": [0] * 200, "max_tokens": 0, "echo": True, "logprobs": 3},
            timeout=30,
        )
        over = httpx.post(
            f"{base}/v1/completions",
            json={"prompt": [0] * 300, "max_tokens": 0, "echo": True, "logprobs": 3},
            timeout=30,
        )
    assert ok.status_code == 200, ok.text[:300]
    assert over.status_code == 400 and over.json()["error"]["code"] == "over_limit"
    assert "1200" in over.json()["error"]["message"] and over.json()["error"]["param"] == "prompt"


def test_the_engine_releases_memory_whenever_it_goes_idle_not_between_turns():
    """ReleasesMemory: called once the engine has nothing waiting or running, not between a long call's steps."""
    import queue

    from powersample.server.engine import Call, Engine

    class Releasing(ToyBackend):
        releases: list[int] = []

        def release_memory(self):
            self.releases.append(len(steps_done))

    steps_done: list[int] = []

    def steps():
        for k in range(5):
            steps_done.append(k)
            yield
        return "scored"

    backend, got = Releasing(ToySpec.load(NO_EOS)), queue.Queue()
    engine = Engine(backend)
    engine.start()
    try:
        engine.call(Call(steps, time.monotonic() + 10, got.put))
        assert got.get(timeout=10) == "scored"
        deadline = time.monotonic() + 5
        while backend.releases[-1:] != [5] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.releases[-1] == 5 and set(backend.releases) <= {0, 5}  # idle before and after, never between
    finally:
        engine.close()
