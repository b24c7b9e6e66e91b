"""Run every conformance check on every cell of the matrix: `run_matrix(options, update) -> MatrixResult`.

Architecture by architecture: build its files (once per machine), measure its conversion's agreement (once per
llama.cpp version, where llama.cpp runs it), then open each of its cells' backends and run `conformance.CHECKS` and
the documented promises (`promises.PROMISES`), both read when the run starts, so every check added there runs here
too. A check passes, fails (with the one line that says
what broke; an engine's exception is a failure too) or does not apply (with why). A cell this machine cannot build
is named with the reason, never skipped silently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from powersample.backends import conformance
from powersample.backends.base import hints_honoured
from powersample.backends.llamacpp import QUANTS
from powersample.errors import one_line
from powersample.tools.common import Update, check, tick, utc_now
from powersample.tools.matrix import promises
from powersample.tools.matrix.agreement import Agreement, agreement
from powersample.tools.matrix.archs import ARCHS
from powersample.tools.matrix.cells import ENGINES, MATRIX_QUANTS, THREADS, Cell, cells, not_built, subject
from powersample.tools.matrix.models import F32, ArchFiles, built, folder, tensor_types

PASS, FAIL, NOT_APPLICABLE = "pass", "fail", "n/a"  # a check's outcome on a cell
Check = Callable[[conformance.Subject], object]


@dataclass(frozen=True)
class MatrixOptions:
    """What to run: engines, architectures and (llamacpp) quants, validated once."""

    engines: tuple[str, ...] = ENGINES
    archs: tuple[str, ...] = tuple(ARCHS)
    quants: tuple[str, ...] = MATRIX_QUANTS
    threads: int = THREADS  # CPU threads of each engine

    def __post_init__(self) -> None:
        check(self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        for what, given, known in (
            ("engine", self.engines, ENGINES),
            ("arch", self.archs, tuple(ARCHS)),
            ("quant", self.quants, tuple(QUANTS)),
        ):
            check(bool(given), f"no {what} given; choose from {', '.join(known)}")
            unknown = [g for g in given if g not in known]
            check(not unknown, f"unknown {what} {unknown[0]!r}; choose from {', '.join(known)}" if unknown else "")
            check(len(set(given)) == len(given), f"an {what} is given twice: {', '.join(given)}")


@dataclass(frozen=True)
class Outcome:
    """One check on one cell."""

    check: str  # the check's function name
    status: str  # PASS, FAIL or NOT_APPLICABLE
    reason: str = ""  # one line: what broke (FAIL), or why the check does not apply (NOT_APPLICABLE)
    seconds: float = 0.0


@dataclass(frozen=True)
class CellResult:
    """Every check's outcome on one cell, or why the cell was not built here."""

    cell: Cell
    not_built: str = ""  # why this machine does not build the cell ('' = built and checked)
    outcomes: tuple[Outcome, ...] = ()
    seconds: float = 0.0  # loading (and re-quantizing) plus every check
    hints: tuple[str, ...] = ()  # the request hints its backend honours (backends.base.hints_honoured)

    @property
    def failures(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if o.status == FAIL)


@dataclass(frozen=True)
class ArchReport:
    """One architecture's files: where, how big, which tensor types each GGUF holds, how faithful the conversion."""

    arch: str
    folder: str
    sizes: dict[str, int] = field(default_factory=dict)  # "hf", "f32" or a quant -> bytes on disk
    tensor_types: dict[str, dict[str, int]] = field(default_factory=dict)  # a mix (q4_k_m) -> {ggml type: tensors}
    agreement: Agreement | None = None  # None where llama.cpp does not run it (or was not asked to)
    build_seconds: float = 0.0  # building its files now (0.0: found built)


@dataclass(frozen=True)
class MatrixResult:
    """A whole run."""

    options: MatrixOptions
    started: str  # ISO 8601, UTC
    checks: tuple[str, ...]  # the checks run, in order
    archs: tuple[ArchReport, ...]
    cells: tuple[CellResult, ...]
    wall_seconds: float

    @property
    def ok(self) -> bool:
        """Every built cell passed every check that applies, and every measured conversion agrees."""
        return not any(c.failures for c in self.cells) and all(a.agreement.ok for a in self.archs if a.agreement)


def every_check() -> tuple[Check, ...]:
    """What a cell runs: every backend conformance check, then the documented promises through the samplers (read
    when called, so every check added to either runs here too)."""
    return (*conformance.CHECKS, *promises.PROMISES)


def total_units(options: MatrixOptions, checks: Sequence[Check] | None = None) -> int:
    """Progress units of a run: one per architecture built, per conversion measured, per check on a built cell."""
    planned = [c for c in cells(options.engines, options.archs, options.quants) if not not_built(c)]
    measured = {c.arch for c in planned if c.engine == "llamacpp"}
    return len({c.arch for c in planned}) + len(measured) + len(planned) * len(checks or every_check())


