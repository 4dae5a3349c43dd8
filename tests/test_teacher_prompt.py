"""Teacher-prompt construction against lasgroup/SDPO's rules (docs/algorithm.md §4) and the peers' known bugs."""

from __future__ import annotations

import math
import random
import re
from typing import Any

import pytest

from sdpo_core.config import SDPOConfig
from sdpo_core.teacher_prompt import (
    TeacherPrompt,
    build_teacher_batch,
    build_teacher_message,
    merge_chat_template_kwargs,
    select_demonstrations,
    strip_thinking,
    tokenize_teacher_prompt,
)
from sdpo_core.testing import tiny_tokenizer

SYSTEM = "You are a helpful assistant."
QUESTION = "What is 2 + 3?"
DEMO = "The answer is 5."
FEEDBACK = "Wrong Answer: Expected Output 5"
HEADER = "<|im_start|>assistant\n"
NAN = float("nan")


def chat(question: str = QUESTION, system: str | None = SYSTEM) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    return [*messages, {"role": "user", "content": question}]


def chatml(*turns: tuple[str, str]) -> str:
    """Hand-written ChatML rendering with the generation header, as the tiny tokenizer's template does."""
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns) + HEADER


def messages(teacher: TeacherPrompt) -> list[dict[str, Any]]:
    assert isinstance(teacher.prompt, list)
    return teacher.prompt


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


def tokenizer_state(tok: Any) -> dict[str, Any]:
    return {
        "truncation_side": tok.truncation_side,
        "padding_side": tok.padding_side,
        "chat_template": tok.chat_template,
        "model_max_length": tok.model_max_length,
        "init_kwargs": dict(tok.init_kwargs),
        "vocab_size": len(tok),
    }


# --- strip_thinking ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\nlet me see</think>ans", "ans"),
        ("<think>a</think>\n\n  ans", "ans"),
        ("reasoning…</think>\nans", "ans"),  # completion began inside a prefilled <think>
        ("reasoning</think>ans<think>more</think> end", "ansend"),
        ("x <think>\nmulti\nline\n</think>\ny", "x y"),
        ("<think>a</think>b<think>c</think>d", "bd"),
        ("no thinking here", "no thinking here"),
        ("", ""),
        ("<think>unclosed", "<think>unclosed"),
    ],
)
def test_strip_thinking(text: str, expected: str) -> None:
    assert strip_thinking(text) == expected


def test_strip_thinking_keeps_a_stray_close_after_a_block() -> None:
    # Only a *leading* unmatched </think> is a prefilled block; later stray tags are left alone.
    assert strip_thinking("<think>a</think>b</think>c") == "b</think>c"


def test_strip_thinking_matches_the_reference_regex_on_closed_blocks() -> None:
    # Without a leading unmatched </think>, the result is the reference's regex (lasgroup/SDPO
    # ray_trainer.py:645-648) exactly.
    pieces = ["<think>", "</think>", "a", " ", "\n", "b\t"]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        if 0 <= text.find("</think>") < text.find("<think>") or ("</think>" in text and "<think>" not in text):
            continue
        assert strip_thinking(text) == re.sub(r"<think>.*?</think>\s*", "", text, flags=re.DOTALL), text


def test_strip_thinking_is_linear_on_unclosed_runs() -> None:
    # The reference regex is quadratic here (minutes at this size).
    assert strip_thinking("<think>" * 100_000 + "x") == "<think>" * 100_000 + "x"


# --- select_demonstrations --------------------------------------------------------------------------------


def test_first_success_excludes_self_and_failures_share_it() -> None:
    rewards = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    demos = select_demonstrations(rewards, 6, threshold=1.0)
    assert demos == [1, 3, 1, 1, 1, 1]
    assert all(d != i for i, d in enumerate(demos))


def test_groups_are_contiguous_and_independent() -> None:
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert select_demonstrations(rewards, 3, threshold=1.0) == [None, 0, 0, 4, 5, 4]


