"""The rows of the llamacpp backend's decoding loop: a request being decoded in its lane, which waiting requests
start now, and how one step's fed ids are split into llama_decode calls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from powersample.backends.engine import Row
from powersample.backends.llamacpp.context import N_BATCH
from powersample.backends.llamacpp.kvcache import Seq
from powersample.core.types import ExtendRequest

Waiting = list[tuple[int, ExtendRequest]]  # (the caller's key, its request), in arrival order


@dataclass(eq=False, kw_only=True)
class LaneRow(Row):
    """One request being decoded (engine.Row), with its sequence: it holds the context up to (not including)
    next_id, which goes at position len(seq.ids)."""

    seq: Seq

    def feed(self, most: int | None = None) -> list[int]:
        """engine.Row.feed, at most N_BATCH ids (one llama_decode): a shorter chunk changes no draw, only the
        number of forwards."""
        return super().feed(most)[:N_BATCH]

    def needs(self) -> list[int]:
        """The ids the row's sequence must hold before its next step, once it has drawn a token: the context and
        every token but the last (its next_id)."""
        return [*self.request.context, *self.tokens[:-1]]


def admit(waiting: Waiting, rows: Sequence[LaneRow], capacity: int) -> tuple[Waiting, Waiting]:
    """(requests that start now, requests that keep waiting), in order: up to `capacity` rows, one row per slot."""
    busy = {row.request.slot for row in rows}
    admitted: Waiting = []
    rest: Waiting = []
    for key, request in waiting:
        if len(rows) + len(admitted) < capacity and request.slot not in busy:
            admitted.append((key, request))
            busy.add(request.slot)
        else:
            rest.append((key, request))
    return admitted, rest


def fitting(sizes: Sequence[int], most: int) -> list[list[int]]:
    """Consecutive runs of indices whose sizes sum to at most `most` each (every size is at most `most`): the rows
    of one step, split into llama_decode calls only when their fed ids exceed one batch."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not groups or total + size > most:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups
