"""`powersample eval --ray`: the same records as one process, a killed worker's units redone once, resume, bad input.

One local Ray cluster (2 CPUs) serves the module; the CLI runs in this process and reuses it. The first tests need
no cluster and run before it starts (pytest keeps file order).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.eval_toy import eval_argv

from powersample.cli import build_parser
from powersample.cli import main as run_cli
from powersample.eval.records import load_records

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parent.parent
# A toy "model" whose tokens are boxed answers, so records get graded both ways; LONG rarely stops early, so its
# units take long enough for a worker to be killed while it holds some.
BOXED = {
    "vocab": ["The answer is ", "\\boxed{1}", "\\boxed{\\frac12}", "<eos>"],
    "eos_id": 3,
    "default": [0.1, 0.4, 0.3, 0.2],
    "next": {"": [0.5, 0.3, 0.2, 0.0]},
}
LONG = {**BOXED, "default": [0.33, 0.33, 0.33, 0.01], "next": {}}
TIMES = ("wall_seconds", "grade_seconds", "batch_id")  # the only fields that may differ between two runs


@pytest.fixture
def files(tmp_path):
    """(boxed spec, long spec, data with 40 problems)."""
    specs = []
    for name, spec in (("boxed", BOXED), ("long", LONG)):
        specs.append(tmp_path / f"{name}.json")
        specs[-1].write_text(json.dumps(spec))
    data = tmp_path / "math.jsonl"
    data.write_text(
        "".join(
            json.dumps({"problem": f"What is {i}/2?", "answer": "0.5" if i % 2 else "1", "id": f"p{i}"}) + "\n"
            for i in range(40)
        )
    )
    return specs[0], specs[1], data


def timeless(records: list[dict]) -> dict[tuple, dict]:
    return {(r["problem_id"], r["seed"]): {k: v for k, v in r.items() if k not in TIMES} for r in records}


def file_keys(out: Path) -> list[tuple]:
    """Every line of the records file parses; its (problem, seed) keys in file order."""
    return [(r["problem_id"], r["seed"]) for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())]


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


# --- no cluster needed (these run before the cluster fixture starts one) ---


def test_ray_auto_without_a_cluster_is_one_line_exit_2(files, tmp_path):
    spec, _, data = files
    argv = [sys.executable, "-m", "powersample.cli", *eval_argv(spec, data, tmp_path / "run", "--ray", "auto")]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("powersample: error: cannot connect to the Ray")
    assert not (tmp_path / "run").exists()


BAD = [
    (["--ray", "--workers", "0"], "--workers"),
    (["--ray", "--workers", "two"], "--workers"),
    (["--ray", "--workers", "1.5"], "--workers"),
    (["--ray", "--gpus-per-worker", "-1"], "--gpus-per-worker"),
    (["--ray", "--cpus-per-worker", "nan"], "--cpus-per-worker"),
    (["--workers", "2"], "--workers needs --ray"),
    (["--ray-temp-dir", "/tmp/x"], "--ray-temp-dir needs --ray"),
    (["--ray", "192.0.2.1:6379", "--ray-temp-dir", "/tmp/x"], "--ray-temp-dir applies only when starting"),
]


@pytest.mark.parametrize("args, words", BAD)
def test_bad_ray_options_are_one_line_and_exit_2(args, words, files, tmp_path, capsys):
    spec, _, data = files
    assert run_cli(eval_argv(spec, data, tmp_path / "run", *args)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("powersample: error:") and words in err, err
    assert not (tmp_path / "run").exists()


def test_ray_not_installed_names_the_extra(files, tmp_path, capsys, monkeypatch):
    spec, _, data = files
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    assert run_cli(eval_argv(spec, data, tmp_path / "run", "--ray")) == 2
    err = capsys.readouterr().err
    assert err == "powersample: error: --ray needs Ray: pip install 'powersample[ray]'\n"


# --- on a local cluster ---


@pytest.fixture(scope="module")
def cluster():
    """A local Ray with 2 CPUs for the whole module; yields its address for other processes."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.ray
def test_toy_run_on_ray_equals_the_single_process_run(cluster, files, tmp_path, capsys):
    spec, _, data = files
    one, many = tmp_path / "one", tmp_path / "ray"
    assert run_cli(eval_argv(spec, data, one, "--limit", "6", "--seeds", "0-3")) == 0
    assert run_cli(eval_argv(spec, data, many, "--limit", "6", "--seeds", "0-3", "--ray", "--workers", "2")) == 0
    assert "24 records (0 resumed)" in capsys.readouterr().out
    assert sorted(file_keys(many)) == sorted(file_keys(one)) and len(set(file_keys(many))) == 24
    assert timeless(load_records(many)) == timeless(load_records(one))
    identity = [json.loads((d / "run.json").read_text())["identity"] for d in (one, many)]
    assert identity[0] == identity[1]
    # the same run directory, with or without Ray: one more seed on Ray, then nothing left to do without it
    assert run_cli(eval_argv(spec, data, one, "--limit", "6", "--seeds", "0-4", "--ray")) == 0
    assert run_cli(eval_argv(spec, data, one, "--limit", "6", "--seeds", "0-4")) == 0
    assert "30 records (30 resumed)" in capsys.readouterr().out.splitlines()[-1]
    assert len(set(file_keys(one))) == len(file_keys(one)) == 30
    assert run_cli(["report", str(many), "--no-plots"]) == 0
    assert "| math500 | power | 24 |" in capsys.readouterr().out


