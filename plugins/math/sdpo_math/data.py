"""Math datasets as `prompt` + `answer` rows: a procedural generator (the default, nothing to download)
and loaders for GSM8K and MATH files or `datasets` rows.

Every function returns a `datasets.Dataset` by default, or plain `list[dict]` with `as_dataset=False`.
`prompt` is a chat message list (system prompt asking for the answer format, then the question), or a
plain string with `chat=False`. `answer` is the bare reference answer (`"42"`, `"\\frac{1}{2}"`).

Why a procedural default: the demo model (SmolLM2-135M-Instruct) must sometimes solve the task or
GRPO gets no signal. It solves one-digit a+b about 77% greedy and 29% sampled, two-digit a+b 15%
and 4% (`offline_assets.md`), so difficulty 0 is one-digit addition and each level adds a little.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sdpo_math.extract import gold_answer

if TYPE_CHECKING:
    import datasets

AnswerFormat = Literal["boxed", "answer_line"]
Prompt = str | list[dict[str, str]]

SYSTEM_PROMPTS: dict[str, str] = {
    "boxed": "Solve the math problem. Put the final answer in \\boxed{}.",
    "answer_line": 'Solve the math problem. End with a line "Answer: <the final answer>".',
}
"""The default instruction per answer format; short, because the default model is small."""


class MalformedRowError(ValueError):
    """A dataset row lacks a field or has one in the wrong form; the message names the row and the field."""


def make_prompt(
    question: str, *, answer_format: AnswerFormat = "boxed", chat: bool = True, system_prompt: str | None = None
) -> Prompt:
    """The prompt for `question`: `[system, user]` messages, or one string with the instruction after it."""
    if answer_format not in SYSTEM_PROMPTS:
        raise ValueError(f"answer_format must be one of {sorted(SYSTEM_PROMPTS)}, got {answer_format!r}")
    instruction = SYSTEM_PROMPTS[answer_format] if system_prompt is None else system_prompt
    if not chat:
        return f"{question}\n{instruction}" if instruction else question
    messages = [{"role": "system", "content": instruction}] if instruction else []
    return [*messages, {"role": "user", "content": question}]


def to_dataset(rows: Sequence[Mapping[str, Any]]) -> datasets.Dataset:
    """A `datasets.Dataset` of `rows` (imported lazily: it is slow to import and the env does not need it)."""
    import datasets

    return datasets.Dataset.from_list([dict(r) for r in rows])


def _finish(rows: list[dict[str, Any]], as_dataset: bool) -> datasets.Dataset | list[dict[str, Any]]:
    return to_dataset(rows) if as_dataset else rows


# -------------------------------------------------------------------------------------- generator
_OPS: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "×": lambda a, b: a * b,
    "÷": lambda a, b: a / b,
}


def _evaluate(numbers: list[int], ops: list[str]) -> Fraction:
    """Value of `n0 op0 n1 op1 …` with × and ÷ before + and -, left to right."""
    terms: list[Fraction] = [Fraction(numbers[0])]
    signs: list[str] = []
    for op, n in zip(ops, numbers[1:], strict=True):
        if op in "×÷":
            terms[-1] = _OPS[op](terms[-1], Fraction(n))
        else:
            signs.append(op)
            terms.append(Fraction(n))
    value = terms[0]
    for op, term in zip(signs, terms[1:], strict=True):
        value = _OPS[op](value, term)
    return value


def _arithmetic_level(difficulty: int) -> tuple[int, str, int, bool]:
    """(digits, operators, number of terms, negatives allowed) for a difficulty."""
    digits = 1 + difficulty // 2
    ops = "+" if difficulty == 0 else "+-×" if difficulty < 4 else "+-×÷"
    terms = 2 if difficulty < 3 else 3 if difficulty < 6 else 4
    return digits, ops, terms, difficulty >= 3


def _arithmetic(rng: random.Random, difficulty: int) -> tuple[str, int]:
    digits, ops, n_terms, negatives = _arithmetic_level(difficulty)
    hi = 10**digits - 1
    for _ in range(1000):
        chosen = [rng.choice(ops) for _ in range(n_terms - 1)]
        numbers = [rng.randint(0, hi) for _ in range(n_terms)]
        for i, op in enumerate(chosen):
            if op == "×" and difficulty < 6:  # long multiplication stays one-digit-by-n-digit
                numbers[i + 1] = rng.randint(0, 9)
            if op == "÷":
                numbers[i + 1] = rng.randint(1, 9 if difficulty < 6 else hi)
        value = _evaluate(numbers, chosen)
        if value.denominator != 1 or (value < 0 and not negatives):
            continue
        expression = str(numbers[0]) + "".join(f" {op} {n}" for op, n in zip(chosen, numbers[1:], strict=True))
        return f"What is {expression}?", int(value)
    raise RuntimeError(f"could not draw an arithmetic problem at difficulty {difficulty}")  # pragma: no cover


_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Isla", "Jack", "Lena", "Omar", "Sam"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "coins", "shells", "cards"]


def _word_problem(rng: random.Random, difficulty: int) -> tuple[str, int]:
    """A story of `1 + difficulty // 2` steps; numbers grow with difficulty; the total never goes negative."""
    hi = 9 if difficulty < 2 else 20 if difficulty < 4 else 99
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    if difficulty >= 2 and rng.random() < 0.5:
        boxes, per_box = rng.randint(2, 9), rng.randint(2, min(hi, 12))
        total = boxes * per_box
        sentences = [f"{name} has {boxes} boxes with {per_box} {items} in each box."]
    else:
        total = rng.randint(2, hi)
        sentences = [f"{name} has {total} {items}."]
    steps = 1 + difficulty // 2
    for step in range(steps):
        kinds = ["add"] if difficulty == 0 else ["add", "sub"]
        if difficulty >= 3:
            kinds.append("double")
        kind = rng.choice(kinds)
        if kind == "sub" and total == 0:
            kind = "add"
        if kind == "add":
            n = rng.randint(1, hi)
            total += n
            sentences.append(rng.choice([f"Then {name} gets {n} more.", f"A friend gives {name} {n} more {items}."]))
        elif kind == "sub":
            n = rng.randint(1, total)
            total -= n
            sentences.append(rng.choice([f"{name} gives away {n} of them.", f"{name} loses {n} of them."]))
        else:
            total *= 2
            sentences.append(f"{name} then doubles the number of {items}.")
        if step == steps - 1 and difficulty >= 4 and rng.random() < 0.5:
            friends = rng.choice([d for d in range(2, 10) if total % d == 0 and total >= d] or [1])
            if friends > 1:
                total //= friends
                sentences.append(f"{name} shares them equally among {friends} friends.")
                return " ".join(sentences) + " How many does each friend get?", total
    return " ".join(sentences) + f" How many {items} does {name} have now?", total


def generate_problems(
    n: int,
    *,
    difficulty: int = 0,
    seed: int = 0,
    kind: Literal["arithmetic", "word", "mixed"] = "arithmetic",
    answer_format: AnswerFormat = "boxed",
    chat: bool = True,
    system_prompt: str | None = None,
    as_dataset: bool = True,
) -> datasets.Dataset | list[dict[str, Any]]:
    """`n` procedural problems; row `i` depends only on (`seed`, `i`, `difficulty`, `kind`).

    Difficulty 0 is one-digit addition ("What is 3 + 4?"); 1 adds - and ×; 2 two-digit numbers; 3
    three terms and negatives; 4 division; every two levels add a digit. Word problems follow
    the same ladder ("Ava has 3 apples. Then Ava gets 4 more. …").

    Columns: `prompt`, `question`, `answer` (an integer as text), `difficulty`, `kind`, `id`.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not isinstance(difficulty, int) or difficulty < 0:
        raise ValueError(f"difficulty must be an int >= 0, got {difficulty!r}")
    if kind not in ("arithmetic", "word", "mixed"):
        raise ValueError(f"kind must be 'arithmetic', 'word' or 'mixed', got {kind!r}")
    rows = []
    for i in range(n):
        rng = random.Random(f"sdpo-math:{seed}:{difficulty}:{kind}:{i}")  # str seeds are stable across runs
        row_kind = kind if kind != "mixed" else rng.choice(["arithmetic", "word"])
        question, answer = (_arithmetic if row_kind == "arithmetic" else _word_problem)(rng, difficulty)
        rows.append({
            "prompt": make_prompt(question, answer_format=answer_format, chat=chat, system_prompt=system_prompt),
            "question": question,
            "answer": str(answer),
            "difficulty": difficulty,
            "kind": row_kind,
            "id": f"{row_kind}-{difficulty}-{seed}-{i}",
        })
    return _finish(rows, as_dataset)


