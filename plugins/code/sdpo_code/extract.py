"""Finding the program in a completion.

Why configurable: the reference takes the *longest* fenced block; chat models usually put the final answer
*last* (after a draft), and some put a usage example after the solution (then *first* or *longest* is
right). Unfenced completions (base models, HumanEval-style continuations) are accepted only when asked for.
"""

from __future__ import annotations

import re
from typing import Literal

Strategy = Literal["last", "longest", "first"]

_PYTHON_TAGS = {"python", "py", "python3", "py3"}
# An opening fence (``` or ~~~, optional language tag) on its own line, then everything up to the matching fence.
_FENCE = re.compile(
    r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+.-]*)[^\n]*\n(?P<body>.*?)^[ \t]*(?P=fence)[ \t]*$",
    re.DOTALL | re.MULTILINE,
)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """Every closed fenced block as ``(language, body)``, in order."""
    return [(m["lang"].lower(), m["body"]) for m in _FENCE.finditer(text)]


def extract_code(text: str, strategy: Strategy = "last", *, allow_unfenced: bool = False) -> str | None:
    """The code to run, or `None` when there is none.

    Python-tagged blocks are preferred; untagged blocks count when there is no tagged one; blocks tagged
    with another language never count. With `allow_unfenced`, a completion without any fence is taken
    whole.
    """
    if strategy not in ("last", "longest", "first"):
        raise ValueError(f"extract strategy must be 'last', 'longest' or 'first', got {strategy!r}")
    blocks = code_blocks(text)
    chosen = [body for lang, body in blocks if lang in _PYTHON_TAGS] or [body for lang, body in blocks if not lang]
    chosen = [body for body in chosen if body.strip()]
    if not chosen:
        if allow_unfenced and not blocks and "```" not in text and text.strip():
            return text
        return None
    if strategy == "first":
        return chosen[0]
    if strategy == "longest":
        return max(chosen, key=len)
    return chosen[-1]
