"""Issue 24: two first runs of one directory at the same moment. Exactly one identity is written to run.json and
wins; a run of another config is refused with one line; a run of the same config joins it. The runs meet at a
barrier just before opening the directory (a handshake, no sleeps), then race."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from support.eval_toy import write_jsonl

from powersample.config import SamplerConfig
from powersample.errors import PowerSampleError
from powersample.eval import runner
from powersample.eval.records import load_records, read_run
from powersample.eval.runner import make_plan, run_plan
from powersample.eval.tasks import get_task

ROUNDS = 20  # the race is lost only now and then without the lock (3 times in 20, as reported): race often


@pytest.fixture
def problems(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", [{"problem": f"q{i}", "answer": "1"} for i in range(4)])
    task = get_task("math500")
    return task, task.load(str(data), True)


def plan_of(problems, alpha: float, shard: tuple[int, int] | None):
    task, rows = problems
    return make_plan(
        task,
        rows,
        seeds=(0,),
        config=SamplerConfig(alpha=alpha, max_new_tokens=4),
        chat=True,
        backend={"name": "toy"},
        shard=shard,
    )


def fake_records(plan):
    """What a backend would make, marked with the run's alpha."""

    def make(todo):
        for problem, seed in todo:
            yield {"problem_id": problem.id, "seed": seed, "correct": True, "alpha": plan.config.alpha}

    return make


def race(run_dir: Path, plans: list, monkeypatch) -> list:
    """Run the plans at once, each in its thread, from a barrier at the entry of open_run; what each ended with."""
    barrier = threading.Barrier(len(plans), timeout=60)
    real_open_run = runner.open_run

    def open_run_after_handshake(*args, **kwargs):
        barrier.wait()  # every run is here, none has created run.json yet: now they race
        return real_open_run(*args, **kwargs)

    monkeypatch.setattr(runner, "open_run", open_run_after_handshake)
    ended: list = [None] * len(plans)

    def go(i: int) -> None:
        try:
            ended[i] = run_plan(plans[i], run_dir, fake_records(plans[i]), quiet=True)
        except PowerSampleError as e:
            ended[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    monkeypatch.setattr(runner, "open_run", real_open_run)
    return ended


@pytest.mark.parametrize("shards", [((0, 2), (1, 2)), (None, None)], ids=["two-shards", "one-shard"])
def test_of_two_first_runs_with_different_configs_exactly_one_wins(shards, problems, tmp_path, monkeypatch):
    for n in range(ROUNDS):
        run_dir = tmp_path / f"run{n}"
        plans = [plan_of(problems, 4.0, shards[0]), plan_of(problems, 2.0, shards[1])]
        ended = race(run_dir, plans, monkeypatch)
        refused = [e for e in ended if isinstance(e, PowerSampleError)]
        assert len(refused) == 1, f"round {n}: {ended}"
        assert "holds a run with a different config" in str(refused[0]) and "\n" not in str(refused[0])
        winner = plans[ended.index(next(e for e in ended if not isinstance(e, PowerSampleError)))]
        assert read_run(run_dir)["identity"] == winner.identity(), f"round {n}"
        alphas = {r["alpha"] for r in load_records(run_dir)}
        assert alphas == {winner.config.alpha}, f"round {n}: records of {alphas} under alpha {winner.config.alpha}"


def test_first_runs_of_one_config_on_two_shards_both_write(problems, tmp_path, monkeypatch):
    for n in range(ROUNDS):
        run_dir = tmp_path / f"run{n}"
        ended = race(run_dir, [plan_of(problems, 4.0, (0, 2)), plan_of(problems, 4.0, (1, 2))], monkeypatch)
        assert not any(isinstance(e, PowerSampleError) for e in ended), f"round {n}: {ended}"
        assert len(load_records(run_dir)) == 4
        assert read_run(run_dir)["identity"] == plan_of(problems, 4.0, None).identity()


def test_a_run_that_fails_first_does_not_take_run_json_from_one_that_joined(problems, tmp_path, monkeypatch):
    """One shard fails before its first record (it takes back what it created) while another shard of the same
    config joins: run.json stays, since the other shard's records file is there."""

    def failing(todo):
        raise PowerSampleError("engine exploded")
        yield  # a generator, as the real ones

    for n in range(ROUNDS):
        run_dir = tmp_path / f"run{n}"
        plans = [plan_of(problems, 4.0, (0, 2)), plan_of(problems, 4.0, (1, 2))]
        barrier = threading.Barrier(2, timeout=60)
        real_open_run = runner.open_run
        monkeypatch.setattr(runner, "open_run", lambda *a, **k: (barrier.wait(), real_open_run(*a, **k))[1])  # noqa: B023
        errors: list = []

        def go(plan, make):
            try:
                run_plan(plan, run_dir, make, quiet=True)  # noqa: B023
            except PowerSampleError as e:
                errors.append(e)  # noqa: B023 - each round joins its threads before the next

        threads = [
            threading.Thread(target=go, args=(plans[0], failing)),
            threading.Thread(target=go, args=(plans[1], fake_records(plans[1]))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        monkeypatch.setattr(runner, "open_run", real_open_run)
        assert [str(e) for e in errors] == ["engine exploded"]
        assert read_run(run_dir)["identity"] == plans[1].identity(), f"round {n}"
        assert len(load_records(run_dir)) == 2
