"""`reasoning_gym`: any reasoning-gym generator as an environment (extra `sdpo-math[reasoning-gym]`).

reasoning-gym (Apache-2.0) gives seeded procedural datasets, each with `score_answer(answer, entry)`
returning a float in [0, 1]. We keep its score as the reward and add what it lacks: answer
extraction with a format check, and feedback text for the SDPO teacher.

Rows carry the entry's metadata as JSON text (Arrow cannot hold every generator's nested metadata)
and its index; when the index still names the same entry in this environment's dataset, the original
entry is scored, so no type is lost in the JSON round trip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from sdpo_envs import Environment, Feedback, Task
from sdpo_math.data import make_prompt, to_dataset
from sdpo_math.env import show
from sdpo_math.extract import find_boxed

if TYPE_CHECKING:
    import datasets

INSTALL_HINT = "reasoning-gym is not installed: pip install 'sdpo-math[reasoning-gym]'"
INSTRUCTIONS = {
    "tags": "Solve the problem. Give only the final answer between <answer> and </answer> tags.",
    "boxed": "Solve the problem. Put the final answer in \\boxed{}.",
}
_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPEN_TAG_RE = re.compile(r"<answer>", re.IGNORECASE)
_HOW = {"tags": "give the final answer between <answer> and </answer>", "boxed": "put the final answer in \\boxed{}"}


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return reasoning_gym


def extract_tagged(completion: str) -> tuple[str | None, bool]:
    """The last `<answer>…</answer>` content, and whether an `<answer>` after it was never closed."""
    matches = list(_TAG_RE.finditer(completion))
    tail_start = matches[-1].end() if matches else 0
    unclosed = _OPEN_TAG_RE.search(completion, tail_start) is not None
    return (matches[-1].group(1).strip() if matches else None), unclosed


class ReasoningGymEnvironment(Environment):
    """One reasoning-gym generator as an environment (reasoning-gym is imported when it is built).

    Args:
        task (`str`, *optional*, defaults to `"basic_arithmetic"`): a reasoning-gym dataset name.
        size (`int`, *optional*, defaults to `500`): entries of the generated set.
        seed (`int`, *optional*, defaults to `0`): the generator's seed.
        answer_format (`str`, *optional*, defaults to `"tags"`): `"tags"` (`<answer>…</answer>`, the
            reasoning-gym convention) or `"boxed"`; the other form is accepted as a fallback.
        unformatted_scale (`float`, *optional*, defaults to `0.5`): reward factor for an answer found only
            in the fallback form.
        reveal_answer (`bool`, *optional*, defaults to `False`): name the reference answer in the feedback.
        system_prompt (`str`, *optional*): the instruction; defaults to `INSTRUCTIONS[answer_format]`.
        chat (`bool`, *optional*, defaults to `True`): prompts as chat messages, else plain text.
        config (`dict`, *optional*): the generator's config (e.g. `{"min_terms": 2}`); extra keyword
            arguments are added to it.
    """

    name = "reasoning_gym"
    description: ClassVar[str] = "reasoning-gym generators, scored by their score_answer"
    error_reward: float | None = None

    def __init__(
        self,
        *,
        task: str = "basic_arithmetic",
        size: int = 500,
        seed: int = 0,
        answer_format: Literal["tags", "boxed"] = "tags",
        unformatted_scale: float = 0.5,
        reveal_answer: bool = False,
        system_prompt: str | None = None,
        chat: bool = True,
        config: Mapping[str, Any] | None = None,
        **task_kwargs: Any,
    ) -> None:
        if answer_format not in INSTRUCTIONS:
            raise ValueError(f"answer_format must be 'tags' or 'boxed', got {answer_format!r}")
        if not 0.0 <= unformatted_scale <= 1.0:
            raise ValueError(f"unformatted_scale must be in [0, 1], got {unformatted_scale!r}")
        rg = _import_reasoning_gym()
        try:
            self.rg_dataset = rg.create_dataset(task, size=size, seed=seed, **{**(config or {}), **task_kwargs})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"reasoning_gym: cannot create task {task!r}: {exc}") from exc
        self._score_fns: dict[str, Callable[[str | None, dict[str, Any]], float]] = {}
        self._rg = rg
        self.task = task
        self.answer_format = answer_format
        self.unformatted_scale = float(unformatted_scale)
        self.reveal_answer = reveal_answer
        self.system_prompt = INSTRUCTIONS[answer_format] if system_prompt is None else system_prompt
        self.chat = chat

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_rg", None)  # a module does not pickle; re-imported on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._rg = _import_reasoning_gym()

    # ------------------------------------------------------------------------------------- rows
    def _prompt_for(self, question: str) -> str | list[dict[str, str]]:
        return make_prompt(question, chat=self.chat, system_prompt=self.system_prompt)

    def prompt(self, task: Task) -> str | list[dict[str, Any]]:
        if "prompt" in task:
            return task["prompt"]
        return self._prompt_for(task["question"])

    def rows(self) -> list[dict[str, Any]]:
        """Every entry as a row: `prompt`, `question`, `answer`, `metadata` (JSON), `rg_task`, `rg_index`."""
        out = []
        for index in range(len(self.rg_dataset)):
            entry = self.rg_dataset[index]
            out.append({
                "prompt": self._prompt_for(entry["question"]),
                "question": entry["question"],
                "answer": str(entry["answer"]),
                "metadata": json.dumps(entry.get("metadata", {}), default=str),
                "rg_task": self.task,
                "rg_index": index,
            })
        return out

    def dataset(self, *, as_dataset: bool = True) -> datasets.Dataset | list[dict[str, Any]]:
        """The generator's entries as `prompt`/`answer` rows (see `rows`)."""
        rows = self.rows()
        return to_dataset(rows) if as_dataset else rows

    def _entry(self, task: Task) -> dict[str, Any]:
        index = task.get("rg_index")
        same_task = task.get("rg_task", self.task) == self.task
        if isinstance(index, int) and same_task and 0 <= index < len(self.rg_dataset):
            original = self.rg_dataset[index]
            if str(original["answer"]) == str(task.get("answer")):
                return dict(original)
        if "answer" not in task:
            raise KeyError(f"reasoning_gym: task has no 'answer' field (fields: {sorted(task)})")
        metadata = task.get("metadata") or {}
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        return {"question": task.get("question", ""), "answer": task["answer"], "metadata": dict(metadata)}

    def _score_fn(self, entry: Mapping[str, Any]) -> Callable[[str | None, dict[str, Any]], float]:
        source = (entry.get("metadata") or {}).get("source_dataset", self.task)
        if source == self.task:
            return self.rg_dataset.score_answer
        if source not in self._score_fns:  # a row from another generator (a composite set)
            self._score_fns[source] = self._rg.get_score_answer_fn(source)
        return self._score_fns[source]

    # ---------------------------------------------------------------------------------- scoring
    def _extract(self, completion: str) -> tuple[str | None, str | None, bool]:
        """(answer, form it was found in, truncated)."""
        tagged, tag_open = extract_tagged(completion)
        boxes, box_open = find_boxed(completion)
        boxed = boxes[-1].strip() if boxes else None
        order = [("tags", tagged, tag_open), ("boxed", boxed, box_open is not None)]
        if self.answer_format == "boxed":
            order.reverse()
        for form, answer, _ in order:
            if answer:
                return answer, form, False
        if order[0][2]:
            return None, order[0][0], True
        return None, None, False

    def score(self, task: Task, completion: str) -> Feedback:
        entry = self._entry(task)
        answer, form, truncated = self._extract(completion)
        details: dict[str, Any] = {"answer": answer, "expected": str(entry["answer"]), "source": form,
                                   "in_format": form == self.answer_format, "task": self.task}
        how = _HOW[self.answer_format]
        if truncated:
            return self._fail("truncated", f"The response was cut off before the final answer was closed; {how}.",
                              details)
        if answer is None:
            text = "The response is empty" if not completion.strip() else "No final answer was found"
            return self._fail("no_answer", f"{text}: {how}.", details)
        score = float(self._score_fn(entry)(answer, entry))
        details["score"] = score
        reward = score if details["in_format"] else score * self.unformatted_scale
        shown = show(answer)
        if score >= 1.0:
            if details["in_format"]:
                return Feedback(reward=1.0, text="", success=True, details={**details, "verdict": "correct"})
            text = f"Your answer `{shown}` is right, but not in the requested form: {how}."
            return Feedback(reward=reward, text=text, success=False, details={**details, "verdict": "format"})
        note = "" if details["in_format"] else f" Also, {how}."
        if score > 0:
            text = f"Your final answer `{shown}` is only partly right (score {score:.2f}).{note}"
            return self._fail("partial", text, details, reward)
        return self._fail("wrong_answer", f"Your final answer `{shown}` is not correct.{note}", details, reward)

    def _fail(self, verdict: str, text: str, details: dict[str, Any], reward: float = 0.0) -> Feedback:
        if self.reveal_answer:
            text += f" The correct answer is {show(details['expected'])}."
        return Feedback(reward=reward, text=text, success=False, details={**details, "verdict": verdict})
