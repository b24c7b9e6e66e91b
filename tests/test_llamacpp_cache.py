"""The llamacpp backend's KV-cache bookkeeping (`backends/llamacpp/kvcache.py`) against a fake memory: which sequence
a request takes, what is cut and copied, and that the bookkeeping always says what the cells hold. No llama.cpp."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from powersample.backends.engine import common_prefix
from powersample.backends.llamacpp.kvcache import Seq, SeqCache

PROMPT = (1, 2, 3, 4)


class FakeMemory:
    """A KV cache that holds each sequence's ids and records every call; `recurrent` models cannot cut a tail."""

    def __init__(self, n_seq: int, recurrent: bool = False):
        self.cells: list[list[int]] = [[] for _ in range(n_seq)]
        self.calls: list[tuple] = []
        self.recurrent = recurrent

    def seq_rm(self, seq_id: int, start: int, end: int) -> bool:
        self.calls.append(("rm", seq_id, start, end))
        assert end == -1, "the bookkeeping only ever cuts a tail"
        if start == -1:
            self.cells[seq_id].clear()
            return True
        if self.recurrent and start > 0:
            return False
        del self.cells[seq_id][start:]
        return True

    def seq_cp(self, source: int, target: int) -> None:
        self.calls.append(("cp", source, target))
        assert not self.cells[target], "a copy goes into an emptied sequence"
        self.cells[target] = list(self.cells[source])

    def clear(self) -> None:
        self.calls.append(("clear",))
        self.cells = [[] for _ in self.cells]


def cache_of(max_slots: int = 2, recurrent: bool = False, reuse: bool = True) -> tuple[SeqCache, FakeMemory]:
    memory = FakeMemory(2 * max_slots + 1, recurrent)
    return SeqCache(memory, max_slots, reuse), memory


def feed(memory: FakeMemory, seq: Seq, ids) -> None:
    """What a decode does: the cells hold the ids fed, and the caller appends them to the sequence."""
    memory.cells[seq.seq_id].extend(ids)
    seq.ids.extend(ids)


def run(cache: SeqCache, memory: FakeMemory, context: tuple[int, ...], slot: int, drawn=()) -> Seq:
    """A request as the backend runs it: claim the lane, prefill up to the last context id, decode `drawn`."""
    lane = cache.claim(context, slot, set())
    feed(memory, lane, context[len(lane.ids) :] + tuple(drawn))
    return lane


def consistent(cache: SeqCache, memory: FakeMemory) -> bool:
    return all(memory.cells[s.seq_id] == s.ids for s in cache.seqs)


def test_a_request_extending_its_lane_cuts_nothing_and_copies_nothing():
    cache, memory = cache_of()
    lane = run(cache, memory, PROMPT, slot=0, drawn=(5, 6))
    memory.calls.clear()
    again = cache.claim(PROMPT + (5, 6, 7), 0, set())
    assert again is lane and lane.ids == [1, 2, 3, 4, 5, 6] and memory.calls == []


def test_the_last_context_id_is_always_fed_again():
    cache, memory = cache_of()
    run(cache, memory, PROMPT, slot=0)
    lane = cache.claim(PROMPT, 0, set())
    assert lane.ids == list(PROMPT[:-1]) and memory.calls[-1] == ("rm", lane.seq_id, 3, -1)


def test_another_slot_copies_the_shared_prompt():
    cache, memory = cache_of()
    first = run(cache, memory, PROMPT, slot=0, drawn=(9,))
    memory.calls.clear()
    second = cache.claim(PROMPT + (7,), 1, set())
    assert second is not first and second.ids == list(PROMPT)
    assert ("cp", first.seq_id, second.seq_id) in memory.calls and consistent(cache, memory)


def test_a_proposal_saves_the_state_in_the_bank_and_a_rejection_takes_it_back():
    cache, memory = cache_of()
    state = PROMPT + (5, 6, 7, 8)
    lane = run(cache, memory, state, slot=0)
    bank = cache.seqs[cache.max_slots + lane.seq_id]
    proposal = run(cache, memory, PROMPT + (5, 9), slot=0, drawn=(10,))  # cut at 5: the state would be lost
    assert proposal is lane and bank.ids == list(state) and lane.ids == [1, 2, 3, 4, 5, 9, 10]
    memory.calls.clear()
    back = cache.claim(state + (11,), 0, set())  # rejected: go on from the state
    assert back is lane and lane.ids == list(state) and ("cp", bank.seq_id, lane.seq_id) in memory.calls
    assert consistent(cache, memory)


