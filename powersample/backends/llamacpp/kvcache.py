"""The llamacpp backend's KV-cache bookkeeping: which sequence holds which ids, which one a request takes, and what is
cut or copied to get it there. Pure logic over an abstract `Memory` (llama.cpp's `llama_memory_*` calls, or a fake in
tests/test_llamacpp_cache.py); it never imports llama_cpp.

One llama.cpp context holds 2 x max_slots + 1 sequences, each in its own KV stream. Slot s owns two (pairs go to
slots least recently used first): a lane, where its requests are decoded, and a bank, so an MH proposal never
destroys the current state's cache. A request takes the longest common prefix with its context from any sequence
(another slot's too, so chains share the prompt): from its own lane by cutting it back, after saving the lane in the
bank when the cut loses tokens; from the bank or another sequence by copying it into the lane (ties go to the lane
when the cut is free, else to the bank). The last sequence is scratch space for scoring. Correctness never depends
on the slot: a foreign slot only costs a longer prefill.

Invariant: after every call, each sequence's `ids` are exactly the ids its cells hold, at positions 0, 1, ... (the
caller appends with `Seq.ids.extend` right after each decode that filled cells).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from powersample.backends.engine import common_prefix
from powersample.core.types import Tokens


class Memory(Protocol):
    """The KV-cache operations the bookkeeping needs (llama.cpp's `llama_memory_seq_rm`, `_seq_cp`, `_clear`)."""

    def seq_rm(self, seq_id: int, start: int, end: int) -> bool:
        """Drop the sequence's cells at positions [start, end) (-1: open); False when the model cannot cut a
        sequence there (a recurrent one). start = end = -1 (the whole sequence) never fails."""
        ...

    def seq_cp(self, source: int, target: int) -> None:
        """Make `target` (emptied first) hold a copy of every cell of `source`."""
        ...

    def clear(self) -> None:
        """Empty every sequence."""
        ...


@dataclass(eq=False)
class Seq:
    """One sequence of the KV cache: its llama.cpp id and the ids its cells hold (positions 0, 1, ...)."""

    seq_id: int
    ids: list[int] = field(default_factory=list)


class SeqCache:
    """The sequences of one context: max_slots lanes, max_slots banks, one scratch (module docstring)."""

    def __init__(self, memory: Memory, max_slots: int, reuse: bool = True):
        self.memory = memory
        self.max_slots = max_slots
        self.reuse = reuse  # False: every request starts from an empty lane (the no-cache baseline)
        self.seqs = [Seq(i) for i in range(2 * max_slots + 1)]  # lanes, banks, scratch
        self._lanes: OrderedDict[int, int] = OrderedDict()  # slot -> its lane's index, least recently used first

    @property
    def scratch(self) -> Seq:
        return self.seqs[-1]

    def claim(self, context: Tokens, slot: int, busy_slots: set[int]) -> Seq:
        """`slot`'s lane, made to hold the longest cached prefix of context[:-1] (`busy_slots`: slots decoding now,
        whose lanes are not taken)."""
        return self._target(context, self._lane(slot, busy_slots))

    def _lane(self, slot: int, busy_slots: set[int]) -> int:
        """The index of `slot`'s lane; a new slot takes a free one, else the least recently used idle slot's."""
        if slot in self._lanes:
            self._lanes.move_to_end(slot)
        elif len(self._lanes) < self.max_slots:
            self._lanes[slot] = len(self._lanes)
        else:
            idle = next(s for s in self._lanes if s not in busy_slots)  # rows <= max_slots: one is always idle
            self._lanes[slot] = self._lanes.pop(idle)
        return self._lanes[slot]

    def _target(self, context: Tokens, k: int) -> Seq:
        """Lane k, made to hold the longest cached prefix of context[:-1] without losing the state it held.

        Cutting the lane in place is free; when the cut would drop tokens, the lane is first saved in the bank,
        unless the bank holds as long a prefix, which is then copied into the lane instead.
        """
        lane, bank = self.seqs[k], self.seqs[self.max_slots + k]
        if not self.reuse:
            self.cut(lane, 0)
            return lane
        other, common = self.best_source(context, exclude=(lane, bank))
        at_lane, at_bank = common_prefix(lane.ids, context), common_prefix(bank.ids, context)
        best = max(at_lane, at_bank, common)
        keep = min(best, len(context) - 1)
        lossy = len(lane.ids) > keep + 1  # it holds more than a prefix of the context (plus the token re-fed anyway)
        if at_lane == best and not (lossy and at_bank == best):
            if lossy:
                self.copy(lane, bank)
        else:
            self.copy(bank if at_bank == best else other, lane)
        self.cut(lane, keep)
        return lane

    def for_scoring(self, ids: Sequence[int], first_output: int) -> Seq:
        """The scratch sequence, made to hold the longest cached prefix of `ids` (of any sequence), never past
        `first_output`, so that every row read from there on is decoded now."""
        scratch = self.scratch
        source, common = self.best_source(ids, exclude=(scratch,))
        if common > common_prefix(scratch.ids, ids):
            self.copy(source, scratch)
        self.cut(scratch, min(common_prefix(scratch.ids, ids), first_output))
        return scratch

    def best_source(self, ids: Sequence[int], exclude: Sequence[Seq] = ()) -> tuple[Seq, int]:
        """(the sequence sharing the longest prefix with ids, that length), among all but `exclude`; the first
        such sequence on a tie."""
        candidates = [s for s in self.seqs if s not in exclude]
        common = [common_prefix(s.ids, ids) for s in candidates]
        best = max(range(len(candidates)), key=common.__getitem__)
        return candidates[best], common[best]

    def cut(self, seq: Seq, keep: int) -> None:
        """Drop the sequence's cells from position `keep` on (all of them where the model cannot cut there)."""
        if keep >= len(seq.ids):
            return
        if not self.memory.seq_rm(seq.seq_id, keep, -1):  # a recurrent model: start over
            self.memory.seq_rm(seq.seq_id, -1, -1)  # removing a whole sequence never fails
            keep = 0
        del seq.ids[keep:]

    def copy(self, source: Seq, target: Seq) -> None:
        """Make `target` hold what `source` holds (llama.cpp copies the whole stream at the next decode, before
        that decode runs; nothing is recomputed)."""
        self.cut(target, 0)
        if source.ids:
            self.memory.seq_cp(source.seq_id, target.seq_id)
            target.ids = list(source.ids)

    def clear(self) -> None:
        """Empty every sequence (lanes keep their slots)."""
        self.memory.clear()
        for seq in self.seqs:
            seq.ids.clear()

    def move(self, memory: Memory, room: int, move_cells: Callable[[int], bool]) -> None:
        """Move every sequence to `memory` (a new context with `room` cells per sequence): each one cut to `room`
        in the old memory, then its cells moved by `move_cells(seq_id)`; one that could not be moved is empty
        there (it only costs a prefill later)."""
        for seq in self.seqs:
            self.cut(seq, room)
            if seq.ids and not move_cells(seq.seq_id):
                seq.ids.clear()
        self.memory = memory
