"""TextStream: the text deltas of a sample streamed token by token add up to the final text (decoded, cut before the
earliest stop string), whatever the tokens, their runs and the stops, and no delta is ever taken back."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")

from hypothesis import given, settings
from hypothesis import strategies as st

import powersample
from powersample.server.deltas import TextStream

# pieces that split characters over tokens (bytes), merge into others, and spell stop strings across tokens
BYTES = [b"a", b"b", b" ", b"\n", b"ab", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"STOP", b"ST", b"OP", b"\n\n"]


def byte_decode(tokens) -> str:
    """A byte-level detokenizer, as GPT-2 style tokenizers: the bytes joined, then decoded with replacement."""
    return b"".join(BYTES[t] for t in tokens).decode("utf-8", errors="replace")


def final_text(decode, tokens, stops) -> str:
    """The non-streamed text: protocol.finish's cut of the decoded tokens."""
    text = decode(tokens)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def stream(decode, tokens, runs, stops) -> tuple[list[str], str]:
    """The deltas sent while the runs arrive, and the rest sent at the end."""
    out, i = TextStream(decode, stops), 0
    deltas = []
    for n in runs:
        deltas.append(out.add(tokens[i : i + n]))
        i += n
    deltas.append(out.add(tokens[i:]))
    return deltas, out.finish(final_text(decode, tokens, stops))


@settings(max_examples=400, deadline=None)
@given(
    tokens=st.lists(st.integers(0, len(BYTES) - 1), max_size=40),
    runs=st.lists(st.integers(1, 4), max_size=40),
    stops=st.lists(st.sampled_from(["STOP", "\n", "b\n", "é", "ab a", "€ "]), max_size=3),
)
def test_deltas_add_up_to_the_final_text(tokens, runs, stops):
    deltas, rest = stream(byte_decode, tokens, runs, stops)
    assert "".join(deltas) + rest == final_text(byte_decode, tokens, stops)


def test_all_but_the_last_token_is_sent_as_it_arrives():
    out = TextStream(lambda ts: "".join("xyz"[t] for t in ts), [])
    assert [out.add([t]) for t in (0, 1, 2, 0)] == ["", "x", "y", "z"]
    assert out.finish("xyzx") == "x"


def test_a_character_split_over_tokens_waits_for_its_last_byte():
    out = TextStream(byte_decode, [])
    assert out.add([0]) == "" and out.add([7]) == "a"  # "a", then the first two bytes of "€"
    assert out.add([8]) == "" and out.add([0]) == "€"  # its last byte, then the next token settles it
    assert out.finish("a€a") == "a"


def test_a_possible_stop_string_is_held_back_and_nothing_after_one_is_sent():
    out = TextStream(byte_decode, ["STOP"])
    deltas = [out.add([t]) for t in (0, 10, 0, 10, 11, 0, 0)]  # a ST a ST OP a a
    assert deltas == ["", "a", "", "STa", "", "", ""]  # "ST" waits until "a" shows it was no stop; then STOP
    assert out.finish("aSTa") == ""


def test_a_final_text_that_does_not_extend_the_streamed_text_is_an_error():
    out = TextStream(lambda ts: "ab"[: len(ts)], [])
    out.add([0, 0, 0])
    with pytest.raises(RuntimeError, match="not a prefix"):
        out.finish("b")


@pytest.mark.slow
def test_the_embedded_tokenizer_streams_its_own_text():
    """Random ids of the embedded model's vocabulary (byte tokens that split characters included), in runs of 1-3:
    the deltas and the rest are its decode, cut before a stop."""
    import numpy as np

    backend = powersample.load_backend("auto")
    rng = np.random.default_rng(0)
    prompt = backend.encode("Schreibe «café» und 价格 — 3 € pro Stück.\nThen stop.", chat=False)
    for trial in range(40):
        tokens = [int(t) for t in rng.integers(0, 49152, size=30)] if trial % 2 else list(prompt)
        runs = [int(n) for n in rng.integers(1, 4, size=30)]
        stops = [["\n"], [], ["é", "Then"], [" pro"]][trial % 4]
        deltas, rest = stream(backend.decode, tokens, runs, stops)
        assert "".join(deltas) + rest == final_text(backend.decode, tokens, stops)
        if trial % 2 == 0 and not stops:
            assert len("".join(deltas)) > len(rest)  # most of the text went out before the end