def test_lone_success_masked_by_default_and_self_demo_when_allowed() -> None:
    rewards = [0.0, 1.0, 0.0]
    assert select_demonstrations(rewards, 3, threshold=1.0) == [1, None, 1]
    assert select_demonstrations(rewards, 3, threshold=1.0, allow_self_when_alone=True) == [1, 1, 1]


def test_exclude_self_false_lets_a_success_pick_the_first_success_even_itself() -> None:
    rewards = [0.0, 1.0, 1.0]
    assert select_demonstrations(rewards, 3, threshold=1.0, exclude_self=False) == [1, 1, 1]


def test_threshold_and_nan_rewards() -> None:
    rewards = [NAN, 0.5, 0.49, NAN]
    assert select_demonstrations(rewards, 4, threshold=0.5) == [1, None, 1, 1]
    assert select_demonstrations([NAN, NAN], 2, threshold=-math.inf) == [None, None]


def test_shortest_uses_lengths_and_never_self() -> None:
    rewards = [1.0, 1.0, 0.0, 1.0]
    lengths = [30, 10, 5, 20]
    demos = select_demonstrations(rewards, 4, threshold=1.0, mode="shortest", lengths=lengths)
    assert demos == [1, 3, 1, 1]


def test_shortest_needs_lengths() -> None:
    with pytest.raises(ValueError, match="lengths"):
        select_demonstrations([1.0, 0.0], 2, threshold=1.0, mode="shortest")


def test_random_picks_a_success_other_than_self_and_is_seeded() -> None:
    rewards = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0] * 5
    first = select_demonstrations(rewards, 6, threshold=1.0, mode="random", rng=random.Random(3))
    again = select_demonstrations(rewards, 6, threshold=1.0, mode="random", rng=random.Random(3))
    assert first == again
    for i, d in enumerate(first):
        group = range(i // 6 * 6, i // 6 * 6 + 6)
        assert d is not None
        assert d in group
        assert d != i
        assert rewards[d] == 1.0
    assert len(set(first)) > 3  # not always the first success


def test_divisibility_error() -> None:
    with pytest.raises(ValueError, match=r"7 rewards.*group_size=3"):
        select_demonstrations([0.0] * 7, 3, threshold=1.0)


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="demo_selection"):
        select_demonstrations([0.0], 1, threshold=1.0, mode="best")


# --- who gets a signal (docs/algorithm.md §4, the table) -----------------------------------------------------------

# Four groups of 3: (rewards, feedbacks). Failures carry feedback, successes an empty string.
TABLE_REWARDS = [
    0.0, 1.0, 0.0,  # failed with a success in the group
    0.0, 0.0, 0.0,  # failed, no success in the group
    1.0, 1.0, 0.0,  # succeeded, another success exists
    1.0, 0.0, 0.0,  # lone success
]
TABLE_FEEDBACKS = [FEEDBACK if r < 1.0 else "" for r in TABLE_REWARDS]


def table_batch(config: SDPOConfig, tok: Any) -> Any:
    prompts = [chat(f"Q{i // 3}") for i in range(len(TABLE_REWARDS))]
    completions = [f"answer {i}" for i in range(len(TABLE_REWARDS))]
    return build_teacher_batch(
        prompts, completions, TABLE_REWARDS, TABLE_FEEDBACKS, group_size=3, config=config, tokenizer=tok
    )


def test_who_gets_a_signal_without_env_feedback(tokenizer: Any) -> None:
    batch = table_batch(SDPOConfig.from_preset("reference_generalization"), tokenizer)
    assert batch.demo_index == [1, None, 1, None, None, None, 7, 6, 6, None, 9, 9]
    assert batch.uses_feedback == [False] * 12
    # failed with a success: sibling demo; failed alone: masked; success with another: the other; lone: masked.
    assert batch.sd_mask == [True, False, True, False, False, False, True, True, True, False, True, True]