def test_a_free_cut_stays_in_the_lane():
    """Losing only the id re-fed anyway is no loss: no save to the bank."""
    cache, memory = cache_of()
    run(cache, memory, PROMPT + (5,), slot=0)
    memory.calls.clear()
    lane = cache.claim(PROMPT + (6,), 0, set())
    assert lane.ids == list(PROMPT) and [c[0] for c in memory.calls] == ["rm"]


def test_a_new_slot_takes_the_least_recently_used_idle_lane():
    cache, memory = cache_of(max_slots=2)
    a, b = run(cache, memory, PROMPT, 0), run(cache, memory, PROMPT, 1)
    run(cache, memory, PROMPT, 0)  # slot 0 used again: slot 1 is now the least recently used
    assert cache.claim(PROMPT, 2, set()) is b
    assert cache.claim(PROMPT, 3, busy_slots={2}) is a  # slot 2 decodes now: its lane is not taken


def test_a_recurrent_model_starts_a_sequence_over_when_it_cannot_cut():
    cache, memory = cache_of(recurrent=True)
    lane = run(cache, memory, PROMPT + (5, 6), slot=0)
    cache.cut(lane, 2)
    assert lane.ids == [] and memory.calls[-2:] == [("rm", lane.seq_id, 2, -1), ("rm", lane.seq_id, -1, -1)]
    assert consistent(cache, memory)


def test_without_reuse_every_request_starts_from_an_empty_lane():
    cache, memory = cache_of(reuse=False)
    run(cache, memory, PROMPT, slot=0)
    run(cache, memory, PROMPT, slot=1)
    assert cache.claim(PROMPT + (5,), 0, set()).ids == [] and not any(c[0] == "cp" for c in memory.calls)


def test_scoring_takes_the_longest_prefix_but_no_row_it_must_read():
    cache, memory = cache_of()
    run(cache, memory, PROMPT, slot=0, drawn=(5, 6, 7))
    scratch = cache.for_scoring([1, 2, 3, 4, 5, 6, 7, 8], first_output=5)
    assert scratch is cache.scratch and scratch.ids == [1, 2, 3, 4, 5] and consistent(cache, memory)
    assert cache.for_scoring([9, 9], first_output=1).ids == []


def test_moving_to_a_smaller_memory_cuts_to_its_room_and_drops_what_cannot_move():
    cache, memory = cache_of()
    a = run(cache, memory, PROMPT, slot=0, drawn=(5, 6))
    b = run(cache, memory, (7, 8, 9), slot=1)
    new = FakeMemory(len(cache.seqs))

    def move(seq_id: int) -> bool:  # b's cells cannot be moved
        if seq_id == b.seq_id:
            return False
        new.cells[seq_id] = list(memory.cells[seq_id])
        return True

    cache.move(new, 3, move)
    assert a.ids == [1, 2, 3] and b.ids == [] and cache.memory is new and consistent(cache, new)


def test_clear_empties_every_sequence():
    cache, memory = cache_of()
    run(cache, memory, PROMPT, slot=0)
    cache.clear()
    assert all(not s.ids for s in cache.seqs) and memory.calls[-1] == ("clear",)


requests = st.lists(
    st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=6), st.integers(0, 3), st.lists(st.integers(0, 2))),
    min_size=1,
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(requests, st.booleans())
def test_the_bookkeeping_says_what_the_cells_hold_and_reuses_the_longest_prefix(steps, recurrent):
    cache, memory = cache_of(max_slots=2, recurrent=recurrent)
    for context, slot, drawn in steps:
        context = tuple(context)
        longest = max(common_prefix(s.ids, context) for s in cache.seqs[:-1])
        lane = cache.claim(context, slot, set())
        assert consistent(cache, memory)
        assert lane.ids == list(context[: len(lane.ids)]) and len(lane.ids) <= len(context) - 1
        if not recurrent:
            assert len(lane.ids) == min(longest, len(context) - 1)
        feed(memory, lane, context[len(lane.ids) :] + tuple(drawn))
    scratch = cache.for_scoring(list(steps[-1][0]), first_output=0)
    assert scratch.ids == [] and consistent(cache, memory)