# ---------------------------------------------------------------------------------------- loaders
Source = str | Path | Iterable[Mapping[str, Any]]


def _rows_of(source: Source) -> Iterable[tuple[str, Any]]:
    """`(where, row)` pairs from a JSON / JSONL file, a `datasets.Dataset` or any iterable of mappings."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith(("[", "{\"data\""))):
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path.name} line {number}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MalformedRowError(f"{path.name} line {number}: not valid JSON ({exc.msg})") from exc
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MalformedRowError(f"{path.name}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise MalformedRowError(f"{path.name}: expected a JSON list of rows (or {{'data': [...]}})")
        for i, row in enumerate(data):
            yield f"{path.name} row {i}", row
        return
    if isinstance(source, Mapping):
        raise TypeError("got a mapping: pass a split (e.g. ds['train']) or a list of rows, not a DatasetDict")
    for i, row in enumerate(source):
        yield f"row {i}", row


def _field(where: str, row: Any, name: str) -> str:
    if not isinstance(row, Mapping):
        raise MalformedRowError(f"{where}: expected an object with field {name!r}, got {type(row).__name__}")
    if name not in row or row[name] is None:
        raise MalformedRowError(f"{where}: missing field {name!r} (fields: {sorted(row)})")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise MalformedRowError(f"{where}: field {name!r} should be text, got {type(value).__name__}")
    if not str(value).strip():
        raise MalformedRowError(f"{where}: field {name!r} is empty")
    return str(value)


_GROUPED_INT = re.compile(r"-?\d{1,3}(?:,\d{3})+")


def _tidy(answer: str) -> str:
    return answer.replace(",", "") if _GROUPED_INT.fullmatch(answer) else answer


def _load(
    source: Source,
    *,
    question_field: str,
    answer_field: str,
    answer_style: Literal["auto", "gsm8k", "math", "plain"],
    extra: Callable[[Mapping[str, Any]], dict[str, Any]] | None,
    answer_format: AnswerFormat,
    chat: bool,
    system_prompt: str | None,
) -> list[dict[str, Any]]:
    rows = []
    for where, row in _rows_of(source):
        question = _field(where, row, question_field)
        raw = _field(where, row, answer_field)
        if answer_style == "gsm8k" and "####" not in raw:
            raise MalformedRowError(f"{where}: field {answer_field!r} has no '#### <answer>' line: {raw[-80:]!r}")
        if answer_style == "math" and "\\boxed" not in raw and "\\fbox" not in raw:
            raise MalformedRowError(f"{where}: field {answer_field!r} has no \\boxed{{}} answer: {raw[-80:]!r}")
        try:
            answer = raw.strip() if answer_style == "plain" else gold_answer(raw)
        except ValueError as exc:
            raise MalformedRowError(f"{where}: field {answer_field!r}: {exc}") from exc
        if not answer:
            raise MalformedRowError(f"{where}: field {answer_field!r} holds an empty answer: {raw[-80:]!r}")
        rows.append({
            "prompt": make_prompt(question, answer_format=answer_format, chat=chat, system_prompt=system_prompt),
            "question": question,
            "answer": _tidy(answer),
            **(extra(row) if extra else {}),
        })
    return rows


def load_problems(
    source: Source,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    answer_style: Literal["auto", "gsm8k", "math", "plain"] = "auto",
    keep: Sequence[str] = (),
    answer_format: AnswerFormat = "boxed",
    chat: bool = True,
    system_prompt: str | None = None,
    as_dataset: bool = True,
) -> datasets.Dataset | list[dict[str, Any]]:
    """Rows with a question and a reference answer, from a file (`.json` list or `.jsonl`) or rows.

    `answer_style` says how to read the answer field: `"gsm8k"` (text after `####`, required), `"math"`
    (the last `\\boxed{}`, required), `"plain"` (as is) or `"auto"` (whichever applies). `keep` names
    extra fields to copy (missing ones become `None`). Raises `MalformedRowError` naming the row and field.

    Columns: `prompt`, `question`, `answer`, then the `keep` fields.
    """
    if answer_style not in ("auto", "gsm8k", "math", "plain"):
        raise ValueError(f"answer_style must be 'auto', 'gsm8k', 'math' or 'plain', got {answer_style!r}")
    clash = {"prompt", "question", "answer"} & set(keep)
    if clash:
        raise ValueError(f"keep cannot name an output column: {sorted(clash)}")
    rows = _load(
        source, question_field=question_field, answer_field=answer_field, answer_style=answer_style,
        extra=(lambda row: {name: row.get(name) for name in keep}) if keep else None,
        answer_format=answer_format, chat=chat, system_prompt=system_prompt,
    )
    return _finish(rows, as_dataset)


def load_gsm8k(
    source: Source,
    *,
    answer_format: AnswerFormat = "boxed",
    chat: bool = True,
    system_prompt: str | None = None,
    as_dataset: bool = True,
) -> datasets.Dataset | list[dict[str, Any]]:
    """GSM8K rows (`question`, `answer` ending in `#### 42`).

    Columns: `prompt`, `question`, `answer` (`"42"`), `solution` (GSM8K's worked answer).
    """
    rows = _load(
        source, question_field="question", answer_field="answer", answer_style="gsm8k",
        extra=lambda row: {"solution": str(row["answer"])},
        answer_format=answer_format, chat=chat, system_prompt=system_prompt,
    )
    return _finish(rows, as_dataset)


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def load_math(
    source: Source,
    *,
    answer_format: AnswerFormat = "boxed",
    chat: bool = True,
    system_prompt: str | None = None,
    as_dataset: bool = True,
) -> datasets.Dataset | list[dict[str, Any]]:
    """MATH-format rows (`problem`, `solution` with a `\\boxed{}` answer; `answer`, `level`, `type` or
    `subject` when present, as in MATH-500). A non-empty `answer` field wins over the solution's box.

    Columns: `prompt`, `question`, `answer`, `solution`, `level`, `subject` (the last two as text or `None`).
    """
    rows = []
    for where, row in _rows_of(source):
        question = _field(where, row, "problem")
        solution = _field(where, row, "solution")
        given = row.get("answer") if isinstance(row, Mapping) else None
        if given is not None and str(given).strip():
            answer = str(given).strip()
        else:
            if "\\boxed" not in solution and "\\fbox" not in solution:
                raise MalformedRowError(f"{where}: field 'solution' has no \\boxed{{}} answer (and no 'answer' field)")
            try:
                answer = gold_answer(solution)
            except ValueError as exc:
                raise MalformedRowError(f"{where}: field 'solution': {exc}") from exc
            if not answer:
                raise MalformedRowError(f"{where}: field 'solution' has an empty \\boxed{{}}")
        rows.append({
            "prompt": make_prompt(question, answer_format=answer_format, chat=chat, system_prompt=system_prompt),
            "question": question,
            "answer": answer,
            "solution": solution,
            # Text: MATH writes "Level 3", MATH-500 writes 3; Arrow wants one type per column.
            "level": _text_or_none(row.get("level")),
            "subject": _text_or_none(row.get("subject", row.get("type"))),
        })
    return _finish(rows, as_dataset)