@pytest.mark.parametrize("preset", [None, "reference_lcb"])
def test_who_gets_a_signal_with_env_feedback(tokenizer: Any, preset: str | None) -> None:
    config = SDPOConfig.from_preset(preset) if preset else SDPOConfig(success_reward_threshold=0.5)
    batch = table_batch(config, tokenizer)
    assert batch.demo_index == [1, None, 1, None, None, None, 7, 6, 6, None, 9, 9]
    # failed with a success: demo, feedback ignored; failed alone: own feedback; lone success: "" -> masked.
    assert batch.uses_feedback == [False, False, False, True, True, True, False, False, False, False, False, False]
    assert batch.sd_mask == [True, False, True, True, True, True, True, True, True, False, True, True]


def test_feedback_used_beside_a_demo_when_not_only_without_solution(tokenizer: Any) -> None:
    batch = table_batch(SDPOConfig(environment_feedback_only_without_solution=False), tokenizer)
    assert batch.uses_feedback == [f != "" for f in TABLE_FEEDBACKS]


def test_success_never_gets_feedback_when_a_demo_exists() -> None:
    # TRL 1.16 bug #1: a success got "feedback from your unsuccessful earlier attempt". Even with non-empty
    # feedback on the success, the default config drops it because a demo exists.
    config = SDPOConfig()
    teacher = build_teacher_message(chat(), DEMO, "All tests passed.", config)
    assert teacher.uses_demonstration
    assert not teacher.uses_feedback
    assert "unsuccessful" not in messages(teacher)[-1]["content"]


def test_failure_with_a_successful_sibling_ignores_its_feedback() -> None:
    teacher = build_teacher_message(chat(), DEMO, FEEDBACK, SDPOConfig())
    assert teacher.in_mask
    assert not teacher.uses_feedback
    assert FEEDBACK not in messages(teacher)[-1]["content"]
    assert DEMO in messages(teacher)[-1]["content"]


def test_blank_feedback_is_no_feedback() -> None:
    teacher = build_teacher_message(chat(), None, " \n\t", SDPOConfig())
    assert not teacher.in_mask
    assert teacher.prompt == chat()


def test_feedback_off_ignores_feedback() -> None:
    teacher = build_teacher_message(chat(), None, FEEDBACK, SDPOConfig(include_environment_feedback=False))
    assert not teacher.in_mask
    assert not teacher.uses_feedback


# --- exact teacher strings (docs/algorithm.md §4.1) -----------------------------------------------------------


def rendered(tok: Any, teacher: TeacherPrompt, **kwargs: Any) -> str:
    ids, truncated = tokenize_teacher_prompt(tok, teacher, max_length=10_000, truncation="error", **kwargs)
    assert not truncated
    return tok.decode(ids)


def test_seed_templates_exact_string_for_system_and_user(tokenizer: Any) -> None:
    teacher = build_teacher_message(chat(), "<think>\nhmm, 2 + 3</think>\n" + DEMO, None, SDPOConfig())
    user = f"{QUESTION}\nCorrect solution:\n\n{DEMO}\n\n\n\nCorrectly solve the original question.\n"
    assert teacher.prompt == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    text = rendered(tokenizer, teacher)
    assert text == chatml(("system", SYSTEM), ("user", user))
    assert text.count(SYSTEM) == 1
    assert text.count("<|im_start|>user") == 1
    assert text.count("<|im_start|>") == 3
    assert "think" not in text


def test_seed_templates_exact_string_with_feedback(tokenizer: Any) -> None:
    teacher = build_teacher_message(chat(), None, FEEDBACK, SDPOConfig())
    user = (
        f"{QUESTION}\nThe following is feedback from your unsuccessful earlier attempt:\n\n{FEEDBACK}\n\n"
        "\n\nCorrectly solve the original question.\n"
    )
    assert rendered(tokenizer, teacher) == chatml(("system", SYSTEM), ("user", user))


