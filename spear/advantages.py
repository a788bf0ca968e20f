"""Advantage estimators: GRPO / Dr.GRPO (through ``spear_kernels.group_advantages``) and GiGPO."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

import spear_kernels as sk


def grpo_advantages(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids,
    *,
    norm_adv_by_std_in_grpo: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``[B, L]`` advantages: each response's summed reward, group-normalised, broadcast over its mask.

    ``norm_adv_by_std_in_grpo=False`` is Dr.GRPO (``R - mean``). Same result as verl's
    ``compute_grpo_outcome_advantage``.
    """
    scores = token_level_rewards.sum(-1)
    adv = sk.group_advantages(scores, group_ids, norm_by_std=norm_adv_by_std_in_grpo, eps=eps)
    return adv.to(response_mask.device)[:, None] * response_mask


def discounted_returns(
    rewards: torch.Tensor, traj_ids: Sequence, step_index: torch.Tensor, gamma: float
) -> torch.Tensor:
    """``G_t = r_t + gamma G_{t+1}`` within each trajectory (steps ordered by ``step_index``), ``[S]`` fp32."""
    by_traj: dict = defaultdict(list)
    for i, (traj, t) in enumerate(zip(traj_ids, step_index.tolist(), strict=True)):
        by_traj[traj].append((t, i))
    out = torch.zeros(len(traj_ids), dtype=torch.float64)
    r = rewards.double()
    for steps in by_traj.values():
        running = 0.0
        for _, i in sorted(steps, reverse=True):
            running = float(r[i]) + gamma * running
            out[i] = running
    return out.float()


def gigpo_advantages(
    step_rewards: torch.Tensor,
    group_ids: Sequence,
    traj_ids: Sequence,
    step_index: torch.Tensor,
    anchor_obs: Sequence,
    *,
    gamma: float = 0.95,
    step_advantage_w: float = 1.0,
    mode: str = "mean_std_norm",
    eps: float = 1e-6,
) -> torch.Tensor:
    """GiGPO advantage of every step sample, ``[S]`` fp32.

    Each sample is one turn of one trajectory: ``group_ids`` (the prompt's uid), ``traj_ids``,
    ``step_index`` (turn number) and ``anchor_obs`` (the observation the turn acted on; hashable).

    - episode term: GRPO over the trajectories of a group on their returns (sum of step rewards);
    - step term: within a group, steps whose observation is identical form an anchor-state group;
      their discounted returns are normalised within it (a singleton gets 0);
    - ``A = A_episode + step_advantage_w * A_step``; ``mode`` ``mean_std_norm`` divides by ``std + eps``,
      ``mean_norm`` only centres.
    """
    if mode not in ("mean_std_norm", "mean_norm"):
        raise ValueError(f"gigpo mode must be 'mean_std_norm' or 'mean_norm', got {mode!r}")
    n = len(traj_ids)
    if not (len(group_ids) == len(anchor_obs) == step_index.numel() == step_rewards.numel() == n):
        raise ValueError("step_rewards, group_ids, traj_ids, step_index and anchor_obs must have one entry per step")
    norm = mode == "mean_std_norm"
    # Episode level: one return per trajectory.
    traj_index = {}
    traj_group, traj_return = [], []
    for i, traj in enumerate(traj_ids):
        if traj not in traj_index:
            traj_index[traj] = len(traj_index)
            traj_group.append(group_ids[i])
            traj_return.append(0.0)
        traj_return[traj_index[traj]] += float(step_rewards[i])
    ep_adv = sk.group_advantages(torch.tensor(traj_return), traj_group, norm_by_std=norm, eps=eps)
    episode = ep_adv[torch.tensor([traj_index[t] for t in traj_ids], dtype=torch.long)]
    # Step level: anchor-state groups within each prompt group.
    returns = discounted_returns(step_rewards, traj_ids, step_index, gamma)
    anchors = [(g, o) for g, o in zip(group_ids, anchor_obs, strict=True)]
    mean, std, count, inverse = sk.group_stats(returns, anchors)
    step = returns - mean[inverse]
    if norm:
        step = step / (std[inverse] + eps)
    step = torch.where(count[inverse] > 1, step, torch.zeros_like(step))
    return episode + step_advantage_w * step