@pytest.mark.ray
def test_a_killed_worker_has_its_units_redone_and_written_once(cluster, files, tmp_path):
    from powersample.cli.options import backend_spec
    from powersample.eval.distributed import WorkerPlacement, WorkerPool
    from powersample.eval.runner import run_plan

    _, spec, data = files
    out, clean = tmp_path / "run", tmp_path / "clean"
    argv = eval_argv(
        spec,
        data,
        out,
        "--limit",
        "6",
        "--seeds",
        "0-3",
        "--max-new-tokens",
        "48",
        "--block-count",
        "4",
        "--mcmc-steps",
        "10",
    )
    plan = plan_of(argv)
    pool = WorkerPool(ray, backend_spec(build_parser().parse_args(argv)).portable(), plan, WorkerPlacement(2, 0.0, 1.0))

    def kill_worker_0_after_the_first_record(todo):
        for i, record in enumerate(pool.records(todo)):
            yield record
            if i == 0:
                ray.kill(pool.workers[0].actor)

    try:
        summary = run_plan(plan, out, kill_worker_0_after_the_first_record, quiet=True)
    finally:
        pool.close()
    assert pool.requeued >= 1 and len(pool.workers) == 3  # its units went back to the queue; a fresh actor started
    keys = file_keys(out)
    assert summary.records == 24 and len(keys) == len(set(keys)) == 24
    assert run_cli([*argv[: argv.index("--output-dir") + 1], str(clean), *argv[argv.index("--output-dir") + 2 :]]) == 0
    assert timeless(load_records(out)) == timeless(load_records(clean))


def plan_of(argv: list[str]):
    """The EvalPlan `powersample eval` makes for argv."""
    from powersample.cli.eval import parse_limit, parse_seeds
    from powersample.cli.options import backend_spec, config_from_args
    from powersample.eval.runner import make_plan
    from powersample.eval.tasks import get_task

    args = build_parser().parse_args(argv)
    task = get_task(args.task)
    return make_plan(
        task,
        task.load(args.data, not args.raw),
        seeds=parse_seeds(args.seeds),
        config=config_from_args(args),
        chat=not args.raw,
        backend=backend_spec(args).identity(),
        limit=parse_limit(args.limit),
    )


@pytest.mark.ray
def test_a_killed_driver_resumes_on_ray_or_without(cluster, files, tmp_path, capsys):
    spec, _, data = files
    out, clean = tmp_path / "run", tmp_path / "clean"
    extra = ("--seeds", "0-9", "--max-new-tokens", "24", "--block-count", "3", "--mcmc-steps", "6")
    argv = [sys.executable, "-m", "powersample.cli", *eval_argv(spec, data, out, *extra, "--ray", cluster)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env())
    records = out / "records.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(load_records(out))
    assert 20 <= killed_at < 400
    assert run_cli(eval_argv(spec, data, out, *extra, "--ray", "--workers", "2")) == 0
    assert f"400 records ({killed_at} resumed)" in capsys.readouterr().out
    assert run_cli(eval_argv(spec, data, out, *extra)) == 0  # and without Ray: all done
    assert "400 records (400 resumed)" in capsys.readouterr().out
    assert len(file_keys(out)) == len(set(file_keys(out))) == 400
    assert run_cli(eval_argv(spec, data, clean, *extra)) == 0
    assert timeless(load_records(out)) == timeless(load_records(clean))


@pytest.mark.ray
def test_more_workers_than_the_cluster_holds_is_one_line_exit_2(cluster, files, tmp_path, capsys):
    spec, _, data = files
    for extra, words in (
        (["--workers", "3"], "3 Ray worker(s) x 1 CPU need 3 CPUs; the cluster has 2"),
        (["--gpus-per-worker", "1"], "1 GPUs; the cluster has 0"),
    ):
        assert run_cli(eval_argv(spec, data, tmp_path / "run", "--ray", *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


@pytest.mark.slow
@pytest.mark.ray
def test_embedded_model_on_ray(cluster, tmp_path, capsys):
    """--backend hf with its default model, the embedded SmolLM2: 2 problems x 1 seed on 2 workers."""
    pytest.importorskip("transformers")
    data = tmp_path / "math.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(2))
    )
    small = ["--max-new-tokens", "8", "--block-count", "2", "--mcmc-steps", "1", "--seeds", "0", "--threads", "1"]
    argv = ["eval", "--task", "math500", "--data", str(data), "--backend", "hf", *small, "--quiet", "--output-dir"]
    assert run_cli([*argv, str(tmp_path / "ray"), "--ray", "--workers", "2"]) == 0
    assert run_cli([*argv, str(tmp_path / "one")]) == 0
    got, want = load_records(tmp_path / "ray"), load_records(tmp_path / "one")
    assert len(got) == 2 and all(1 <= len(r["tokens"]) <= 8 and r["logp_per_token"] < 0 for r in got)
    assert {k: r["tokens"] for k, r in timeless(got).items()} == {k: r["tokens"] for k, r in timeless(want).items()}
