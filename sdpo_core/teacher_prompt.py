"""Teacher prompts for SDPO: who gets a demonstration or feedback, and the teacher's prompt token ids.

Reproduces lasgroup/SDPO `ray_trainer.py:611-796` (specified in docs/algorithm.md §4) with these deliberate
differences:

- `{prompt}` is the *content* of the last user message and earlier messages stay as they are, so system text
  and role names are never duplicated (docs/peers.md SDPO-RL-3: pasted rendered chat-template text);
- the thinking strip also drops everything up to an unmatched leading `</think>` (a completion that began inside
  a prefilled `<think>`), which the reference regex misses;
- over-long teacher prompts are shortened by re-rendering with shorter demonstration, feedback or question
  text, so the chat template and the generation header are never cut (the reference right-truncates the
  token ids, cutting the assistant header), and the tokenizer is never mutated (docs/peers.md SDPO-RL-9);
- demonstrations can also be chosen at random or as the shortest success, and a lone success may
  opt in to being its own demonstration.

Everything here is pure: no model and no process group. The trainer calls `build_teacher_batch` on the
gathered global batch, where the G completions of a prompt are contiguous rows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .config import DEMO_SELECTIONS, TRUNCATION_SIDES, SDPOConfig

__all__ = [
    "TeacherBatch",
    "TeacherPrompt",
    "build_teacher_batch",
    "build_teacher_message",
    "merge_chat_template_kwargs",
    "select_demonstrations",
    "strip_thinking",
    "tokenize_teacher_prompt",
]

Messages = list[dict[str, Any]]

_OPEN, _CLOSE = "<think>", "</think>"

# Arguments `tokenize_teacher_prompt` sets itself; a caller passing them would silently change the ids' meaning.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"tokenize", "return_dict", "add_generation_prompt", "continue_final_message", "return_tensors", "padding",
     "truncation", "max_length"}
)


def strip_thinking(text: str) -> str:
    """Remove reasoning from a demonstration so the teacher sees only the answer.

    Drops every `<think>...</think>` block with the whitespace after it, like the reference's
    `re.sub(r"<think>.*?</think>\\s*", "", s, flags=re.DOTALL)` (lasgroup/SDPO ray_trainer.py:645-648), and
    first everything up to and including a `</think>` that comes before any `<think>`: a completion generated
    after a prefilled `<think>` starts inside the block, which the reference misses. An unclosed `<think>` is
    kept. Written with `str.find` because the reference's regex is quadratic on runs of unclosed `<think>`.
    """
    first_close = text.find(_CLOSE)
    first_open = text.find(_OPEN)
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        text = text[first_close + len(_CLOSE):].lstrip()
    pieces: list[str] = []
    pos = 0
    while (start := text.find(_OPEN, pos)) != -1:
        end = text.find(_CLOSE, start + len(_OPEN))
        if end == -1:  # no later <think> can be closed either
            break
        pieces.append(text[pos:start])
        pos = end + len(_CLOSE)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    pieces.append(text[pos:])
    return "".join(pieces)


def _is_success(reward: float, threshold: float) -> bool:
    reward = float(reward)
    return not math.isnan(reward) and reward >= threshold


def select_demonstrations(
    rewards: Sequence[float],
    group_size: int,
    *,
    threshold: float,
    exclude_self: bool = True,
    mode: str = "first",
    allow_self_when_alone: bool = False,
    lengths: Sequence[int] | None = None,
    rng: random.Random | None = None,
) -> list[int | None]:
    """For each row of a global batch, the global index of its demonstration, or `None`.

    Groups are contiguous blocks of `group_size` rows. A success has `reward >= threshold`; NaN (all reward
    functions abstained) never succeeds. Candidates are the group's successes, minus the row itself when
    `exclude_self` (`dont_reprompt_on_self_success`). When that leaves a success with no candidate and
    `allow_self_when_alone` is set, it demonstrates to itself.

    `mode`:
        `"first"`: the first candidate (lasgroup/SDPO ray_trainer.py:650-669); all failures of a group share it.
        `"shortest"`: the candidate with the smallest `lengths` value, ties to the first; failures share it.
        `"random"`: a uniform candidate per row from `rng` (defaults to the global `random` module, which
            `transformers.set_seed` seeds). Processes that each compute the batch must share the seed.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if len(rewards) % group_size != 0:
        raise ValueError(
            f"the batch has {len(rewards)} rewards, which is not a multiple of group_size={group_size}: the rows "
            "must be whole groups of num_generations contiguous completions"
        )
    if mode not in DEMO_SELECTIONS:
        raise ValueError(f"demo_selection must be one of {', '.join(map(repr, DEMO_SELECTIONS))}; got {mode!r}")
    if mode == "shortest":
        if lengths is None:
            raise ValueError('demo_selection="shortest" needs `lengths`')
        if len(lengths) != len(rewards):
            raise ValueError(f"got {len(lengths)} lengths for {len(rewards)} rewards")
    choice: Callable[[Sequence[int]], int] = rng.choice if rng is not None else random.choice

    demos: list[int | None] = []
    for start in range(0, len(rewards), group_size):
        group = range(start, start + group_size)
        successes = [j for j in group if _is_success(rewards[j], threshold)]
        for i in group:
            candidates = [j for j in successes if not (exclude_self and j == i)]
            if not candidates and allow_self_when_alone and i in successes:
                candidates = [i]
            if not candidates:
                demos.append(None)
            elif mode == "first":
                demos.append(candidates[0])
            elif mode == "shortest":
                assert lengths is not None
                demos.append(min(candidates, key=lambda j: lengths[j]))
            else:
                demos.append(choice(candidates))
    return demos


