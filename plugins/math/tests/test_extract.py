"""Answer extraction: every path, malformed and truncated text, and reference labels."""

from __future__ import annotations

import re

import pytest
from sdpo_math.extract import clean_answer, extract_answer, find_boxed, gold_answer, last_number


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2^{2}}}", "\\frac{\\sqrt{3}}{2^{2}}"),  # nested braces
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("\\fbox{7}", "7"),
        ("\\boxed {7}", "7"),
        ("\\boxed 7.", "7"),  # TeX's one-token argument
        ("$\\boxed{ 3 }$", "3"),
    ],
)
def test_boxed(completion: str, answer: str) -> None:
    found = extract_answer(completion)
    assert (found.answer, found.source, found.truncated) == (answer, "boxed", False)


def test_last_of_several_boxes_is_used_and_counted() -> None:
    found = extract_answer("First \\boxed{3}, no wait, \\fbox{4}, finally \\boxed{5}")
    assert (found.answer, found.n_boxed) == ("5", 3)


def test_box_wins_over_answer_line_and_numbers() -> None:
    assert extract_answer("Answer: 9\n\\boxed{8} then 7").answer == "8"


@pytest.mark.parametrize(
    "completion",
    ["The sum is \\boxed{4", "\\boxed{\\frac{1}{2}", "ok \\boxed{3} and then \\boxed{", "so \\boxed"],
)
def test_unclosed_box_is_truncated_never_used(completion: str) -> None:
    found = extract_answer(completion)
    assert found.truncated
    assert found.unbalanced_braces
    assert found.source == "boxed"


def test_unclosed_box_keeps_what_was_written() -> None:
    found = extract_answer("ok \\boxed{3} and then \\boxed{4")
    assert (found.answer, found.n_boxed) == ("4", 1)


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("3 + 4 = 7\nAnswer: 7", "7"),
        ("**Final Answer:** $\\frac{1}{2}$", "\\frac{1}{2}"),
        ("The answer is 12.", "12"),
        ("the final answer is: 5 apples", "5 apples"),
        ("Answer: 1\nAnswer: 2", "2"),
        ("Answer: $x = 3$ because it works", "x = 3"),
    ],
)
def test_answer_line(completion: str, answer: str) -> None:
    found = extract_answer(completion)
    assert (found.answer, found.source) == (answer, "answer_line")


def test_custom_and_disabled_answer_pattern() -> None:
    assert extract_answer("RESULT => 9", answer_pattern=r"RESULT => (\d+)").answer == "9"
    compiled = re.compile(r"res=(?P<answer>\w+)")
    assert extract_answer("res=ok 3", answer_pattern=compiled, fallback_last_number=False).answer == "ok"
    found = extract_answer("Answer: 5 and 6", answer_pattern=None)
    assert (found.answer, found.source) == ("6", "last_number")


def test_prefer_answer_line() -> None:
    found = extract_answer("\\boxed{3}\nAnswer: 4", prefer="answer_line")
    assert (found.answer, found.source) == ("4", "answer_line")
    assert extract_answer("\\boxed{3}", prefer="answer_line").source == "boxed"


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("3 + 4 = 7.", "7"),
        ("we owe -12 now", "-12"),
        ("it costs 1,234.50 in total", "1,234.50"),
        ("half is 1/2", "1/2"),
        ("x2 and y3 but 8", "8"),  # digits glued to words are not numbers
        ("unicode minus −5", "-5"),
        ("it is \\frac{1}{8}", "\\frac{1}{8}"),
        ("so -\\dfrac{3}{4} it is", "-\\dfrac{3}{4}"),
        ("\\frac12 of 4 is 2", "2"),
        ("no numbers here", None),
    ],
)
def test_last_number(text: str, number: str | None) -> None:
    assert last_number(text) == number


def test_last_number_fallback_can_be_disabled() -> None:
    assert extract_answer("it is 7").source == "last_number"
    found = extract_answer("it is 7", fallback_last_number=False)
    assert (found.answer, found.source) == (None, None)


def test_huge_number() -> None:
    big = str(10**400)
    assert extract_answer(f"\\boxed{{{big}}}").answer == big
    assert extract_answer(f"so it is {big}").answer == big


@pytest.mark.parametrize("completion", ["", "   \n", "I do not know.", "}{"])
def test_nothing_found(completion: str) -> None:
    found = extract_answer(completion)
    assert found.answer is None
    assert not found.truncated


def test_unbalanced_braces_without_box() -> None:
    assert extract_answer("Let $f(x) = \\frac{1}{").unbalanced_braces
    assert not extract_answer("Let $f(x) = \\frac{1}{2}$").unbalanced_braces


def test_empty_box() -> None:
    found = extract_answer("\\boxed{}")
    assert (found.answer, found.n_boxed) == ("", 1)


def test_find_boxed_reports_unclosed_tail() -> None:
    assert find_boxed("\\boxed{1} \\fbox{2} \\boxed{3") == (["1", "2"], "3")


@pytest.mark.parametrize(
    ("text", "clean"),
    [("$5$", "5"), ("\\(x+1\\)", "x+1"), ("**7**.", "7"), ("  42 ", "42"), ("1, 2, ...", "1, 2, ...")],
)
def test_clean_answer(text: str, clean: str) -> None:
    assert clean_answer(text) == clean


@pytest.mark.parametrize(
    ("label", "gold"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),  # GSM8K
        ("#### 1,000", "1,000"),
        ("So the area is $\\boxed{\\frac{\\pi}{4}}$.", "\\frac{\\pi}{4}"),  # MATH solution
        ("\\frac{1}{2}", "\\frac{1}{2}"),
        ("$3$", "3"),
        (42, "42"),
        (0.5, "0.5"),
    ],
)
def test_gold_answer(label: object, gold: str) -> None:
    assert gold_answer(label) == gold


def test_gold_answer_rejects_unclosed_box_and_non_text() -> None:
    with pytest.raises(ValueError, match="never closes"):
        gold_answer("so \\boxed{3")
    with pytest.raises(TypeError):
        gold_answer(True)
    with pytest.raises(TypeError):
        gold_answer(["42"])
