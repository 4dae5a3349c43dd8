"""sdpo-example: a toy sdpo-gym environment plugin (the result of docs/plugins/tutorial.md).

The environment asks the model to reverse a word and, when it fails, says *where* it went wrong
without giving the answer away: that text is what SDPO's teacher reads.
"""

from __future__ import annotations

from collections.abc import Sequence

from sdpo_envs import Environment, Feedback, Register, Task, Turn, hookimpl


class ReverseEnvironment(Environment):
    """Reverse the letters of a word; feedback points at the first wrong letter.

    Args:
        case_sensitive (`bool`, *optional*, defaults to `False`):
            Whether "Olleh" counts as the reverse of "hello".
        word_column (`str`, *optional*, defaults to `"word"`):
            The dataset column that holds the word.
    """

    def __init__(self, case_sensitive: bool = False, word_column: str = "word") -> None:
        self.case_sensitive = case_sensitive
        self.word_column = word_column

    def prompt(self, task: Task) -> str:
        word = task[self.word_column]
        return f"Reverse the letters of the word {word!r}. Answer with the reversed word only."

    def score(self, task: Task, completion: str) -> Feedback:
        target = str(task[self.word_column])[::-1]
        words = completion.strip().split()
        guess = words[-1].strip(".,;:!?\"'`") if words else ""
        if not self.case_sensitive:
            target, guess = target.lower(), guess.lower()
        if guess == target:
            return Feedback(reward=1.0, success=True, details={"guess": guess})
        if not guess:
            text = "The answer is empty: reply with the reversed word."
        elif len(guess) != len(target):
            text = f"Your answer {guess!r} has {len(guess)} letters; the word has {len(target)}."
        else:
            i = next(i for i, (a, b) in enumerate(zip(guess, target, strict=True)) if a != b)
            text = f"Letter {i + 1} of your answer {guess!r} is wrong."
        return Feedback(reward=0.0, text=text, success=False, details={"guess": guess})

    def respond(self, task: Task, history: Sequence[Turn]) -> str:
        """What the model reads before its next attempt: the feedback on its last one."""
        return f"{history[-1].feedback.text} Try again: answer with the reversed word only."


@hookimpl
def register_environments(register: Register) -> None:
    register("reverse", ReverseEnvironment)