@dataclass(frozen=True)
class TeacherPrompt:
    """The teacher's prompt for one rollout, plus what it needs to re-render shorter versions of itself.

    `prompt` is a message list (conversational) or a string (standard), never rendered chat-template text.
    `in_mask` is the sample's `sd_mask`: it got a demonstration or used feedback. `question`,
    `demonstration` and `feedback` are the texts inserted into the templates (`""` when unused).
    `context_messages` are the messages before the last one, `last_message` the last one (`None` for string
    prompts) and `templates` the reprompt, solution and feedback templates.
    """

    prompt: Messages | str
    uses_demonstration: bool
    uses_feedback: bool
    in_mask: bool
    question: str
    demonstration: str
    feedback: str
    context_messages: tuple[dict[str, Any], ...] = field(repr=False)
    last_message: dict[str, Any] | None = field(repr=False)
    templates: tuple[str, str, str] = field(repr=False)

    def render(
        self, *, question: str | None = None, demonstration: str | None = None, feedback: str | None = None
    ) -> Messages | str:
        """The prompt rebuilt with some inserted texts replaced: truncation shortens them and re-renders."""
        question = self.question if question is None else question
        if self.in_mask:
            reprompt, solution_tpl, feedback_tpl = self.templates
            demo = self.demonstration if demonstration is None else demonstration
            fb = self.feedback if feedback is None else feedback
            text = reprompt.format(
                prompt=question,
                solution=solution_tpl.format(successful_previous_attempt=demo) if self.uses_demonstration else "",
                feedback=feedback_tpl.format(feedback_raw=fb) if self.uses_feedback else "",
            )
        else:
            text = question
        if self.last_message is None:
            return text
        return [dict(m) for m in self.context_messages] + [_with_text(self.last_message, text)]


