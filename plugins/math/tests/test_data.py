"""Datasets: the procedural generator and the GSM8K / MATH / generic loaders."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import datasets
import pytest
from sdpo_math.data import (
    SYSTEM_PROMPTS,
    MalformedRowError,
    generate_problems,
    load_gsm8k,
    load_math,
    load_problems,
    make_prompt,
)


def rows(result: Any) -> list[dict[str, Any]]:
    assert isinstance(result, list)
    return result


def evaluate_question(question: str) -> Fraction:
    """An independent check of an arithmetic row: parse "What is …?" with Python's precedence."""
    expression = re.fullmatch(r"What is (.+)\?", question)
    assert expression
    tokens = expression.group(1).replace("×", "*").replace("÷", "/").split()
    source = " ".join(f"Fraction({t})" if t.isdigit() else t for t in tokens)
    return eval(source, {"Fraction": Fraction})  # our own generated digits and operators only


# ---------------------------------------------------------------------------------------- generator
def test_difficulty_zero_is_one_digit_addition() -> None:
    for row in rows(generate_problems(200, difficulty=0, as_dataset=False)):
        a, b = map(int, re.fullmatch(r"What is (\d) \+ (\d)\?", row["question"]).groups())  # type: ignore[union-attr]
        assert row["answer"] == str(a + b)


@pytest.mark.parametrize("difficulty", range(8))
def test_arithmetic_answers_are_right(difficulty: int) -> None:
    for row in rows(generate_problems(60, difficulty=difficulty, seed=7, as_dataset=False)):
        assert Fraction(row["answer"]) == evaluate_question(row["question"]), row


def test_difficulty_grows() -> None:
    def longest_number(difficulty: int) -> int:
        questions = [r["question"] for r in rows(generate_problems(100, difficulty=difficulty, as_dataset=False))]
        return max(len(n) for q in questions for n in re.findall(r"\d+", q))

    assert longest_number(0) == 1
    assert longest_number(2) == 2
    assert longest_number(4) == 3
    assert all(int(r["answer"]) >= 0 for r in rows(generate_problems(100, difficulty=2, as_dataset=False)))


@pytest.mark.parametrize("difficulty", [0, 1, 3, 5])
def test_word_problems(difficulty: int) -> None:
    for row in rows(generate_problems(50, difficulty=difficulty, kind="word", as_dataset=False)):
        assert row["kind"] == "word"
        assert row["question"].endswith("?")
        assert int(row["answer"]) >= 0


def test_word_problem_zero_is_one_step_addition() -> None:
    for row in rows(generate_problems(50, kind="word", as_dataset=False)):
        numbers = [int(n) for n in re.findall(r"\d+", row["question"])]
        assert len(numbers) == 2
        assert int(row["answer"]) == sum(numbers)


def test_seed_and_row_stability() -> None:
    first = rows(generate_problems(20, seed=1, kind="mixed", difficulty=3, as_dataset=False))
    again = rows(generate_problems(30, seed=1, kind="mixed", difficulty=3, as_dataset=False))
    other = rows(generate_problems(20, seed=2, kind="mixed", difficulty=3, as_dataset=False))
    assert first == again[:20]  # row i does not depend on n
    assert first != other
    assert {r["kind"] for r in again} == {"arithmetic", "word"}
    assert len({r["id"] for r in again}) == 30


def test_generator_columns_and_formats() -> None:
    ds = generate_problems(3)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["prompt", "question", "answer", "difficulty", "kind", "id"]
    assert ds[0]["prompt"][0] == {"role": "system", "content": SYSTEM_PROMPTS["boxed"]}
    plain = rows(generate_problems(1, chat=False, answer_format="answer_line", as_dataset=False))[0]
    assert plain["prompt"] == f"{plain['question']}\n{SYSTEM_PROMPTS['answer_line']}"


def test_generator_validates() -> None:
    with pytest.raises(ValueError, match="difficulty"):
        generate_problems(1, difficulty=-1)
    with pytest.raises(ValueError, match="kind"):
        generate_problems(1, kind="poems")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="answer_format"):
        make_prompt("q", answer_format="xml")  # type: ignore[arg-type]


def test_system_prompt_can_be_dropped() -> None:
    assert make_prompt("q", system_prompt="") == [{"role": "user", "content": "q"}]
    assert make_prompt("q", system_prompt="", chat=False) == "q"


