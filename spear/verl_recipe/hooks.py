"""SPEAR's additions to a verl training step, as functions on ``DataProto`` batches.

Each one reads the keys verl's trainer puts in a batch (``responses``, ``response_mask``,
``token_level_scores`` / ``token_level_rewards``, ``old_log_probs``, non-tensor ``uid``) and calls the
algorithm layer (``spear.rewards``, ``spear.filters``, ``spear.advantages``, ``spear.replay``); none of
the logic is repeated here. Optional non-tensor keys an agent loop may add: ``tool_call_turns`` (int per
response) and ``incomplete`` (bool per response); for GiGPO, ``traj_uid``, ``step_index`` and ``anchor_obs``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from verl import DataProto

from .. import filters, rewards
from ..advantages import gigpo_advantages, grpo_advantages
from ..config import SpearConfig
from ..replay import TrajectoryReplayBuffer
from ..schedules import replay_loss_weight, toolcall_reward_factor

REPLAY_KEYS = ("input_ids", "attention_mask", "position_ids", "prompts", "responses", "response_mask", "old_log_probs")


def _rewards_key(batch: DataProto) -> str:
    return "token_level_rewards" if "token_level_rewards" in batch.batch.keys() else "token_level_scores"


def per_response(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` values broadcast over each response (advantages) -> one scalar per response ``[B]``
    (the value at its first valid token; 0 for an empty response)."""
    valid = response_mask.bool()
    first = valid.float().argmax(-1)
    out = values.gather(-1, first[:, None]).squeeze(-1)
    return torch.where(valid.any(-1), out, torch.zeros_like(out))


def apply_toolcall_bonus(batch: DataProto, step: int, cfg: SpearConfig) -> dict[str, float]:
    """Adds the intrinsic tool-call reward at each response's last valid token (SPEAR-SPEC section 3)."""
    alg = cfg.algorithm
    factor = toolcall_reward_factor(step, alg.use_toolcall_reward, alg.max_toolcall_steps)
    n = len(batch)
    turns = batch.non_tensor_batch.get("tool_call_turns", np.zeros(n, dtype=np.int64))
    bonus = rewards.toolcall_bonus(
        np.asarray(turns, dtype=np.int64).tolist(), factor, variant=alg.toolcall_reward_variant
    )
    mask = batch.batch["response_mask"]
    for key in ("token_level_scores", "token_level_rewards"):
        if key in batch.batch.keys():
            batch.batch[key] = rewards.add_to_last_token(batch.batch[key], mask, bonus.to(batch.batch[key].device))
    return {"toolcall/factor": factor, "toolcall/bonus_mean": float(bonus.mean()) if n else 0.0}


def apply_response_filters(
    batch: DataProto, cfg: SpearConfig, *, max_response_length: int, tokenizer: Any = None
) -> dict[str, float]:
    """Dr.BoT: zeroes the loss mask of overlong, incomplete, repetitive and unreadable responses."""
    alg, mask = cfg.algorithm, batch.batch["response_mask"]
    flags: dict[str, torch.Tensor] = {}
    if alg.filter_overlong_responses:
        flags["overlong"] = filters.overlong(mask, max_response_length).cpu()
    if alg.filter_incomplete_responses and "incomplete" in batch.non_tensor_batch:
        flags["incomplete"] = torch.as_tensor(np.asarray(batch.non_tensor_batch["incomplete"], dtype=bool))
    if alg.filter_repetitive_responses:
        flags["repetitive"] = filters.repetitive(batch.batch["responses"].cpu(), mask.cpu())
    if alg.filter_unreadable_responses and tokenizer is not None:
        texts = [
            tokenizer.decode(ids[m.bool()].tolist())
            for ids, m in zip(batch.batch["responses"].cpu(), mask.cpu(), strict=True)
        ]
        flags["unreadable"] = filters.unreadable(texts)
    new_mask, counts = filters.apply_response_filters(mask, flags)
    batch.batch["response_mask"] = new_mask
    return {k: float(v) for k, v in counts.items()}


