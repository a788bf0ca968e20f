"""A tool-use math environment: multi-step arithmetic with a calculator tool and a ±1 outcome reward.

Each task is a chain of 1-4 operations on small integers, written with explicit parentheses, e.g.
``Compute ((37+48)*6)-15.``. In a turn the agent writes either ``<tool>expr</tool>``, which the safe
calculator (:mod:`spear.envs.calculator`) evaluates and answers with ``<obs>value</obs>`` (or
``<obs>error: ...</obs>``), or ``<answer>value</answer>``, which ends the episode with reward +1 if the
value is an integer (parsed, not evaluated: ``<answer>77*4</answer>`` restates the task and scores -1) equal to
the exact result, and -1 otherwise. A turn with neither tag gets an ``<obs>error</obs>``;
running out of turns ends the episode with -1. The expert computes one operation per tool call; with
``expert_direct_prob`` > 0 it instead answers that fraction of tasks at once, without the calculator (mental
arithmetic: right, but a habit a small model imitates poorly, which leaves RL a tool-use lesson to learn).
"""

from __future__ import annotations

import random

from .base import StepResult, extract_tag, parse_integer
from .calculator import CalculatorError, calculate, format_value

OPS = ("+", "-", "*")


def make_problem(seed: int, min_ops: int = 1, max_ops: int = 3) -> tuple[str, list[str], int]:
    """``(expression, expert tool expressions, result)`` for ``seed``; values stay in [-9999, 9999]."""
    rng = random.Random(seed)
    n_ops = rng.randint(min_ops, max_ops)
    value = rng.randint(2, 99)
    text = str(value)
    steps = []
    for i in range(n_ops):
        op = rng.choice(OPS)
        operand = rng.randint(2, 9) if op == "*" else rng.randint(2, 99)
        if op == "*" and abs(value * operand) > 9999:
            op = "-"
        step = f"{value}{op}{operand}"
        steps.append(step)
        value = calculate(step)
        text = f"({text}{op}{operand})" if i < n_ops - 1 else f"{text}{op}{operand}"
    return text, steps, value


class MathToolEnv:
    """See the module docstring. ``max_turns`` bounds the episode; ``min_ops``/``max_ops`` the task length."""

    name = "math"
    stop_strings = ("</tool>", "</answer>")
    fail_reward = -1.0

    def __init__(self, max_turns: int = 6, min_ops: int = 1, max_ops: int = 3, expert_direct_prob: float = 0.0):
        if not 0.0 <= expert_direct_prob <= 1.0:
            raise ValueError(f"expert_direct_prob must be in [0, 1], got {expert_direct_prob}")
        self.expert_direct_prob = expert_direct_prob
        if not 1 <= min_ops <= max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.max_turns = max_turns
        self.min_ops, self.max_ops = min_ops, max_ops
        self._problem: tuple[str, list[str], int] | None = None
        self._turn = 0
        self._done = True

    def reset(self, seed: int) -> str:
        self._problem = make_problem(seed, self.min_ops, self.max_ops)
        self._seed = seed
        self._turn = 0
        self._done = False
        return f"Compute {self._problem[0]}.\n"

    def expert_turns(self) -> list[str]:
        if self._problem is None:
            raise RuntimeError("call reset() first")
        _, steps, result = self._problem
        if random.Random(f"direct:{self._seed}").random() < self.expert_direct_prob:
            return [f"<answer>{result}</answer>"]
        return [f"<tool>{s}</tool>" for s in steps] + [f"<answer>{result}</answer>"]

    def step(self, action_text: str) -> StepResult:
        if self._done or self._problem is None:
            raise RuntimeError("the episode is over; call reset()")
        self._turn += 1
        out_of_turns = self._turn >= self.max_turns
        # The first tag in the text decides the turn (a turn ends at its first closing tag).
        answer_at = action_text.find("<answer>")
        tool_at = action_text.find("<tool>")
        answer = extract_tag(action_text, "answer")
        tool = extract_tag(action_text, "tool")
        if answer is not None and (tool is None or answer_at < tool_at):
            self._done = True
            value = parse_integer(answer)
            correct = value is not None and value == self._problem[2]
            info = {"won": correct, "tool_call": False, "valid": True, "complete": True}
            return StepResult("", 1.0 if correct else -1.0, True, info)
        if tool is not None:
            try:
                obs = f"<obs>{format_value(calculate(tool))}</obs>\n"
                valid = True
            except CalculatorError as err:
                obs = f"<obs>error: {err}</obs>\n"
                valid = False
            info = {"won": False, "tool_call": True, "valid": valid}
        else:
            obs = "<obs>error: write <tool>expression</tool> or <answer>value</answer></obs>\n"
            info = {"won": False, "tool_call": False, "valid": False}
        if out_of_turns:
            self._done = True
            return StepResult("", -1.0, True, {**info, "complete": False})
        return StepResult(obs, 0.0, False, info)