# ------------------------------------------------------------------------------------------ loaders
GSM8K = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "A big number?", "answer": "It is big.\n#### 1,000"},
]
MATH = [
    {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "solution": "It is $\\boxed{\\frac{3}{4}}$.",
     "level": "Level 1", "type": "Algebra"},
    {"problem": "Solve $x+1=3$.", "solution": "So $x = \\boxed{2}$.", "answer": "2", "subject": "Algebra",
     "level": 1},
]


def write_jsonl(path: Path, data: list[dict[str, Any]]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in data) + "\n\n", encoding="utf-8")
    return path


def test_gsm8k_from_jsonl(tmp_path: Path) -> None:
    ds = load_gsm8k(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K))
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["prompt", "question", "answer", "solution"]
    assert ds["answer"] == ["72", "1000"]
    assert ds[0]["solution"].endswith("#### 72")
    assert ds[0]["prompt"][-1] == {"role": "user", "content": GSM8K[0]["question"]}


def test_gsm8k_from_rows_dataset_and_generator() -> None:
    assert rows(load_gsm8k(GSM8K, as_dataset=False))[0]["answer"] == "72"
    assert rows(load_gsm8k(datasets.Dataset.from_list(GSM8K), as_dataset=False))[1]["answer"] == "1000"
    assert len(rows(load_gsm8k(iter(GSM8K), as_dataset=False))) == 2  # a one-shot iterable is read once


def test_math_from_json(tmp_path: Path) -> None:
    path = tmp_path / "math.json"
    path.write_text(json.dumps(MATH), encoding="utf-8")
    ds = load_math(path)
    assert isinstance(ds, datasets.Dataset)
    assert ds["answer"] == ["\\frac{3}{4}", "2"]
    assert ds["subject"] == ["Algebra", "Algebra"]
    assert ds.column_names == ["prompt", "question", "answer", "solution", "level", "subject"]


def test_json_with_data_key(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": GSM8K}), encoding="utf-8")
    assert len(rows(load_gsm8k(path, as_dataset=False))) == 2


def test_generic_loader() -> None:
    data = [{"q": "1+1?", "a": 2, "id": "x"}, {"q": "Half?", "a": "$\\frac12$", "id": "y"}]
    out = rows(load_problems(data, question_field="q", answer_field="a", keep=["id", "missing"], chat=False,
                             as_dataset=False))
    assert [r["answer"] for r in out] == ["2", "\\frac12"]
    assert out[0]["id"] == "x"
    assert out[0]["missing"] is None
    assert isinstance(out[0]["prompt"], str)
    with pytest.raises(ValueError, match="keep"):
        load_problems(data, keep=["answer"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([GSM8K[0], {"question": "q"}], r"row 1: missing field 'answer'"),
        ([{"question": "q", "answer": "no marker"}], r"row 0: field 'answer' has no '#### <answer>'"),
        ([{"question": "", "answer": "#### 1"}], r"row 0: field 'question' is empty"),
        ([{"question": ["a"], "answer": "#### 1"}], r"row 0: field 'question' should be text"),
        ([{"question": "q", "answer": "####  "}], r"row 0: field 'answer' holds an empty answer"),
        (["just a string"], r"row 0: expected an object"),
    ],
)
def test_malformed_gsm8k_rows(data: list[Any], message: str) -> None:
    with pytest.raises(MalformedRowError, match=message):
        load_gsm8k(data)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"problem": "p", "solution": "no box here"}, r"row 0: field 'solution' has no \\boxed"),
        ({"problem": "p", "solution": "so \\boxed{3"}, r"row 0: field 'solution': .*never closes"),
        ({"problem": "p", "solution": "so \\boxed{}"}, r"row 0: field 'solution' has an empty"),
        ({"solution": "\\boxed{1}"}, r"row 0: missing field 'problem'"),
    ],
)
def test_malformed_math_rows(row: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedRowError, match=message):
        load_math([row])


def test_malformed_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GSM8K[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(MalformedRowError, match=r"bad\.jsonl line 2: not valid JSON"):
        load_gsm8k(path)
    path.write_text(json.dumps(GSM8K[0]) + "\n" + json.dumps({"question": "q"}) + "\n", encoding="utf-8")
    with pytest.raises(MalformedRowError, match=r"bad\.jsonl line 2: missing field 'answer'"):
        load_gsm8k(path)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"rows": 1}', encoding="utf-8")
    with pytest.raises(MalformedRowError, match="expected a JSON list"):
        load_math(bad_json)


def test_dataset_dict_is_refused() -> None:
    with pytest.raises(TypeError, match="split"):
        load_gsm8k(datasets.DatasetDict({"train": datasets.Dataset.from_list(GSM8K)}))  # type: ignore[arg-type]
