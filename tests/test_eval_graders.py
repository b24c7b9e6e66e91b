"""Graders on known answers: MATH (math-verify), HumanEval code extraction and tests, GPQA letters, AlpacaEval."""

from __future__ import annotations

import json
import time

import pytest
from support.toy import SHARED_DATA

from powersample.errors import PowerSampleError
from powersample.eval import math_grader
from powersample.eval.tasks import GradeOptions, Problem, get_task, gpqa, humaneval

MATH500 = SHARED_DATA / "MATH500.json"
FAST = GradeOptions(code_timeout=5.0, math_timeout=5.0)


def math_problem(gold: str) -> Problem:
    return Problem(id="t", prompt="p", gold=gold)


def grade_math(gold: str, completion: str, timeout: float = 5.0):
    return get_task("math500").grade(math_problem(gold), completion, GradeOptions(math_timeout=timeout))


# --- MATH --------------------------------------------------------------------------------------------------------

EQUIVALENT = [
    ("0.5", r"\frac12"),  # the paper's grader counted these as equal
    (r"\frac{1}{2}", "0.5"),
    (r"\frac12", r"\dfrac{1}{2}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"),
    ("p - q", "-q + p"),
    ("10", "10.0"),
    (r"\text{(C)}", "C"),
    ("x^2+1", "1+x^2"),
    (r"50\%", "50"),
    (r"\$18.90", "18.90"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
]


@pytest.mark.parametrize("gold, answer", EQUIVALENT)
def test_math_equivalent_forms_are_correct(gold, answer):
    grade = grade_math(gold, f"Reasoning... so the answer is $\\boxed{{{answer}}}$.")
    assert grade.correct is True and grade.answer == answer


@pytest.mark.parametrize("gold, answer", [("10", "11"), (r"\frac12", "0.6"), ("p - q", "q - p"), ("3", r"\frac{")])
def test_math_wrong_or_malformed_answers_are_incorrect(gold, answer):
    grade = grade_math(gold, f"\\boxed{{{answer}}}")
    assert grade.correct is False


def test_math_the_last_boxed_answer_counts():
    assert grade_math("7", r"first \boxed{3}, then corrected: \boxed{7}").correct is True
    assert grade_math("3", r"first \boxed{3}, then corrected: \boxed{7}").correct is False


@pytest.mark.parametrize("completion", ["The answer is 7.", "", r"\boxed{", r"\boxed{}"])
def test_math_no_boxed_answer_is_incorrect(completion):
    grade = grade_math("7", completion)
    assert grade.correct is False and grade.answer is None and "no boxed" in grade.detail


def test_math_hard_latex_cannot_hang_the_grader():
    start = time.perf_counter()
    grade = grade_math("6", r"\boxed{9^{9^{9^{9}}}}", timeout=1.5)
    assert grade.correct is False and time.perf_counter() - start < 30
    assert grade_math("6", r"\boxed{6}").correct is True  # the killed worker was replaced


def test_math_grader_works_off_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(grade_math, "0.5", r"\boxed{\frac{1}{2}}").result().correct is True


@pytest.mark.parametrize(
    "text, want",
    [
        (r"so \boxed{\frac{1}{2}} and finally \boxed{x^{2}}.", "x^{2}"),
        (r"$\boxed 5$", "5"),
        (r"\fbox{4}", "4"),
        (r"\boxed{\left\{ 1, 2 \right\}}", r"\left\{ 1, 2 \right\}"),
        (r"\boxed{unclosed", None),
        ("no box", None),
    ],
)
def test_last_boxed(text, want):
    assert math_grader.last_boxed(text) == want


@pytest.mark.skipif(not MATH500.exists(), reason=f"shared data file {MATH500} is absent")
def test_math500_gold_answers_grade_as_correct_against_themselves():
    task = get_task("math500")
    problems = task.load(str(MATH500), True)
    assert len(problems) == 500 and len({p.id for p in problems}) == 500
    assert problems[0].prompt.startswith("Can you solve the following math problem? ")
    assert problems[0].prompt.endswith("Please reason step by step, and put your final answer within \\boxed{}.")
    wrong = [p.id for p in problems if not task.grade(p, f"$\\boxed{{{p.gold}}}$", FAST).correct]
    assert wrong == []


def test_math_data_file_errors(tmp_path):
    task = get_task("math500")
    bad = tmp_path / "bad.json"
    cases = [
        ("{not json", "neither JSON nor JSONL"),
        ("[]", "non-empty"),
        ('[{"answer": "1"}]', "problem"),
        ('[{"problem": "x"}]', "answer"),
        ("[1, 2]", "not an object"),
    ]
    for content, word in cases:
        bad.write_text(content)
        with pytest.raises(PowerSampleError, match=word):
            task.load(str(bad), True)
    with pytest.raises(PowerSampleError, match="cannot read"):
        task.load(str(tmp_path / "missing.json"), True)
    good = tmp_path / "good.jsonl"
    good.write_text('{"problem": "1+1?", "answer": "2"}\n\n{"prompt": "2+2?", "answer": 4, "id": "b"}\n')
    problems = task.load(str(good), True)
    assert [p.id for p in problems] == ["0", "b"] and problems[1].gold == "4"


# --- HumanEval ---------------------------------------------------------------------------------------------------

STUB = Problem(
    id="T/0",
    prompt='def add(a, b):\n    """Add two numbers."""\n',
    gold="    return a + b\n",
    extra={
        "code_prompt": 'def add(a, b):\n    """Add two numbers."""\n',
        "entry_point": "add",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    },
)


@pytest.mark.parametrize(
    "completion",
    [
        "    return a + b\n",  # raw continuation (base model)
        "    return a + b\n\ndef unrelated():\n    pass\n\nprint(add(1, 2))\n",  # ...that runs on past the function
        "    return a + b\n```\nThat's it.",  # a continuation closing the prompt's fence
        "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nHope it helps.",  # chat: whole function
        "```python\nimport operator\n\ndef add(a, b):\n    return operator.add(a, b)\n```",  # with an import
        "```\nreturn a + b\n```",  # chat: a bare unindented body
        "```python\n    return a + b\n```",  # chat: an indented body
        "Sure.\ndef add(a, b):\n    return a + b\n",  # chat without a fence
    ],
)
def test_humaneval_extraction_for_base_and_chat_completions(completion):
    grade = humaneval.grade(STUB, completion, FAST)
    assert grade.correct is True, (grade, humaneval.program(STUB, grade.answer))


@pytest.mark.parametrize(
    "completion, detail",
    [
        ("    return a - b\n", "AssertionError"),
        ("    return a +\n", "SyntaxError"),
        ("    import sys\n    sys.exit(0)\n", "SystemExit"),  # exiting early is not passing
        ("    import os\n    os._exit(0)\n", "exit code 0"),
        ("", "AssertionError"),  # the stub alone returns None
    ],
)
def test_humaneval_failures(completion, detail):
    grade = humaneval.grade(STUB, completion, FAST)
    assert grade.correct is False and detail in grade.detail


def test_humaneval_package_data_and_canonical_solutions():
    task = get_task("humaneval")
    raw, chat = task.load(None, False), task.load(None, True)
    assert len(raw) == 164 and raw[0].id == "HumanEval/0"
    assert raw[0].prompt == raw[0].extra["code_prompt"] and "```python" in chat[0].prompt
    for p in (raw[0], raw[162]):  # 162 imports hashlib
        assert task.grade(p, p.gold, FAST).correct is True
        assert task.grade(p, "    return None\n", FAST).correct is False


def test_humaneval_data_file_errors(tmp_path):
    bad = tmp_path / "he.jsonl"
    bad.write_text('{"task_id": "x", "prompt": "def f():\\n"}\n')
    with pytest.raises(PowerSampleError, match="lacks entry_point, test"):
        get_task("humaneval").load(str(bad), False)
    bad.write_text("{oops\n")
    with pytest.raises(PowerSampleError, match="cannot read HumanEval data"):
        get_task("humaneval").load(str(bad), False)


# --- GPQA --------------------------------------------------------------------------------------------------------

GPQA_HEADER = [
    "Record ID",
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
    "Subdomain",
]


def write_gpqa(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(GPQA_HEADER)
        writer.writerows(rows)


def test_gpqa_load_shuffle_and_grade(tmp_path):
    path = tmp_path / "gpqa.csv"
    write_gpqa(
        path,
        [
            [f"rec{i}", f"Question {i}?", "right", "wrong1", "wrong2, with a comma", "wrong3", "Physics"]
            for i in range(8)
        ],
    )
    task = get_task("gpqa")
    problems = task.load(str(path), True)
    assert problems == task.load(str(path), True)  # the shuffle is seeded
    assert len({tuple(p.extra["order"]) for p in problems}) > 1  # ... but differs between questions
    for p in problems:
        assert f"{p.gold}) right" in p.prompt and "wrong2, with a comma" in p.prompt
        assert task.grade(p, f"Thinking about A and B... The answer is {p.gold}.", FAST).correct is True
        other = next(x for x in "ABCD" if x != p.gold)
        assert task.grade(p, f"The answer is ({other})", FAST).correct is False
    assert task.grade(problems[0], "I cannot decide.", FAST).correct is False


@pytest.mark.parametrize(
    "text, want",
    [
        ("The answer is B.", "B"),
        ("(C)", "C"),
        ("A) no; D) yes", "D"),
        ("**Answer: A**", "A"),
        ("Because DNA is ...", None),
        ("ABCD", None),
        ("Answer: E", None),
    ],
)
def test_gpqa_last_standalone_letter(text, want):
    assert gpqa.last_letter(text) == want


def test_gpqa_needs_its_csv(tmp_path):
    with pytest.raises(PowerSampleError, match="gated"):
        get_task("gpqa").load(None, True)
    path = tmp_path / "g.csv"
    path.write_text("Question,Correct Answer\nq,a\n")
    with pytest.raises(PowerSampleError, match="missing column"):
        get_task("gpqa").load(str(path), True)


# --- AlpacaEval --------------------------------------------------------------------------------------------------


def test_alpacaeval_load_and_export(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(
        json.dumps(
            [{"instruction": "Say hi.", "dataset": "helpful_base", "output": "ref"}, {"instruction": "Count to 3."}]
        )
    )
    task = get_task("alpacaeval")
    problems = task.load(str(path), True)
    assert [p.prompt for p in problems] == ["Say hi.", "Count to 3."]
    assert task.grade(problems[0], " hi ", FAST).correct is None
    records = [{"problem_id": p.id, "seed": s, "completion": f" out {p.id} {s} "} for p in problems for s in (0, 1)]
    task.export(tmp_path, problems, records[::-1], "powersample-power-x")
    rows = json.loads((tmp_path / "alpaca_eval_outputs.seed1.json").read_text())
    gen = "powersample-power-x"
    assert rows == [
        {"instruction": "Say hi.", "output": "out 0 1", "generator": gen, "dataset": "helpful_base"},
        {"instruction": "Count to 3.", "output": "out 1 1", "generator": gen, "dataset": "alpaca_eval"},
    ]
    with pytest.raises(PowerSampleError, match="--data"):
        task.load(None, True)
