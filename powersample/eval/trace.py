"""A chain trace (`powersample sample --trace FILE`): reading it, and replaying one chain's events into the text they
build, remembering what wrote each token.

A trace is JSONL, one event per line, named by its "event" key (the fields read here):

    start   chain                          (also prompt, method, seed, sample_index, config)
    extend  chain, stage, at, tokens, pieces, logp, length
            a stage's extension: the state is cut to `at` tokens, then `tokens` appended; logp and length after
    step    chain, stage, step, cut, length, accepted, logp, length_after, proposal, pieces
            one MH step on a state of `length` tokens; accepted, its proposal replaces the tokens from `cut`
    smc     chain, stage, ess              power-smc, once per block
    end     chain, tokens, logp            the chain's final state

Events of a kind not listed, and keys not listed, are skipped: traces may grow. A torn last line (a writer killed
mid-line) is ignored, as in records files; anything else that is not such an event is a one-line error. Pure: no
plotting here (trace_report.py draws).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from powersample.errors import PowerSampleError, parse_json
from powersample.eval.report import check_fields

_NUMBER = (int, float)
# fmt: off
EVENT_FIELDS: dict[str, dict[str, Any]] = {
    "start": {"chain": int},
    "extend": {"chain": int, "stage": int, "at": int, "tokens": list, "pieces": list, "logp": _NUMBER,
               "length": (int, None)},
    "step": {"chain": int, "stage": int, "step": int, "cut": int, "length": int, "accepted": bool, "logp": _NUMBER,
             "length_after": (int, None), "proposal": (list, None), "pieces": (list, None)},
    "smc": {"chain": int, "stage": int, "ess": _NUMBER},
    "end": {"chain": int, "tokens": list, "logp": _NUMBER},
}
# fmt: on
Event = tuple[int, dict[str, Any]]  # (line number, the event)


@dataclass(frozen=True)
class Write:
    """What wrote a span of the state: a stage's extension, or an accepted MH step's proposal."""

    stage: int
    step: int | None  # the MH step within its stage; None for an extension
    start: int  # the token index the write began at (`at` or `cut`)

    @property
    def name(self) -> str:
        return f"stage {self.stage} " + ("extension" if self.step is None else f"step {self.step}")


@dataclass(frozen=True)
class Point:
    """One extension or MH step, in trace order: what the log p plot and the acceptance counts read."""

    stage: int
    step: int | None  # None for an extension
    logp: float  # log p of the state after it (nats)
    accepted: bool | None = None  # None for an extension
    cut: int | None = None  # steps: where the proposal starts
    length: int | None = None  # steps: the state's length before the step


@dataclass(frozen=True)
class Replay:
    """One chain of a trace, replayed."""

    chain: int
    start: dict[str, Any]  # its start event ({} when the trace has none)
    tokens: tuple[int, ...]  # the final state
    pieces: tuple[str, ...]  # the text of each token
    writers: tuple[int, ...]  # per token, the index in `writes` of what last wrote it
    writes: tuple[Write, ...]  # every extension and accepted step, in order
    points: tuple[Point, ...]
    ess: tuple[float, ...]  # power-smc: the effective sample size per block
    logp: float | None  # the final state's log p (the end event's, else the last point's; None without either)

    @property
    def steps(self) -> list[Point]:
        return [p for p in self.points if p.step is not None]


def read_events(path: Path) -> list[Event]:
    """Every event line of a trace with its line number; blank lines and a torn last line are skipped."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PowerSampleError(f"cannot read trace {path}: {e.strerror}") from None
    lines = data.split(b"\n")
    events = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = parse_json(line, f"trace {path} line {n}")
        except PowerSampleError:
            if n == len(lines):  # no newline after it: torn
                continue
            raise
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            raise PowerSampleError(f'trace {path} line {n} is not an event (a JSON object with an "event" name)')
        events.append((n, event))
    return events


def chains(path: Path, events: list[Event]) -> list[int]:
    """The chains of the known events, in the order they first appear (each event's fields checked)."""
    seen: dict[int, None] = {}
    for n, event in events:
        kind = event["event"]
        if kind in EVENT_FIELDS:
            check_fields(event, EVENT_FIELDS[kind], f"trace {path} line {n}", f"{kind} event")
            seen.setdefault(event["chain"], None)
    return list(seen)