def _message_text(message: Mapping[str, Any]) -> str:
    """The text of a message; multimodal content lists contribute their text parts, concatenated."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    raise ValueError(f"message content must be a string or a list of content parts, got {type(content).__name__}")


def _with_text(message: Mapping[str, Any], text: str) -> dict[str, Any]:
    """`message` with its text replaced by `text`.

    For a content list, non-text parts (images, audio) keep their order, and the text goes into the position
    of the first text part (appended when there was none); further text parts are dropped, since their text
    is already in `text`.
    """
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": text}
    parts: list[Any] = []
    placed = False
    for part in content or []:
        if part.get("type") != "text":
            parts.append(part)
        elif not placed:
            parts.append({**part, "text": text})
            placed = True
    if not placed:
        parts.append({"type": "text", "text": text})
    return {**message, "content": parts}


def _has_text(feedback: str | None) -> bool:
    return isinstance(feedback, str) and feedback.strip() != ""


def build_teacher_message(
    prompt: Sequence[Mapping[str, Any]] | str,
    demonstration: str | None,
    feedback: str | None,
    config: SDPOConfig,
) -> TeacherPrompt:
    """The teacher prompt for one rollout (lasgroup/SDPO ray_trainer.py:700-745).

    The solution section is present iff `demonstration` is given (thinking stripped when
    `remove_thinking_from_demonstration`). The feedback section is present iff `include_environment_feedback`,
    `feedback` is non-blank, and not (`environment_feedback_only_without_solution` and a demonstration is
    used). With either section, the user turn becomes `reprompt_template` filled with the question and the
    sections; with neither, the prompt is unchanged and the sample is masked out (`in_mask=False`).

    Conversational prompts must end with a user message: its content (the text parts of a multimodal content
    list) is `{prompt}`, the earlier messages are kept unchanged, and the new user message replaces it.
    Standard (string) prompts give the filled template string.
    """
    uses_demonstration = demonstration is not None
    demo_text = ""
    if demonstration is not None:
        demo_text = strip_thinking(demonstration) if config.remove_thinking_from_demonstration else demonstration
    uses_feedback = (
        config.include_environment_feedback
        and _has_text(feedback)
        and not (config.environment_feedback_only_without_solution and uses_demonstration)
    )
    in_mask = uses_demonstration or uses_feedback
    # The feedback text goes in as given, not stripped (lasgroup/SDPO ray_trainer.py:611-634).
    feedback_text = feedback if uses_feedback and feedback is not None else ""
    templates = (config.reprompt_template, config.solution_template, config.feedback_template)

    if isinstance(prompt, str):
        teacher = TeacherPrompt(
            prompt, uses_demonstration, uses_feedback, in_mask, prompt, demo_text, feedback_text,
            context_messages=(), last_message=None, templates=templates,
        )
    else:
        messages = list(prompt)
        if not messages:
            raise ValueError("a conversational prompt must have at least one message")
        last = messages[-1]
        if last.get("role") != "user":
            raise ValueError(
                "the teacher prompt replaces the last message of the student's prompt, which must be a user "
                f"message; got role {last.get('role')!r}"
            )
        teacher = TeacherPrompt(
            [dict(m) for m in messages], uses_demonstration, uses_feedback, in_mask, _message_text(last),
            demo_text, feedback_text, context_messages=tuple(dict(m) for m in messages[:-1]),
            last_message=dict(last), templates=templates,
        )
    # A masked sample keeps the student's prompt as is; a reprompted one gets the filled user turn.
    return replace(teacher, prompt=teacher.render()) if in_mask else teacher


def merge_chat_template_kwargs(*kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge chat-template kwargs, later ones winning: `GRPOConfig.chat_template_kwargs`, then SDPO's own."""
    merged: dict[str, Any] = {}
    for extra in kwargs:
        merged.update(extra or {})
    return merged


def _encode(tokenizer: Any, prompt: Messages | str, chat_template_kwargs: Mapping[str, Any]) -> list[int]:
    """Token ids of a prompt exactly as GRPOTrainer tokenizes the student's (trl 1.16 `_tokenize_prompts`)."""
    if isinstance(prompt, str):
        # GRPOTrainer: `processing_class(text=prompts)["input_ids"]`, i.e. with special tokens.
        ids = tokenizer(text=[prompt])["input_ids"][0]
    else:
        encoded = tokenizer.apply_chat_template(
            prompt,
            add_generation_prompt=True,
            continue_final_message=False,
            tokenize=True,
            return_dict=True,
            **chat_template_kwargs,
        )
        # transformers 5 returns a BatchEncoding; processors batch even a single conversation.
        ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
        if len(ids) > 0 and not isinstance(ids[0], int):
            ids = ids[0]
    return [int(t) for t in ids]