def test_reference_lcb_exact_strings(tokenizer: Any) -> None:
    config = SDPOConfig.from_preset("reference_lcb")
    with_demo = build_teacher_message(chat(), DEMO, FEEDBACK, config)
    user = f"{QUESTION}\nCorrect solution:\n\n{DEMO}\n\nCorrectly solve the original question."
    assert rendered(tokenizer, with_demo) == chatml(("system", SYSTEM), ("user", user))

    with_feedback = build_teacher_message(chat(), None, FEEDBACK, config)
    user = (
        f"{QUESTION}\nThe following is feedback from your unsuccessful earlier attempt:\n\n{FEEDBACK}"
        "\n\nCorrectly solve the original question."
    )
    assert rendered(tokenizer, with_feedback) == chatml(("system", SYSTEM), ("user", user))


def test_masked_sample_keeps_the_original_prompt(tokenizer: Any) -> None:
    teacher = build_teacher_message(chat(), None, None, SDPOConfig())
    assert not teacher.in_mask
    assert teacher.prompt == chat()
    assert rendered(tokenizer, teacher) == chatml(("system", SYSTEM), ("user", QUESTION))


def test_earlier_turns_are_kept_and_inputs_not_mutated() -> None:
    prompt = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": QUESTION, "name": "alice"},
    ]
    snapshot = [dict(m) for m in prompt]
    teacher = build_teacher_message(prompt, DEMO, None, SDPOConfig())
    assert teacher.prompt[:3] == snapshot[:3]
    assert messages(teacher)[3]["role"] == "user"
    assert messages(teacher)[3]["name"] == "alice"
    assert messages(teacher)[3]["content"].startswith(QUESTION + "\nCorrect solution:")
    assert prompt == snapshot


def test_last_message_must_be_a_user_message() -> None:
    prompt = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "5"}]
    with pytest.raises(ValueError, match="user message"):
        build_teacher_message(prompt, DEMO, None, SDPOConfig())


def test_string_prompt(tokenizer: Any) -> None:
    teacher = build_teacher_message("Q: 2 + 3 =", DEMO, None, SDPOConfig.from_preset("reference_lcb"))
    expected = f"Q: 2 + 3 =\nCorrect solution:\n\n{DEMO}\n\nCorrectly solve the original question."
    assert teacher.prompt == expected
    ids, truncated = tokenize_teacher_prompt(tokenizer, teacher, max_length=1000, truncation="right")
    assert ids == tokenizer(text=[expected])["input_ids"][0]
    assert not truncated


def test_multimodal_content_keeps_non_text_parts() -> None:
    image = {"type": "image", "image": "<pixels>"}
    parts = [image, {"type": "text", "text": "Describe "}, {"type": "text", "text": "it."}]
    prompt = [{"role": "user", "content": parts}]
    teacher = build_teacher_message(prompt, DEMO, None, SDPOConfig.from_preset("reference_lcb"))
    assert teacher.question == "Describe it."
    content = messages(teacher)[-1]["content"]
    assert content[0] == image
    assert content[1] == {
        "type": "text",
        "text": f"Describe it.\nCorrect solution:\n\n{DEMO}\n\nCorrectly solve the original question.",
    }
    assert len(content) == 2


# --- truncation -------------------------------------------------------------------------------------------


def budget(tok: Any, teacher: TeacherPrompt, slack: int, **texts: str) -> int:
    """Tokens of the teacher prompt with some texts replaced, plus `slack`."""
    return len(tok.apply_chat_template(teacher.render(**texts), add_generation_prompt=True)["input_ids"]) + slack


def test_right_truncation_cuts_the_demo_keeps_question_and_header(tokenizer: Any) -> None:
    before = tokenizer_state(tokenizer)
    teacher = build_teacher_message(chat(), DEMO * 100, None, SDPOConfig())
    max_length = budget(tokenizer, teacher, 20, demonstration="")
    ids, truncated = tokenize_teacher_prompt(tokenizer, teacher, max_length=max_length, truncation="right")
    text = tokenizer.decode(ids)
    assert truncated
    assert max_length - 5 <= len(ids) <= max_length
    assert text.endswith(HEADER)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}\nCorrect solution:")
    assert text.endswith("\n\n\n\nCorrectly solve the original question.\n<|im_end|>\n" + HEADER)
    assert DEMO in text
    assert tokenizer_state(tokenizer) == before


