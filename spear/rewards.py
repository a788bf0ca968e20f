"""The intrinsic tool-call reward (docs/config.md: ``algorithm.use_toolcall_reward``)."""

from __future__ import annotations

import torch


def toolcall_bonus(
    tool_turns: torch.Tensor | list[int],
    factor: float,
    *,
    variant: str = "per_turn",
    success: torch.Tensor | list[bool] | None = None,
) -> torch.Tensor:
    """Bonus per trajectory, fp32 ``[B]``.

    ``tool_turns[i]`` counts the assistant turns of trajectory i that made at least one tool call
    (math) or environment action (agent envs). ``per_turn`` (README and the reference's default reward):
    ``min(0.1 k, 1) * factor``, added whether or not the answer is right. ``success`` (the reference's ``_qwen3``
    reward): ``factor`` for a successful trajectory that used the tool (``success[i]`` and ``k > 0``),
    ``min(0.1 k, 1) * factor`` otherwise; it needs ``success [B]``.
    """
    k = torch.as_tensor(tool_turns, dtype=torch.float32)
    if bool((k < 0).any()):
        raise ValueError("tool-call turn counts must be >= 0")
    per_turn = torch.clamp(0.1 * k, max=1.0) * factor
    if variant == "per_turn":
        return per_turn
    if variant == "success":
        if success is None:
            raise ValueError("toolcall_reward_variant 'success' needs each trajectory's success")
        won = torch.as_tensor(success, dtype=torch.bool)
        if won.shape != k.shape:
            raise ValueError(f"success has shape {tuple(won.shape)}, tool_turns {tuple(k.shape)}")
        return torch.where(won & (k > 0), torch.full_like(k, float(factor)), per_turn)
    raise ValueError(f"toolcall_reward_variant must be 'per_turn' or 'success', got {variant!r}")


def add_to_last_token(token_rewards: torch.Tensor, response_mask: torch.Tensor, bonus: torch.Tensor) -> torch.Tensor:
    """Adds ``bonus [B]`` at each response's last valid token of ``token_rewards [B, L]`` (rows with no valid
    token get nothing); returns a new tensor."""
    out = token_rewards.clone()
    valid = response_mask.bool()
    has_token = valid.any(-1)
    last = valid.shape[-1] - 1 - valid.flip(-1).float().argmax(-1)
    rows = torch.nonzero(has_token).squeeze(1)
    out[rows, last[rows]] += bonus.to(out.dtype)[rows]
    return out