def apply_rollout_filter(batch: DataProto, cfg: SpearConfig) -> dict[str, float]:
    """Keeps the groups with the largest in-group reward std by masking the others' losses (the batch keeps its
    size, so verl's mini-batch arithmetic is untouched); ratio 1 only logs."""
    scores = batch.batch[_rewards_key(batch)].sum(-1).cpu()
    keep, stats = filters.rollout_std_filter(
        scores, batch.non_tensor_batch["uid"], cfg.actor_rollout_ref.rollout.rollout_filter_ratio
    )
    batch.batch["response_mask"] = batch.batch["response_mask"] * keep[:, None].to(batch.batch["response_mask"])
    return stats


GIGPO_KEYS = ("traj_uid", "step_index", "anchor_obs")


def compute_advantages(batch: DataProto, cfg: SpearConfig) -> None:
    """Advantages and returns from the (bonus-added) rewards, over the (filtered) mask.

    ``algorithm.adv_estimator: grpo`` -> GRPO / Dr.GRPO per ``uid`` group. ``gigpo`` expects verl-agent's
    per-step layout: each row is one turn of a trajectory, with non-tensor ``traj_uid`` (the trajectory),
    ``step_index`` (the turn number) and ``anchor_obs`` (the observation the turn acted on, hashable); the
    turn's reward is the sum of its token rewards and its advantage covers its response tokens.
    """
    alg = cfg.algorithm
    rewards_ = batch.batch[_rewards_key(batch)]
    mask = batch.batch["response_mask"]
    if alg.adv_estimator == "gigpo":
        missing = [k for k in GIGPO_KEYS if k not in batch.non_tensor_batch]
        if missing:
            raise ValueError(f"adv_estimator=gigpo needs the non-tensor keys {missing} in the batch (one row per turn)")
        nt = batch.non_tensor_batch
        step_adv = gigpo_advantages(
            rewards_.sum(-1).float().cpu(),
            list(nt["uid"]),
            list(nt["traj_uid"]),
            torch.as_tensor(np.asarray(nt["step_index"], dtype=np.int64)),
            [a.item() if isinstance(a, np.generic) else a for a in nt["anchor_obs"]],
            gamma=alg.gamma,
            step_advantage_w=alg.step_advantage_w,
            mode=alg.gigpo_mode,
        )
        adv = step_adv.to(mask.device, mask.dtype)[:, None] * mask
    else:
        adv = grpo_advantages(
            rewards_, mask, batch.non_tensor_batch["uid"], norm_adv_by_std_in_grpo=alg.norm_adv_by_std_in_grpo
        )
    batch.batch["advantages"] = adv
    batch.batch["returns"] = adv


def admit(buffer: TrajectoryReplayBuffer, batch: DataProto, step: int) -> int:
    """Offers this step's trajectories to the replay buffer (after the update: replay at t uses data <= t - 1)."""
    mask = batch.batch["response_mask"]
    tensors = {k: batch.batch[k] for k in REPLAY_KEYS if k in batch.batch.keys()}
    return buffer.add(
        step,
        tensors,
        batch.batch[_rewards_key(batch)].sum(-1),
        per_response(batch.batch["advantages"], mask),
        list(batch.non_tensor_batch["uid"]),
        mask,
    )


def replay_batch(buffer: TrajectoryReplayBuffer, step: int, cfg: SpearConfig) -> tuple[DataProto | None, dict]:
    """Drops stale entries and, when the buffer triggers, returns the batch to replay once: the stored tensors
    (with the old log-probs of collection time) and advantages recalibrated and scaled by ``w_sil(t)``."""
    actor = cfg.actor_rollout_ref.actor
    dropped = buffer.drop_stale(step)
    sample = buffer.sample()
    weight = replay_loss_weight(step, actor.replay_loss_coef, actor.max_replay_loss_steps)
    metrics = {
        "replay/dropped_stale": float(dropped),
        "replay/buffer_size": float(len(buffer)),
        "replay/weight": weight,
        "replay/events": float(buffer.replay_events),
    }
    if sample is None:
        return None, metrics
    tensors = dict(sample["tensors"])
    mask = tensors["response_mask"]
    tensors["advantages"] = sample["advantages"].to(mask.dtype)[:, None] * mask * weight
    tensors["returns"] = tensors["advantages"]
    metrics["replay/batch_size"] = float(len(sample["rewards"]))
    metrics["replay/advantage_mean"] = float(sample["advantages"].mean())
    replay = DataProto.from_dict(
        tensors=tensors,
        non_tensors={"uid": np.array(sample["group_ids"], dtype=object)},
        meta_info={"spear_replay": True},
    )
    return replay, metrics
