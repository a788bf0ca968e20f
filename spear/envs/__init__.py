"""Multi-turn text environments: the protocol (:class:`TextEnv`) and the built-in environments.

env = spear.envs.make_env("math", max_turns=6)
prompt = env.reset(seed=0)
result = env.step("<tool>37+48</tool>")  # StepResult(observation="<obs>85</obs>\\n", reward=0.0, ...)
"""

from __future__ import annotations

from typing import Any

from .base import StepResult, TextEnv, extract_tag, parse_integer
from .calculator import CalculatorError, calculate
from .experts import expert_transcripts
from .math_tool import MathToolEnv

ENVS = ("math", "textworld")


def make_env(name: str, **kwargs: Any) -> TextEnv:
    """A new environment instance: ``math`` (:class:`MathToolEnv`) or ``textworld`` (``TextWorldEnv``)."""
    if name == "math":
        return MathToolEnv(**kwargs)
    if name == "textworld":
        from .textworld_env import TextWorldEnv

        return TextWorldEnv(**kwargs)
    raise ValueError(f"unknown environment {name!r}; available: {', '.join(ENVS)}")


__all__ = [
    "ENVS",
    "CalculatorError",
    "MathToolEnv",
    "StepResult",
    "TextEnv",
    "calculate",
    "expert_transcripts",
    "extract_tag",
    "parse_integer",
    "make_env",
]