def test_right_truncation_cuts_feedback_too(tokenizer: Any) -> None:
    teacher = build_teacher_message(chat(), None, FEEDBACK * 50, SDPOConfig())
    max_length = budget(tokenizer, teacher, 10, feedback="")
    ids, truncated = tokenize_teacher_prompt(tokenizer, teacher, max_length=max_length, truncation="right")
    text = tokenizer.decode(ids)
    assert truncated
    assert len(ids) <= max_length
    assert QUESTION in text
    assert text.endswith("Correctly solve the original question.\n<|im_end|>\n" + HEADER)


def test_left_truncation_cuts_the_question_start(tokenizer: Any) -> None:
    before = tokenizer_state(tokenizer)
    question = "Input Output " * 60 + QUESTION
    teacher = build_teacher_message(chat(question), DEMO, None, SDPOConfig())
    max_length = budget(tokenizer, teacher, 15, question="")
    ids, truncated = tokenize_teacher_prompt(tokenizer, teacher, max_length=max_length, truncation="left")
    text = tokenizer.decode(ids)
    assert truncated
    assert len(ids) <= max_length
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert f"{QUESTION}\nCorrect solution:\n\n{DEMO}\n\n" in text
    assert question not in text
    assert text.endswith(HEADER)
    assert tokenizer_state(tokenizer) == before


def test_error_truncation_raises_with_lengths(tokenizer: Any) -> None:
    before = tokenizer_state(tokenizer)
    teacher = build_teacher_message(chat(), DEMO * 100, None, SDPOConfig())
    full = budget(tokenizer, teacher, 0)
    with pytest.raises(ValueError, match=rf"{full} tokens.*max_reprompt_length=50"):
        tokenize_teacher_prompt(tokenizer, teacher, max_length=50, truncation="error")
    assert tokenizer_state(tokenizer) == before


def test_right_falls_back_to_cutting_the_question(tokenizer: Any) -> None:
    question = "Input Output " * 60 + QUESTION
    teacher = build_teacher_message(chat(question), DEMO * 50, None, SDPOConfig())
    max_length = budget(tokenizer, teacher, 10, question="", demonstration="")
    ids, truncated = tokenize_teacher_prompt(tokenizer, teacher, max_length=max_length, truncation="right")
    text = tokenizer.decode(ids)
    assert truncated
    assert len(ids) <= max_length
    assert "Correct solution:\n\n\n\n" in text  # demonstration emptied first
    assert text.endswith(HEADER)


def test_masked_long_prompt_is_left_cut_in_right_mode(tokenizer: Any) -> None:
    question = "Input Output " * 60 + QUESTION
    teacher = build_teacher_message(chat(question), None, None, SDPOConfig())
    max_length = budget(tokenizer, teacher, 10, question="")
    ids, truncated = tokenize_teacher_prompt(tokenizer, teacher, max_length=max_length, truncation="right")
    assert truncated
    assert len(ids) <= max_length
    assert tokenizer.decode(ids).endswith(f"{QUESTION}<|im_end|>\n{HEADER}")


def test_budget_below_the_template_raises(tokenizer: Any) -> None:
    teacher = build_teacher_message(chat(), DEMO * 10, None, SDPOConfig())
    for side in ("right", "left"):
        with pytest.raises(ValueError, match=r"max_reprompt_length=5 is too small"):
            tokenize_teacher_prompt(tokenizer, teacher, max_length=5, truncation=side)


def test_string_prompt_truncation(tokenizer: Any) -> None:
    teacher = build_teacher_message("Q: 2 + 3 =", DEMO * 100, None, SDPOConfig())
    ids, truncated = tokenize_teacher_prompt(tokenizer, teacher, max_length=60, truncation="right")
    text = tokenizer.decode(ids)
    assert truncated
    assert len(ids) <= 60
    assert text.startswith("Q: 2 + 3 =\nCorrect solution:")
    assert text.endswith("Correctly solve the original question.\n")


