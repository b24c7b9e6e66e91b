"""Data-parallel evaluation on Ray (`powersample eval --ray`): the same units and records, many backends.

    driver (this process)                            workers (Ray actors, one backend each)
    run_plan: resume, dedup, write, progress bar  <- WorkerPool.records(todo) <- UnitWorker.run(units)
                                                     a queue of units, at most       builds its backend once,
                                                     IN_FLIGHT batches on each       then samples each batch
                                                     actor                           together (evaluate_batches)

The unit is one (problem, seed), as in the single-process runner, and a worker makes its records with the same
`evaluate_batches` (a batch of `--batch` units shares every engine call), so a record is what
`powersample sample --seed s` gives whichever worker made it, and a run can be resumed with or without Ray. Only the
driver writes. When an actor dies (`RayActorError`), each of its unfinished units goes back to the queue and a fresh
actor takes its place; a unit's record is written once, since the driver keeps only the first record per unit
(`runner.run_plan`).

Ray is imported only here, and this module only when `--ray` is given: `import powersample` never needs Ray.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from powersample.api import NO_TEMPLATE
from powersample.backends import Backend, BackendSpec
from powersample.backends.base import has_chat_template
from powersample.errors import PowerSampleError
from powersample.eval.records import record_key
from powersample.eval.runner import EvalPlan, EvalSummary, Unit, evaluate_batches, run_plan
from powersample.io import notice_once

IN_FLIGHT = 2  # batches of units sent to an actor ahead of time, so it never waits for the driver between units
RESTARTS_PER_WORKER = 3  # fresh actors the pool may start, per worker, to replace ones that died
MAX_ATTEMPTS = 3  # a unit whose worker died this many times while running it stops the run
CONNECT_TIMEOUT = 10.0  # seconds for a Ray address to answer before it is refused (Ray alone waits minutes)


@dataclass(frozen=True)
class RayOptions:
    """Where to run and how to cut the cluster into workers; validated by `WorkerPlacement.of`."""

    address: str | None = None  # None: start a local Ray (or join $RAY_ADDRESS); "auto": the running cluster
    workers: int | None = None  # actors; None: one per GPU when workers take GPUs, else one per cpus_per_worker
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs and the engine uses one, else 0
    cpus_per_worker: float = 1.0
    temp_dir: str | None = None  # Ray's temp and log directory, when this process starts the local Ray

    def __post_init__(self) -> None:
        if self.address is not None:
            parse_address(self.address)
        if self.temp_dir is not None and self.address is not None:
            raise PowerSampleError("--ray-temp-dir applies only when starting a local Ray (--ray with no address)")


@dataclass(frozen=True)
class WorkerPlacement:
    """How many actors, and what each asks Ray for."""

    workers: int
    gpus: float  # per actor; Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU(s)
    cpus: float  # per actor; Ray also caps the actor's torch/OpenMP threads to it

    @classmethod
    def of(cls, options: RayOptions, cluster: dict[str, float], cpu_only: bool) -> WorkerPlacement:
        """Defaults from the cluster's resources; a one-line error when the workers cannot all be placed."""
        have_gpus, have_cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
        gpus = options.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if have_gpus >= 1 and not cpu_only else 0.0
        cpus = options.cpus_per_worker
        workers = options.workers
        if workers is None:
            workers = int(have_gpus // gpus) if gpus > 0 else int(have_cpus // cpus) if cpus > 0 else 1
        for what, per, have in (("GPU", gpus, have_gpus), ("CPU", cpus, have_cpus)):
            if workers * per > have + 1e-9 or workers < 1:
                raise PowerSampleError(
                    f"{max(workers, 1)} Ray worker(s) x {per:g} {what} need {max(workers, 1) * per:g} {what}s; "
                    f"the cluster has {have:g} (set --workers, --gpus-per-worker or --cpus-per-worker)"
                )
        return cls(workers, gpus, cpus)


def require_ray() -> Any:
    """The ray module, or a one-line error naming the extra to install."""
    try:
        import ray
    except ImportError as e:
        if e.name == "ray":
            raise PowerSampleError("--ray needs Ray: pip install 'powersample[ray]'") from None
        raise PowerSampleError(
            f"Ray is installed but cannot be imported ({e}); reinstall it: "
            "pip install --force-reinstall 'powersample[ray]'"
        ) from None
    return ray


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address, None for Ray's own names (auto, local); a one-line error, at once, for one that
    cannot be an address (999.1.1.1:1, a port past 65535, no port)."""
    if address.strip() in ("auto", "local"):
        return None
    m = re.fullmatch(r"\s*(?:ray://)?(\[[^\]]*\]|[^:/\[\]\s]+):(\d{1,5})\s*", address)
    if m is None or not 1 <= int(m.group(2)) <= 65535:
        raise PowerSampleError(f"bad Ray address {address!r}: use auto, HOST:PORT or ray://HOST:PORT")
    host = m.group(1).strip("[]")
    if re.fullmatch(r"[\d.]+", host) or ":" in host:  # written as an IP address: it must be one
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise PowerSampleError(f"bad Ray address {address!r}: {host} is not an IP address") from None
    return host, int(m.group(2))


def check_reachable(address: str) -> None:
    """A one-line error within CONNECT_TIMEOUT when nothing answers at the address (refused, no route, no answer,
    a name that does not resolve), where ray.init would wait minutes. Only a TCP connection is tried: a port that
    answers but is not Ray is left to Ray."""
    where = parse_address(address)
    if where is None:
        return
    outcome: list[str | None] = []

    def connect() -> None:  # in a thread, so the name lookup is bounded too
        try:
            socket.create_connection(where, timeout=CONNECT_TIMEOUT).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e.strerror or str(e) or type(e).__name__)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT)
    why = outcome[0] if outcome else f"no answer within {CONNECT_TIMEOUT:g} s"
    if why is not None:
        raise PowerSampleError(f"cannot connect to the Ray cluster at {address.strip()}: {why}")


@contextlib.contextmanager
def connected(options: RayOptions) -> Iterator[Any]:
    """Connect to Ray for the duration (and disconnect after); a Ray this process already joined is used as is."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    try:
        ray.init(**_init_kwargs(options))
    except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError...: one line, no traceback
        where = "start a local Ray" if _starts_local(options) else f"connect to the Ray cluster at {options.address}"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PowerSampleError(f"cannot {where}: {reason}") from None
    restore = _route_cluster_messages_to_stderr()
    try:
        yield ray
    finally:
        ray.shutdown()
        restore()


def _route_cluster_messages_to_stderr() -> Callable[[], None]:
    """Ray's driver prints cluster errors (a worker died, a request cannot be scheduled yet) in full on stdout,
    even with log_to_driver=False; stdout carries our results, so print their first sentence on stderr instead.
    This patches a private name of Ray (`ray._private.worker.print_to_stdstream`); if it is gone, Ray prints as
    it does. Returns the function that undoes the patch."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return lambda: None
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None:
        return lambda: None

    def first_sentence_on_stderr(data: dict, ignore_prefix: bool = False) -> None:
        from tqdm import tqdm  # tqdm.write: on its own line, above the progress bar

        for line in data.get("lines", []):
            text = str(line).strip().split(". ")[0].rstrip(".")
            tqdm.write(f"powersample: ray ({data.get('pid', 'cluster')}): {text}", file=sys.stderr)

    ray_worker.print_to_stdstream = first_sentence_on_stderr
    return lambda: setattr(ray_worker, "print_to_stdstream", original)


def _starts_local(options: RayOptions) -> bool:
    return options.address is None and not os.environ.get("RAY_ADDRESS")


def _init_kwargs(options: RayOptions) -> dict[str, Any]:
    """Keep Ray quiet on the user's terminal: workers' output stays in Ray's log files (under the temp dir)."""
    kwargs: dict[str, Any] = {"address": options.address, "log_to_driver": False, "logging_level": logging.WARNING}
    if _starts_local(options):
        kwargs["include_dashboard"] = False
        if options.temp_dir is not None:
            kwargs["_temp_dir"] = str(Path(options.temp_dir).resolve())
    elif options.temp_dir is not None:
        raise PowerSampleError("--ray-temp-dir applies only when starting a local Ray, not with $RAY_ADDRESS set")
    return kwargs


def run_eval_ray(
    spec: BackendSpec,
    plan: EvalPlan,
    run_dir: Path,
    options: RayOptions,
    quiet: bool = False,
    batch: int = 1,
) -> EvalSummary:
    """`run_eval` with the units spread over Ray actors, each loading the backend `spec` describes. `auto` is
    resolved here, once, so that every actor runs the same engine and the placement knows whether it uses a GPU."""
    spec = spec.resolved()
    with connected(options) as ray:
        placement = WorkerPlacement.of(options, ray.cluster_resources(), spec.cpu_only)
        if not quiet:
            print(
                f"powersample: up to {placement.workers} Ray worker(s), {placement.gpus:g} GPU and "
                f"{placement.cpus:g} CPU each",
                file=sys.stderr,
                flush=True,
            )
        pool = WorkerPool(ray, spec, plan, placement, batch)
        try:
            if plan.chat and not pool.has_chat_template():  # what the identity says, before run.json is written
                notice_once(NO_TEMPLATE)
                plan = replace(plan, chat=False)
            return run_plan(plan, run_dir, pool.records, quiet)
        finally:
            pool.close()


class UnitWorker:
    """The body of one Ray actor: builds its backend on the first batch, then makes each batch's records."""

    def __init__(self, spec: BackendSpec, plan: EvalPlan):
        self._spec, self._plan, self._backend = spec, plan, None

    def run(self, units: list[Unit]) -> list[dict[str, Any]]:
        return list(evaluate_batches(self._loaded(), self._plan, units, len(units)))

    def has_chat_template(self) -> bool:
        return has_chat_template(self._loaded())

    def _loaded(self) -> Backend:
        if self._backend is None:
            self._backend = self._spec.load()
        return self._backend


@dataclass
class _Worker:
    """The driver's view of one actor."""

    actor: Any  # the Ray actor handle
    in_flight: int = 0  # batches sent and not yet answered
    dead: bool = False


class WorkerPool:
    """Actors that make records for units; the driver's queue, the re-queueing of a dead actor's units."""

    def __init__(self, ray: Any, spec: BackendSpec, plan: EvalPlan, placement: WorkerPlacement, batch: int = 1):
        self._ray, self._placement, self._batch = ray, placement, batch
        self._actor_class = ray.remote(UnitWorker).options(num_gpus=placement.gpus, num_cpus=placement.cpus)
        self._spec_ref, self._plan_ref = ray.put(spec), ray.put(plan)
        self.workers: list[_Worker] = []
        self.requeued = 0  # units sent back to the queue because their actor died
        self.restarts_left = RESTARTS_PER_WORKER * placement.workers
        self._attempts: collections.Counter[tuple[str, int]] = collections.Counter()

    def has_chat_template(self) -> bool:
        """Whether the model has a chat template, as the first actor (started here, its backend loaded) says."""
        from ray.exceptions import RayTaskError

        if not self.workers:
            self.workers.append(self._start())
        try:
            return bool(self._ray.get(self.workers[0].actor.has_chat_template.remote()))
        except RayTaskError as e:  # the model failed to load: one line, as a unit's failure
            if isinstance(e.cause, PowerSampleError):
                raise PowerSampleError(str(e.cause)) from None
            raise

    def records(self, todo: list[Unit]) -> Iterator[dict[str, Any]]:
        """Each unit's record, in the order they finish; actors start here (beside one started already), at most one
        per unit."""
        if not todo:
            return
        self.workers += [self._start() for _ in range(min(self._placement.workers, len(todo)) - len(self.workers))]
        queue = collections.deque(todo)
        pending: dict[Any, tuple[_Worker, list[Unit]]] = {}  # result ref -> (its actor, its units)
        while queue or pending:
            self._fill(queue, pending)
            [ref], _ = self._ray.wait(list(pending), num_returns=1)
            worker, units = pending.pop(ref)
            worker.in_flight -= 1
            yield from self._result(ref, worker, units, queue)

    def close(self) -> None:
        """Stop every actor (they would outlive this run when the driver stays connected to Ray)."""
        for worker in self.workers:
            if not worker.dead:
                worker.dead = True
                self._ray.kill(worker.actor)

    def _start(self) -> _Worker:
        return _Worker(self._actor_class.remote(self._spec_ref, self._plan_ref))

    def _fill(self, queue: collections.deque[Unit], pending: dict[Any, tuple[_Worker, list[Unit]]]) -> None:
        for worker in self.workers:
            while not worker.dead and worker.in_flight < IN_FLIGHT and queue:
                units = [queue.popleft() for _ in range(min(self._batch, len(queue)))]
                pending[worker.actor.run.remote(units)] = (worker, units)
                worker.in_flight += 1

    def _result(self, ref: Any, worker: _Worker, units: list[Unit], queue: collections.deque[Unit]) -> list[dict]:
        """The units' records; none when their actor died (the units are queued again, the actor replaced)."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return self._ray.get(ref)
        except RayActorError as e:
            if e.actor_init_failed:  # it could not even unpickle its arguments: no use restarting it
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                raise PowerSampleError(
                    f"a Ray worker could not start ({lines[-1] if lines else type(e).__name__}); "
                    "is this powersample installed on every node?"
                ) from None
            self._lost(worker, units, queue)
            return []
        except RayTaskError as e:  # the unit itself failed; a bad input is one line, a bug a traceback
            if isinstance(e.cause, PowerSampleError):
                raise PowerSampleError(str(e.cause)) from None
            raise

    def _lost(self, worker: _Worker, units: list[Unit], queue: collections.deque[Unit]) -> None:
        """Queue the units again (first in line) and, once per dead actor, start its replacement."""
        for unit in units:
            key = record_key({"problem_id": unit[0].id, "seed": unit[1]})
            self._attempts[key] += 1
            if self._attempts[key] >= MAX_ATTEMPTS:
                raise PowerSampleError(
                    f"problem {key[0]} seed {key[1]}: {MAX_ATTEMPTS} Ray workers died while it "
                    "was theirs (out of memory?); see Ray's logs"
                )
        queue.extendleft(reversed(units))
        self.requeued += len(units)
        if worker.dead:
            return
        worker.dead = True
        self._ray.kill(worker.actor)  # it may be only unreachable; make sure it holds no GPU any more
        if self.restarts_left > 0:
            self.restarts_left -= 1
            self.workers.append(self._start())
        elif all(w.dead for w in self.workers):
            raise PowerSampleError(
                f"every Ray worker died ({len(queue)} units not done); run the same command again to resume"
            )
