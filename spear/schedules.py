"""SPEAR's two curricula: the tool-call reward factor decays, the self-imitation weight ramps up.

``t`` is the training step (rollout batch index, from 1).
"""

from __future__ import annotations

import math

from .config import TOOLCALL_REWARD_MODES


def toolcall_reward_factor(step: int, mode: str, max_steps: int) -> float:
    """``none`` -> 0; ``constant`` -> 1; ``cosine`` -> ``(cos(pi t / T) + 1) / 2`` for ``t <= T``, then 0.

    >>> toolcall_reward_factor(50, "cosine", 100)
    0.5
    """
    if mode not in TOOLCALL_REWARD_MODES:
        raise ValueError(f"use_toolcall_reward must be one of {TOOLCALL_REWARD_MODES}, got {mode!r}")
    if mode == "none":
        return 0.0
    if mode == "constant":
        return 1.0
    if max_steps <= 0:
        raise ValueError(f"max_toolcall_steps must be >= 1, got {max_steps}")
    if step > max_steps:
        return 0.0
    return (math.cos(math.pi * step / max_steps) + 1.0) / 2.0


def replay_loss_weight(step: int, coef: float, max_steps: int) -> float:
    """Self-imitation loss weight: ``coef (1 - cos(pi t / T)) / 2`` for ``t <= T``, then ``coef`` (T = 0: ``coef``).

    >>> replay_loss_weight(100, 1.0, 200)
    0.5
    """
    if max_steps <= 0 or step >= max_steps:
        return float(coef)
    return float(coef) * (1.0 - math.cos(math.pi * step / max_steps)) / 2.0