def replay(path: Path, chain: int | None = None) -> Replay:
    """Replay one chain of the trace at `path` (default: the first in the file)."""
    events = read_events(path)
    found = chains(path, events)
    if not found:
        raise PowerSampleError(f"trace {path} holds no chain events")
    if chain is None:
        chain = found[0]
    if chain not in found:
        raise PowerSampleError(f"trace {path} has no chain {chain} (it has {', '.join(map(str, found))})")
    state = _State(path, chain)
    for n, event in events:
        if event["event"] in EVENT_FIELDS and event["chain"] == chain:
            getattr(state, event["event"])(n, event)  # _State has one method per known kind
    return state.result()


@dataclass
class _State:
    """The chain's state while its events replay: one method per event kind."""

    path: Path
    chain: int
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    writers: list[int] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    ess: list[float] = field(default_factory=list)
    begun: dict[str, Any] | None = None
    ended: float | None = None

    def start(self, n: int, event: dict[str, Any]) -> None:
        if self.begun is not None or self.points:
            self._inconsistent(n, "the chain starts again (a second start event, or one after its first events)")
        self.begun = event

    def extend(self, n: int, event: dict[str, Any]) -> None:
        self._check_cut(n, event["at"])
        self._write(n, Write(event["stage"], None, event["at"]), event["tokens"], event["pieces"])
        self._check_length(n, event.get("length"))
        self.points.append(Point(event["stage"], None, float(event["logp"])))

    def step(self, n: int, event: dict[str, Any]) -> None:
        self._check_length(n, event["length"])
        self._check_cut(n, event["cut"])
        if event["accepted"]:
            self._write(n, Write(event["stage"], event["step"], event["cut"]), event["proposal"], event["pieces"])
            self._check_length(n, event.get("length_after"))
        self.points.append(
            Point(event["stage"], event["step"], float(event["logp"]), event["accepted"], event["cut"], event["length"])
        )

    def smc(self, n: int, event: dict[str, Any]) -> None:
        self.ess.append(float(event["ess"]))

    def end(self, n: int, event: dict[str, Any]) -> None:
        _token_ids(event["tokens"], f"trace {self.path} line {n}: end event")
        if event["tokens"] != self.tokens:
            self._inconsistent(
                n, f"its {len(event['tokens'])} final tokens differ from the {len(self.tokens)} that its events build"
            )
        self.ended = float(event["logp"])

    def result(self) -> Replay:
        logp = self.ended if self.ended is not None else (self.points[-1].logp if self.points else None)
        return Replay(
            self.chain,
            self.begun or {},
            tuple(self.tokens),
            tuple(self.pieces),
            tuple(self.writers),
            tuple(self.writes),
            tuple(self.points),
            tuple(self.ess),
            logp,
        )

    def _write(self, n: int, write: Write, tokens: Any, pieces: Any) -> None:
        """Cut the state at write.start, then append the tokens, each marked as this write's."""
        where = f"trace {self.path} line {n}: {write.name}"
        _token_ids(tokens, where)
        if not isinstance(pieces, list) or len(pieces) != len(tokens) or not all(isinstance(p, str) for p in pieces):
            raise PowerSampleError(f"{where} needs 'pieces', one string per token")
        del self.tokens[write.start :], self.pieces[write.start :], self.writers[write.start :]
        self.tokens += tokens
        self.pieces += pieces
        self.writers += [len(self.writes)] * len(tokens)
        self.writes.append(write)

    def _check_cut(self, n: int, cut: int) -> None:
        if not 0 <= cut <= len(self.tokens):
            self._inconsistent(n, f"it starts at token {cut} of a state of {len(self.tokens)}")

    def _check_length(self, n: int, length: int | None) -> None:
        if length is not None and length != len(self.tokens):
            self._inconsistent(n, f"it says the state has {length} tokens, the replay has {len(self.tokens)}")

    def _inconsistent(self, n: int, why: str) -> None:
        raise PowerSampleError(f"trace {self.path} is inconsistent: chain {self.chain}, line {n}: {why}")


def _token_ids(tokens: Any, where: str) -> None:
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise PowerSampleError(f"{where} has tokens that are not a list of integers")


def acceptance_by_position(steps: list[Point], bins: int = 10) -> list[tuple[int, int]]:
    """(steps, accepted) per bin of the relative cut position cut / length, bins of equal width over [0, 1)."""
    counts = [[0, 0] for _ in range(bins)]
    for p in steps:
        where = min(bins - 1, int(bins * p.cut / p.length)) if p.length else 0
        counts[where][0] += 1
        counts[where][1] += bool(p.accepted)
    return [(n, a) for n, a in counts]