def test_tokenize_returns_plain_int_lists(tokenizer: Any) -> None:
    ids, _ = tokenize_teacher_prompt(
        tokenizer, build_teacher_message(chat(), DEMO, None, SDPOConfig()), max_length=1000, truncation="right"
    )
    assert isinstance(ids, list)
    assert all(type(t) is int for t in ids)
    assert ids == tokenizer.apply_chat_template(
        build_teacher_message(chat(), DEMO, None, SDPOConfig()).prompt, add_generation_prompt=True
    )["input_ids"]


# --- chat template kwargs ---------------------------------------------------------------------------------

KWARG_TEMPLATE = (
    "{% if shout %}LOUD {% endif %}{% if mode %}[{{ mode }}] {% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_kwargs_forwarded(tokenizer: Any) -> None:
    tok = tiny_tokenizer()
    tok.chat_template = KWARG_TEMPLATE
    teacher = build_teacher_message(chat(system=None), DEMO, None, SDPOConfig())
    ids, _ = tokenize_teacher_prompt(tok, teacher, max_length=1000, truncation="right",
                                     chat_template_kwargs={"shout": True})
    assert tok.decode(ids).startswith("LOUD <|im_start|>user\n")
    # `chat_template` itself can be passed, as GRPOTrainer does with its training template.
    ids, _ = tokenize_teacher_prompt(tokenizer, teacher, max_length=1000, truncation="right",
                                     chat_template_kwargs={"chat_template": KWARG_TEMPLATE, "mode": "x"})
    assert tokenizer.decode(ids).startswith("[x] <|im_start|>user\n")


def test_batch_merges_grpo_then_sdpo_kwargs() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = KWARG_TEMPLATE
    config = SDPOConfig(apply_chat_template_kwargs={"mode": "sdpo"})
    batch = build_teacher_batch(
        [chat(system=None)] * 2, ["a", "b"], [1.0, 0.0], ["", ""], group_size=2, config=config, tokenizer=tok,
        chat_template_kwargs={"mode": "grpo", "shout": True},
    )
    assert tok.decode(batch.input_ids[1]).startswith("LOUD [sdpo] <|im_start|>user\n")
    assert merge_chat_template_kwargs({"a": 1, "b": 1}, None, {"b": 2}) == {"a": 1, "b": 2}


def test_reserved_kwargs_rejected(tokenizer: Any) -> None:
    teacher = build_teacher_message(chat(), DEMO, None, SDPOConfig())
    with pytest.raises(ValueError, match="add_generation_prompt"):
        tokenize_teacher_prompt(tokenizer, teacher, max_length=100, truncation="right",
                                chat_template_kwargs={"add_generation_prompt": False})


# --- batch and metrics ------------------------------------------------------------------------------------


def test_batch_metrics_on_a_hand_built_batch(tokenizer: Any) -> None:
    rewards = [
        0.0, 1.0, 0.0, 1.0,  # both successes demo each other; failures get row 1
        0.0, 0.0, 0.0, NAN,  # no success: rows 4, 5 use feedback, 6 (blank) and 7 (None) masked
        1.0, 0.0, 0.0, 0.0,  # lone success masked; failures get row 8
    ]
    feedbacks = ["fa0", "", "fa2", "", "fb", "fb", "  ", None, "", "fc", "fc", "fc"]
    prompts = [chat(f"Q{i // 4}") for i in range(12)]
    completions = [f"c{i}" for i in range(12)]
    batch = build_teacher_batch(
        prompts, completions, rewards, feedbacks, group_size=4, config=SDPOConfig(), tokenizer=tokenizer
    )
    assert batch.demo_index == [1, 3, 1, 1, None, None, None, None, None, 8, 8, 8]
    assert batch.uses_feedback == [False] * 4 + [True, True, False, False] + [False] * 4
    assert batch.sd_mask == [True] * 4 + [True, True, False, False] + [False, True, True, True]
    assert batch.truncated == [False] * 12
    assert batch.metrics == pytest.approx(
        {
            "success_group_fraction": 2 / 3,
            "success_sample_fraction": 7 / 12,
            "feedback_available_fraction": 7 / 12,
            "feedback_used_fraction": 2 / 12,
            "reprompt_sample_fraction": 9 / 12,
            "reprompt_truncated_fraction": 0.0,
            "demo_row_fraction": 7 / 12,
            "feedback_row_fraction": 2 / 12,
        }
    )
    assert batch.row_kinds == ["demo"] * 4 + ["feedback", "feedback", "none", "none", "none"] + ["demo"] * 3
    assert tokenizer.decode(batch.input_ids[0]) == chatml(
        ("system", SYSTEM),
        ("user", "Q0\nCorrect solution:\n\nc1\n\n\n\nCorrectly solve the original question.\n"),
    )
    assert tokenizer.decode(batch.input_ids[7]) == chatml(("system", SYSTEM), ("user", "Q1"))


def test_row_with_demonstration_and_feedback_is_a_demo_row(tokenizer: Any) -> None:
    config = SDPOConfig(environment_feedback_only_without_solution=False)
    batch = build_teacher_batch(
        [chat()] * 2, ["wrong", "right"], [0.0, 1.0], ["off by one", ""], group_size=2, config=config,
        tokenizer=tokenizer,
    )
    assert batch.uses_feedback == [True, False]
    assert batch.row_kinds == ["demo", "none"]
    assert batch.metrics["demo_row_fraction"] == 0.5
    assert batch.metrics["feedback_row_fraction"] == 0.0


def test_batch_truncation_metric(tokenizer: Any) -> None:
    config = SDPOConfig(max_reprompt_length=80)
    batch = build_teacher_batch(
        [chat()] * 4, ["short", DEMO * 40, "x", "y"], [0.0, 1.0, 0.0, 1.0], ["", "", "", ""],
        group_size=2, config=config, tokenizer=tokenizer,
    )
    assert batch.truncated == [True, False, False, False]
    assert batch.metrics["reprompt_truncated_fraction"] == 0.25
    assert all(len(ids) <= 80 for ids in batch.input_ids)


def test_batch_shortest_defaults_to_demo_text_length(tokenizer: Any) -> None:
    config = SDPOConfig(demo_selection="shortest")
    completions = ["<think>" + "long " * 50 + "</think>a", "bb", "fail"]
    batch = build_teacher_batch(
        [chat()] * 3, completions, [1.0, 1.0, 0.0], ["", "", ""], group_size=3, config=config,
        tokenizer=tokenizer,
    )
    assert batch.demo_index == [1, 0, 0]  # "a" after the thinking strip is shorter than "bb"
    batch = build_teacher_batch(
        [chat()] * 3, completions, [1.0, 1.0, 0.0], ["", "", ""], group_size=3, config=config,
        tokenizer=tokenizer, completion_lengths=[9, 3, 1],
    )
    assert batch.demo_index == [1, 0, 1]


def test_batch_length_mismatch(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match=r"feedbacks.*1"):
        build_teacher_batch(
            [chat()] * 2, ["a", "b"], [1.0, 0.0], [""], group_size=2, config=SDPOConfig(), tokenizer=tokenizer
        )
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        build_teacher_batch(
            [chat()] * 2, ["a", "b"], [1.0, 0.0], ["", ""], group_size=3, config=SDPOConfig(), tokenizer=tokenizer
        )


def test_a_success_never_gets_the_feedback_section(tokenizer):
    """docs/peers.md TRL-SDPO-1: even a lone success with non-empty feedback is not told it was unsuccessful."""
    prompts = [[{"role": "user", "content": "Q"}]] * 2
    batch = build_teacher_batch(prompts, ["good", "bad"], [1.0, 0.0], ["partial credit note", "wrong"],
                                group_size=2, config=SDPOConfig(), tokenizer=tokenizer)
    texts = [tokenizer.decode(ids) for ids in batch.input_ids]
    assert "partial credit note" not in texts[0]
    assert batch.sd_mask == [False, True]
    assert batch.uses_feedback == [False, False]
    assert "Correct solution:\n\ngood" in texts[1]
