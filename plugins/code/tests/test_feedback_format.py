"""Pins every feedback block of the reference's LeetCode style, the limits, line numbers and the cap."""

from __future__ import annotations

from sdpo_code.feedback import FeedbackOptions, format_syntax_error, format_trace, render
from sdpo_code.verdicts import Judgement, TestOutcome, Verdict


def wa(index, inp, got, exp, hidden=False, debug=None):
    return TestOutcome(index, Verdict.WRONG_ANSWER, hidden=hidden, input=inp, actual=got, expected=exp, debug=debug)


def test_full_pass_is_empty():
    assert render(Judgement(Verdict.ACCEPTED, tests=(TestOutcome(0, Verdict.ACCEPTED),))) == ""


def test_harness_error_has_no_text():
    assert render(Judgement(Verdict.HARNESS_ERROR, message="bwrap died")) == ""


def test_format_blocks():
    assert render(Judgement(Verdict.NO_CODE)) == "Incorrect Format: Put your code inside a ```python ... ``` block."
    assert render(Judgement(Verdict.TRUNCATED)) == (
        "Truncated Attempt: Your previous response was too long and truncated because it reached the maximum "
        "response length. Try again with a shorter response.")


def test_syntax_error_block_names_the_line():
    message = format_syntax_error("SyntaxError", "invalid syntax", 2, "def f(:\n")
    assert render(Judgement(Verdict.SYNTAX_ERROR, message=message)) == (
        "Syntax Error\nSyntaxError: invalid syntax\n  def f(:\nLine 2 (Solution.py)")


def test_runtime_error_block_with_last_three_frames_and_debug():
    trace = format_trace("ZeroDivisionError", "division by zero",
                         [[1, "<module>", "main()"], [5, "main", "solve(0)"], [8, "solve", "g(x)"],
                          [12, "g", "1 / x"]])
    case = TestOutcome(0, Verdict.RUNTIME_ERROR, input="0\n", trace=trace, debug="started\n")
    assert render(Judgement(Verdict.RUNTIME_ERROR, tests=(case,))) == (
        "Runtime Error\n"
        "ZeroDivisionError: division by zero\n"
        "  solve(0)\nLine 5 in main (Solution.py)\n"
        "  g(x)\nLine 8 in solve (Solution.py)\n"
        "  1 / x\nLine 12 in g (Solution.py)\n"
        "\n"
        "Last Executed Input\n"
        "0\n"
        "\n"
        "Debug Output\n"
        "started")


def test_limit_blocks():
    for verdict in (Verdict.TIME_LIMIT, Verdict.MEMORY_LIMIT, Verdict.OUTPUT_LIMIT):
        case = TestOutcome(1, verdict, input="5 5")
        assert render(Judgement(verdict, tests=(case,))) == f"{verdict.value}\n\nLast Executed Input\n5 5"


def test_wrong_answer_block_and_two_shortest_cases():
    cases = (wa(0, "long input here", "1", "2"), wa(1, "a", "x", "y"), wa(2, "bb", "z", "w", debug="dbg"))
    assert render(Judgement(Verdict.WRONG_ANSWER, tests=cases)) == (
        "Test Case 2: Wrong Answer\n\nInput\na\n\nOutput\nx\n\nExpected\ny\n\n"
        "Test Case 3: Wrong Answer\n\nInput\nbb\n\nOutput\nz\n\nExpected\nw\n\nDebug Output\ndbg")


def test_runtime_error_wins_over_wrong_answer_and_timeout():
    cases = (wa(0, "a", "1", "2"), TestOutcome(1, Verdict.TIME_LIMIT, input="b"),
             TestOutcome(2, Verdict.RUNTIME_ERROR, input="c", trace="ValueError: bad"))
    text = render(Judgement(Verdict.RUNTIME_ERROR, tests=cases))
    assert text.startswith("Runtime Error\nValueError: bad\n")
    assert "Wrong Answer" not in text


def test_hidden_tests_are_not_leaked_unless_configured():
    secret = wa(3, "SECRET-INPUT", "SECRET-GOT", "SECRET-EXPECTED", hidden=True)
    text = render(Judgement(Verdict.WRONG_ANSWER, tests=(secret,)))
    assert text == "Test Case 4: Wrong Answer\n\n(hidden test case)"
    shown = render(Judgement(Verdict.WRONG_ANSWER, tests=(secret,)), FeedbackOptions(show_hidden_tests=True))
    assert "SECRET-INPUT" in shown
    assert "SECRET-EXPECTED" in shown
    tle = TestOutcome(0, Verdict.TIME_LIMIT, hidden=True, input="SECRET")
    expected = "Time Limit Exceeded\n\nLast Executed Input\n(hidden test case)"
    assert render(Judgement(Verdict.TIME_LIMIT, tests=(tle,))) == expected


def test_visible_failures_are_preferred_over_hidden_ones():
    cases = (wa(0, "visible", "1", "2"), wa(1, "h", "3", "4", hidden=True))
    assert "(hidden test case)" not in render(Judgement(Verdict.WRONG_ANSWER, tests=cases))


def test_expected_output_switch():
    text = render(Judgement(Verdict.WRONG_ANSWER, tests=(wa(0, "1", "2", "3"),)),
                  FeedbackOptions(show_expected_output=False))
    assert text == "Test Case 1: Wrong Answer\n\nInput\n1\n\nOutput\n2"


def test_input_output_and_debug_limits():
    long_input = "\n".join(["x" * 300] + [str(i) for i in range(11)])
    case = wa(0, long_input, "y" * 300, "z" * 10, debug="\n".join("d" * 400 for _ in range(12)))
    text = render(Judgement(Verdict.WRONG_ANSWER, tests=(case,)), FeedbackOptions(max_chars=100_000))
    lines = text.split("\n")
    assert lines[3] == "x" * 250 + "..."
    assert lines[4:11] == [str(i) for i in range(7)]
    assert lines[11] == "... (4 more lines)"
    assert lines[14] == "y" * 250 + "..."
    debug = text.split("Debug Output\n", 1)[1].split("\n")
    assert len(debug) == 10
    assert debug[0] == "d" * 300 + "..."


def test_whole_text_is_capped():
    case = wa(0, "i" * 200, "o" * 200, "e" * 200)
    cases = (*tuple(wa(k, "i" * 200, "o" * 200, "e" * 200) for k in range(2)), case)
    assert len(render(Judgement(Verdict.WRONG_ANSWER, tests=cases), FeedbackOptions(max_chars=300))) == 300
    assert len(render(Judgement(Verdict.WRONG_ANSWER, tests=cases))) <= 2000


def test_no_records_message():
    assert render(Judgement(Verdict.WRONG_ANSWER)) == "No test execution information available."