def _longest_fitting(size: int, fits: Callable[[int], bool]) -> int | None:
    """The largest `k` in `[0, size]` with `fits(k)` by bisection, or `None` when even `fits(0)` fails.

    Token counts are only roughly monotone in the number of kept characters, so the result is some `k` that
    fits with `k + 1` not fitting, which is all truncation needs.
    """
    if not fits(0):
        return None
    lo, hi = 0, size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def tokenize_teacher_prompt(
    tokenizer: Any,
    teacher: TeacherPrompt,
    *,
    max_length: int,
    truncation: str,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[int], bool]:
    """The teacher prompt's token ids, at most `max_length` of them, and whether it was shortened.

    Conversational prompts go through `apply_chat_template(add_generation_prompt=True,
    continue_final_message=False)` with `chat_template_kwargs` (which may carry `chat_template` or `tools`);
    string prompts through the tokenizer with special tokens, as GRPOTrainer does for the student.

    Over-long prompts are shortened by re-rendering with shorter *texts*, so the chat template, earlier
    messages and the generation header are never cut, and the tokenizer is never touched:

    - `"right"`: cut the end of the demonstration and feedback (the feedback first, as it follows the
      demonstration); if the prompt still does not fit with both empty, cut the question from its start;
    - `"left"`: cut the question from its start; if it still does not fit with the question empty, cut the
      demonstration and feedback from their ends;
    - `"error"`: raise `ValueError`.

    When even empty texts do not fit (the template, earlier messages and headers alone exceed `max_length`),
    this raises `ValueError`: cutting the rendered ids would drop the system prompt or the header and give the
    teacher a garbled prompt, so the budget is a configuration error.
    """
    if truncation not in TRUNCATION_SIDES:
        raise ValueError(
            f"reprompt_truncation must be one of {', '.join(map(repr, TRUNCATION_SIDES))}; got {truncation!r}"
        )
    kwargs = dict(chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise ValueError(f"chat template kwargs {reserved} are set by the teacher-prompt tokenization itself")

    ids = _encode(tokenizer, teacher.prompt, kwargs)
    if len(ids) <= max_length:
        return ids, False
    if truncation == "error":
        raise ValueError(
            f"the teacher prompt has {len(ids)} tokens, more than max_reprompt_length={max_length}; raise "
            'max_reprompt_length or set reprompt_truncation to "right" or "left"'
        )

    cache: dict[tuple[str, str, str], list[int]] = {}

    def encode_texts(question: str, demonstration: str, feedback: str) -> list[int]:
        key = (question, demonstration, feedback)
        if key not in cache:
            rendered = teacher.render(question=question, demonstration=demonstration, feedback=feedback)
            cache[key] = _encode(tokenizer, rendered, kwargs)
        return cache[key]

    demo, fb = teacher.demonstration, teacher.feedback

    def sections(keep: int) -> tuple[str, str]:
        # The first `keep` characters of demonstration + feedback: the end of the inserted texts goes first.
        return demo[:keep], fb[: max(0, keep - len(demo))]

    def cut_sections(question: str) -> list[int] | None:
        keep = _longest_fitting(
            len(demo) + len(fb), lambda k: len(encode_texts(question, *sections(k))) <= max_length
        )
        return None if keep is None else encode_texts(question, *sections(keep))

    def cut_question(demonstration: str, feedback: str) -> list[int] | None:
        q = teacher.question

        def suffix(k: int) -> str:
            return q[len(q) - k:]

        keep = _longest_fitting(len(q), lambda k: len(encode_texts(suffix(k), demonstration, feedback)) <= max_length)
        return None if keep is None else encode_texts(suffix(keep), demonstration, feedback)

    if truncation == "right":
        result = cut_sections(teacher.question)
        if result is None:
            result = cut_question("", "")
    else:
        result = cut_question(demo, fb)
        if result is None:
            result = cut_sections("")
    if result is None:
        floor = len(encode_texts("", "", ""))
        raise ValueError(
            f"max_reprompt_length={max_length} is too small: the teacher prompt has {len(ids)} tokens and still "
            f"has {floor} with an empty question, demonstration and feedback (chat template, earlier messages "
            "and reprompt template alone)"
        )
    return result, True


@dataclass(frozen=True)
class TeacherBatch:
    """Per-row teacher inputs for a global batch, and the reference's reprompting metrics.

    `input_ids` are the teacher prompt ids only; the trainer appends the student's exact completion ids.
    """

    input_ids: list[list[int]]
    sd_mask: list[bool]
    demo_index: list[int | None]
    uses_feedback: list[bool]
    truncated: list[bool]
    metrics: dict[str, float]

    @property
    def row_kinds(self) -> list[str]:
        """Per row: `"demo"` (the teacher prompt holds a demonstration, maybe feedback too), `"feedback"`
        (feedback only) or `"none"` (no teacher signal: masked out)."""
        return [_row_kind(demo, feedback) for demo, feedback in zip(self.demo_index, self.uses_feedback, strict=True)]


def _row_kind(demo: int | None, uses_feedback: bool) -> str:
    if demo is not None:
        return "demo"
    return "feedback" if uses_feedback else "none"


def build_teacher_batch(
    prompts: Sequence[Sequence[Mapping[str, Any]] | str],
    completions: Sequence[str],
    rewards: Sequence[float],
    feedbacks: Sequence[str | None],
    *,
    group_size: int,
    config: SDPOConfig,
    tokenizer: Any,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    completion_lengths: Sequence[int] | None = None,
    rng: random.Random | None = None,
) -> TeacherBatch:
    """Teacher prompt ids, `sd_mask` and metrics for a global batch of `group_size`-row groups.

    `prompts` are the prompts the student was generated from, `completions` its decoded texts (special
    tokens skipped), `rewards` the total rewards (NaN never succeeds) and `feedbacks` the per-rollout
    feedback (`None` or blank = none). `chat_template_kwargs` are `GRPOConfig.chat_template_kwargs`;
    `config.apply_chat_template_kwargs` are merged over them. `completion_lengths` (e.g. token counts) rank
    `"shortest"` demonstrations; without them the demonstration text's length in characters is used.

    Metrics (lasgroup/SDPO ray_trainer.py:780-790, plus truncation), as fractions of rows unless noted:
    `success_group_fraction` (of groups, with at least one success), `success_sample_fraction` (rows with a
    demonstration), `feedback_available_fraction` (non-blank feedback, whether or not it is used),
    `feedback_used_fraction`, `reprompt_sample_fraction` (rows in `sd_mask`) and
    `reprompt_truncated_fraction`; and by kind of teacher prompt (`TeacherBatch.row_kinds`),
    `demo_row_fraction` (equal to `success_sample_fraction`) and `feedback_row_fraction` (feedback only).
    """
    n = len(prompts)
    named = {"completions": completions, "rewards": rewards, "feedbacks": feedbacks}
    if completion_lengths is not None:
        named["completion_lengths"] = completion_lengths
    mismatched = {name: len(values) for name, values in named.items() if len(values) != n}
    if mismatched:
        raise ValueError(f"every per-row list must have one entry per prompt ({n}); got lengths {mismatched}")

    if completion_lengths is None and config.demo_selection == "shortest":
        completion_lengths = [
            len(strip_thinking(c) if config.remove_thinking_from_demonstration else c) for c in completions
        ]
    demo_index = select_demonstrations(
        rewards,
        group_size,
        threshold=config.success_reward_threshold,
        exclude_self=config.dont_reprompt_on_self_success,
        mode=config.demo_selection,
        allow_self_when_alone=config.allow_self_demo_when_alone,
        lengths=completion_lengths,
        rng=rng,
    )
    sdpo_kwargs = config.apply_chat_template_kwargs
    if not isinstance(sdpo_kwargs, Mapping):  # SDPOConfig parses a JSON string in __post_init__
        raise ValueError("config.apply_chat_template_kwargs must be a dict")
    kwargs = merge_chat_template_kwargs(chat_template_kwargs, sdpo_kwargs)

    input_ids: list[list[int]] = []
    sd_mask: list[bool] = []
    uses_feedback: list[bool] = []
    truncated: list[bool] = []
    for prompt, feedback, reward, demo in zip(prompts, feedbacks, rewards, demo_index, strict=True):
        # A success is never told it was "unsuccessful" (TRL 1.16's sdpo does this): its feedback is dropped.
        if _is_success(reward, config.success_reward_threshold):
            feedback = None
        teacher = build_teacher_message(prompt, None if demo is None else completions[demo], feedback, config)
        ids, was_truncated = tokenize_teacher_prompt(
            tokenizer,
            teacher,
            max_length=config.max_reprompt_length,
            truncation=config.reprompt_truncation,
            chat_template_kwargs=kwargs,
        )
        input_ids.append(ids)
        sd_mask.append(teacher.in_mask)
        uses_feedback.append(teacher.uses_feedback)
        truncated.append(was_truncated)

    rows = max(n, 1)
    num_groups = n // group_size
    groups_with_success = sum(
        any(_is_success(r, config.success_reward_threshold) for r in rewards[g * group_size:(g + 1) * group_size])
        for g in range(num_groups)
    )
    metrics = {
        "success_group_fraction": groups_with_success / max(num_groups, 1),
        "success_sample_fraction": sum(d is not None for d in demo_index) / rows,
        "feedback_available_fraction": sum(_has_text(f) for f in feedbacks) / rows,
        "feedback_used_fraction": sum(uses_feedback) / rows,
        "reprompt_sample_fraction": sum(sd_mask) / rows,
        "reprompt_truncated_fraction": sum(truncated) / rows,
        "demo_row_fraction": sum(demo is not None for demo in demo_index) / rows,
        "feedback_row_fraction": sum(demo is None and used for demo, used in zip(demo_index, uses_feedback,
                                                                               strict=True)) / rows,
    }
    return TeacherBatch(input_ids, sd_mask, demo_index, uses_feedback, truncated, metrics)
