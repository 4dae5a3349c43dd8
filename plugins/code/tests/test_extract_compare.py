"""Code extraction and LiveCodeBench-style output comparison (pure functions)."""

from __future__ import annotations

import pytest
from sdpo_code.compare import stdout_matches, value_matches
from sdpo_code.extract import extract_code

TWO_BLOCKS = "draft:\n```python\nprint(1)\n```\nfinal:\n```python\nx = 2\nprint(x)\n```\nusage:\n```\nrun it\n```\n"


@pytest.mark.parametrize(("strategy", "expected"), [
    ("last", "x = 2\nprint(x)\n"),
    ("first", "print(1)\n"),
    ("longest", "x = 2\nprint(x)\n"),
])
def test_strategies_pick_python_blocks(strategy, expected):
    assert extract_code(TWO_BLOCKS, strategy) == expected


def test_other_languages_never_count_and_untagged_is_a_fallback():
    assert extract_code("```bash\nls\n```") is None
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("```py\nprint(4)\n```\n```\nprint(5)\n```") == "print(4)\n"


def test_unclosed_fence_is_no_code_and_unfenced_is_opt_in():
    assert extract_code("```python\nprint(1)\n") is None
    assert extract_code("```python\nprint(1)\n", allow_unfenced=True) is None  # a truncated block stays truncated
    assert extract_code("print(2)\n") is None
    assert extract_code("print(2)\n", allow_unfenced=True) == "print(2)\n"


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="strategy"):
        extract_code("```python\nx\n```", "middle")  # type: ignore[arg-type]


@pytest.mark.parametrize(("got", "expected", "ok"), [
    ("3\n", "3", True),
    ("  1 2 \n\n", "1 2\n", True),
    ("1   2", "1 2", True),  # token-wise, more tolerant than LCB's exact line
    ("1.0", "1.00", True),  # Decimal equality, as LCB
    ("0.30000000000000004", "0.3", False),  # exact by default, as LCB
    ("1\n2", "1 2", False),  # line counts must match
    ("yes", "Yes", False),
    ("", "0", False),
])
def test_stdout_comparison(got, expected, ok):
    assert stdout_matches(got, expected) is ok


def test_float_tolerance_is_opt_in_and_only_for_floats():
    assert stdout_matches("0.30000000000000004", "0.3", float_tolerance=1e-6)
    assert not stdout_matches("3", "4", float_tolerance=0.5)  # integers stay exact


def test_functional_comparison_is_json_equality():
    assert value_matches("[1, 2]", "[1, 2]")
    assert value_matches("1.0", "1")
    assert not value_matches("[2, 1]", "[1, 2]")
    assert not value_matches(None, "null")
