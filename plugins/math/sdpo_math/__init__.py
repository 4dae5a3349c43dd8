"""sdpo-math: the `math` environment for sdpo-gym, and `reasoning_gym` when reasoning-gym is installed.

    env = sdpo_envs.make("math", difficulty=0)          # one-digit addition, \\boxed{} answers
    rows = env.dataset()                                # prompt / answer columns for GRPOTrainer
    env.score({"answer": "7"}, "3 + 4 = \\boxed{7}")      # Feedback(reward=1.0, ...)

Registered through the `sdpo` entry point `math = "sdpo_math"`, like any third-party plugin.
"""

from __future__ import annotations

from sdpo_envs import Register, hookimpl
from sdpo_math.checker import CheckerPool, CheckResult, MathChecker
from sdpo_math.data import (
    SYSTEM_PROMPTS,
    MalformedRowError,
    generate_problems,
    load_gsm8k,
    load_math,
    load_problems,
    make_prompt,
    to_dataset,
)
from sdpo_math.env import MathEnvironment
from sdpo_math.extract import DEFAULT_ANSWER_PATTERN, Extraction, extract_answer, gold_answer
from sdpo_math.rg import ReasoningGymEnvironment  # imports reasoning-gym only when built

__version__ = "0.1.0"


@hookimpl
def register_environments(register: Register) -> None:
    """Register `math`, and `reasoning_gym` (always listed; building it without the extra says what to install)."""
    register("math", MathEnvironment, description=MathEnvironment.description)
    register(
        "reasoning_gym",
        ReasoningGymEnvironment,
        description="Any reasoning-gym generator, scored by its score_answer (needs sdpo-math[reasoning-gym])",
    )


__all__ = [
    "DEFAULT_ANSWER_PATTERN",
    "SYSTEM_PROMPTS",
    "CheckResult",
    "CheckerPool",
    "Extraction",
    "MalformedRowError",
    "MathChecker",
    "MathEnvironment",
    "ReasoningGymEnvironment",
    "extract_answer",
    "generate_problems",
    "gold_answer",
    "load_gsm8k",
    "load_math",
    "load_problems",
    "make_prompt",
    "register_environments",
    "to_dataset",
]