def run_matrix(
    options: MatrixOptions, update: Update | None = None, checks: Sequence[Check] | None = None
) -> MatrixResult:
    """Run `checks` (default: every_check()) on every cell of `options` (see the module docstring)."""
    checks = tuple(checks or every_check())
    start, started = time.perf_counter(), utc_now()
    planned = cells(options.engines, options.archs, options.quants)
    results: dict[Cell, CellResult] = {c: CellResult(c, reason) for c in planned if (reason := not_built(c))}
    reports = []
    for arch in options.archs:
        mine = [c for c in planned if c.arch == arch and c not in results]
        if not mine:
            reports.append(ArchReport(arch, ""))
            continue
        files, seconds = _built(arch, update)
        measured = _agreement(files, update) if any(c.engine == "llamacpp" for c in mine) else None
        results.update((c, _run_cell(c, files, checks, options.threads, update)) for c in mine)
        reports.append(_report(files, seconds, measured, [c.quant for c in mine if c.engine == "llamacpp"]))
    return MatrixResult(
        options,
        started,
        tuple(c.__name__ for c in checks),
        tuple(reports),
        tuple(results[c] for c in planned),
        time.perf_counter() - start,
    )


def failure_line(error: BaseException) -> str:
    """One line saying what broke: a numpy closeness assertion as 'what: mismatched elements; max difference
    (tolerance)', any other assertion as its first line, an engine's exception as 'Type: first line'."""
    if not isinstance(error, AssertionError):
        return f"{type(error).__name__}: {one_line(error)}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Not equal to tolerance"):
        facts = [line for line in lines if line.startswith(("Mismatched elements", "Max absolute difference"))]
        return one_line(AssertionError("; ".join([lines[1], *facts, lines[0].split()[-1]])))
    return one_line(error)


# --- steps ------------------------------------------------------------------------------------------------------


def _built(arch: str, update: Update | None) -> tuple[ArchFiles, float]:
    """The architecture's files, and the seconds it took to build them now (0.0 when they were already built)."""
    start, found = time.perf_counter(), folder(ARCHS[arch]).is_dir()
    files = built(ARCHS[arch])
    tick(update, f"built {arch}")
    return files, 0.0 if found else time.perf_counter() - start


def _agreement(files: ArchFiles, update: Update | None) -> Agreement | None:
    """The conversion's agreement (None where the arch has no GGUF)."""
    measured = agreement(files) if files.arch.gguf_arch else None
    tick(update, f"conversion {files.arch.name}")
    return measured


def _run_cell(
    cell: Cell, files: ArchFiles, checks: tuple[Check, ...], threads: int, update: Update | None
) -> CellResult:
    """Open the cell's backend and run every check; a backend that does not open fails every check with why."""
    start, outcomes, hints = time.perf_counter(), [], ()
    try:
        with subject(cell, files, threads) as s:
            hints = tuple(sorted(hints_honoured(s.backend)))
            for one in checks:
                outcomes.append(_run_check(one, s))
                tick(update, f"{cell.name} {one.__name__}")
    except Exception as e:  # noqa: BLE001 - a cell that does not load fails its checks; the other cells still run
        done = {o.check for o in outcomes}
        for one in checks:
            if one.__name__ not in done:
                outcomes.append(Outcome(one.__name__, FAIL, f"the cell did not open: {failure_line(e)}"))
                tick(update, f"{cell.name} {one.__name__}")
    return CellResult(cell, "", tuple(outcomes), time.perf_counter() - start, hints)


def _run_check(one: Check, s: conformance.Subject) -> Outcome:
    """One check's outcome; an exception other than NotApplicable or KeyboardInterrupt is a failure."""
    start = time.perf_counter()
    try:
        one(s)
        status, reason = PASS, ""
    except conformance.NotApplicable as e:
        status, reason = NOT_APPLICABLE, one_line(e)
    except Exception as e:  # noqa: BLE001 - an engine's crash is the check's failure, reported in one line
        status, reason = FAIL, failure_line(e)
    return Outcome(one.__name__, status, reason, time.perf_counter() - start)


def _report(files: ArchFiles, seconds: float, measured: Agreement | None, quants: list[str]) -> ArchReport:
    """The arch's files as they are after its cells ran."""
    ggufs = [q for q in (F32, *quants) if files.gguf(q).is_file()]
    sizes = {"hf": files.size(files.hf), **{q: files.size(files.gguf(q)) for q in ggufs}}
    types = {q: tensor_types(files.gguf(q)) for q in ggufs if q.endswith("_m")}  # the mixes: llama.cpp's choice
    return ArchReport(files.arch.name, str(files.folder), sizes, types, measured, seconds)
