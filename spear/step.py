"""One SPEAR step, written once: what the slim trainer and the verl recipe both run around their model updates.

Both trainers are adapters: they roll out, turn their batch into a :class:`StepBatch`, and call

1. :meth:`SpearStep.prepare` (rewards + tool-call bonus, Dr.BoT response filters, the rollout std filter as row
   removal, advantages) -> the rows to train on;
2. their own forward for the old (and reference) log-probs of those rows;
3. :meth:`SpearStep.replay` -> the replay batch of this step (or None) and ``w_sil(t)``;
4. their own update: on-policy mini-batches, then the replay batch, each over :func:`minibatches` and with
   :func:`update_loss` (the ``*_replay`` loss parameters and ``w_sil(t)`` for replay);
5. :meth:`SpearStep.admit` -> the buffer admits this step's good trajectories (replay at ``t`` uses data ``<= t-1``).

Row tensors use one layout (``ROW_KEYS``): prompts left-padded with ``prompt_mask``, responses right-padded with
``response_attn`` (every response token, the environment's included) and ``response_mask`` (the loss mask:
assistant tokens of unfiltered rows), and ``old_log_probs``. The replay buffer stores exactly ``REPLAY_KEYS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

import spear_kernels as sk

from .advantages import gigpo_advantages
from .config import ConfigError, SpearConfig
from .filters import apply_response_filters, overlong, repetitive, rollout_std_filter, unreadable
from .losses import actor_loss
from .replay import TrajectoryReplayBuffer
from .rewards import add_to_last_token, toolcall_bonus
from .schedules import replay_loss_weight, toolcall_reward_factor

ROW_KEYS = ("prompts", "prompt_mask", "responses", "response_attn", "response_mask")
REPLAY_KEYS = (*ROW_KEYS, "old_log_probs")

# one assistant turn of a row, for GiGPO: [start, end) of its tokens, its step index within the trajectory,
# the observation it acted on (the anchor state), and the environment's reward for it
Turn = tuple[int, int, int, Any, float]


@dataclass
class StepBatch:
    """The rows of one step: tensors (``ROW_KEYS`` and more, ``[B, ...]``) and what the algorithm reads per row.

    ``outcome [B]``: the environment's reward; ``tool_turns [B]``: assistant turns with a tool call or action
    (``None`` when the rollout does not report it); ``incomplete`` / ``truncated [B]`` bool (``None``: not
    reported); ``texts``: the decoded responses (for the unreadable filter); ``turns``: each row's assistant turns
    (GiGPO); ``traj_ids``: the trajectory of each row (default: one row per trajectory). ``index [B]`` maps rows
    back to the adapter's own batch (``select`` keeps it).
    """

    tensors: dict[str, torch.Tensor]
    uids: list
    outcome: torch.Tensor
    tool_turns: torch.Tensor | None = None
    incomplete: torch.Tensor | None = None
    truncated: torch.Tensor | None = None
    texts: list[str] | None = None
    turns: list[list[Turn]] | None = None
    traj_ids: list | None = None
    index: torch.Tensor | None = None
    # filled by SpearStep.prepare
    token_rewards: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    traj_adv: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.tensors = dict(self.tensors)  # the step replaces entries (the loss mask): never the caller's dict
        b = len(self.uids)
        if self.index is None:
            self.index = torch.arange(b)
        for name, t in self.tensors.items():
            if t.shape[0] != b:
                raise ValueError(f"StepBatch tensor {name!r} has {t.shape[0]} rows, the batch has {b}")
        for name in ("outcome", "tool_turns", "incomplete", "truncated", "texts", "turns", "traj_ids"):
            value = getattr(self, name)
            if value is not None and len(value) != b:
                raise ValueError(f"StepBatch.{name} has {len(value)} entries, the batch has {b} rows")

    def __len__(self) -> int:
        return len(self.uids)

    def select(self, rows: torch.Tensor | Sequence[int]) -> StepBatch:
        """The batch restricted to ``rows`` (in that order); every per-row field follows."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        idx = rows.tolist()

        def pick(value):
            if value is None:
                return None
            if isinstance(value, torch.Tensor):
                return value[rows]
            return [value[i] for i in idx]

        return replace(
            self,
            tensors={k: v[rows] for k, v in self.tensors.items()},
            uids=pick(self.uids),
            outcome=pick(self.outcome),
            tool_turns=pick(self.tool_turns),
            incomplete=pick(self.incomplete),
            truncated=pick(self.truncated),
            texts=pick(self.texts),
            turns=pick(self.turns),
            traj_ids=pick(self.traj_ids),
            index=pick(self.index),
            token_rewards=pick(self.token_rewards),
            scores=pick(self.scores),
            traj_adv=pick(self.traj_adv),
            extras=dict(self.extras),
        )


def _bool(values) -> torch.Tensor:
    return torch.as_tensor([bool(v) for v in values], dtype=torch.bool)


class SpearStep:
    """SPEAR's additions to an RL step, with the replay buffer. ``seed`` seeds the buffer's sampler."""

    def __init__(self, cfg: SpearConfig, *, seed: int = 0):
        self.cfg = cfg
        self.buffer = TrajectoryReplayBuffer.from_config(cfg, seed=seed)

    # ---- 2, 3, 5: rewards, filters, advantages ------------------------------------------------------

    def prepare(self, batch: StepBatch, step: int, *, max_response_length: int) -> tuple[StepBatch, dict]:
        """Shapes the rewards, filters, and computes advantages; returns the kept rows and the metrics.

        - token rewards: the outcome plus the tool-call bonus at each row's last assistant token;
        - Dr.BoT response filters zero the loss mask of flagged rows (they stay in their group's statistics);
        - the rollout std filter removes the rows of the groups it drops;
        - ``tensors["advantages"] [B, L]``: GRPO / Dr.GRPO (or GiGPO per turn) over the loss mask, and
          ``traj_adv [B]``: each row's trajectory GRPO advantage (what the buffer's admission reads).
        """
        alg, r = self.cfg.algorithm, self.cfg.actor_rollout_ref.rollout
        mask = batch.tensors["response_mask"].float()
        n = len(batch)
        metrics: dict[str, float] = {}
        # rewards
        factor = toolcall_reward_factor(step, alg.use_toolcall_reward, alg.max_toolcall_steps)
        if batch.tool_turns is None:
            if factor != 0:
                raise ConfigError(
                    "algorithm.use_toolcall_reward is on but the rollout does not report tool-call turns per "
                    "trajectory (non-tensor 'tool_call_turns'): use the 'spear_env' agent loop or add it to yours, "
                    "or set algorithm.use_toolcall_reward=none"
                )
            bonus = torch.zeros(n)
        else:
            bonus = toolcall_bonus(
                batch.tool_turns.tolist(),
                factor,
                variant=alg.toolcall_reward_variant,
                success=batch.outcome.float().cpu() > 0,
            )
        outcome = batch.outcome.float().cpu()
        token_rewards = add_to_last_token(torch.zeros_like(mask), mask, outcome + bonus)
        scores = token_rewards.sum(-1)
        batch.token_rewards, batch.scores = token_rewards, scores
        metrics.update(
            {
                "toolcall/factor": factor,
                "toolcall/bonus_mean": float(bonus.mean()) if n else 0.0,
                "train/score": float(scores.mean()) if n else 0.0,
            }
        )
        # Dr.BoT response filters: the loss mask
        flags: dict[str, torch.Tensor] = {}
        if alg.filter_overlong_responses:
            flags["overlong"] = overlong(batch.tensors["response_attn"], max_response_length)
            if batch.truncated is not None:
                flags["overlong"] |= batch.truncated.bool()
        if alg.filter_incomplete_responses:
            if batch.incomplete is None:
                raise ConfigError(
                    "algorithm.filter_incomplete_responses is on but the rollout does not report which responses "
                    "are incomplete (non-tensor 'incomplete'): use the 'spear_env' agent loop or add it to yours, "
                    "or set algorithm.filter_incomplete_responses=false"
                )
            flags["incomplete"] = batch.incomplete.bool()
        if alg.filter_repetitive_responses:
            flags["repetitive"] = repetitive(batch.tensors["responses"], mask)
        if alg.filter_unreadable_responses:
            if batch.texts is None:
                raise ValueError("the unreadable filter needs the decoded responses (StepBatch.texts)")
            flags["unreadable"] = unreadable(batch.texts)
        loss_mask, counts = apply_response_filters(mask, flags)
        batch.tensors["response_mask"] = loss_mask
        metrics.update({k: float(v) for k, v in counts.items()})
        # the rollout std filter: rows of dropped groups leave the batch
        keep, fstats = rollout_std_filter(scores, batch.uids, r.rollout_filter_ratio)
        metrics.update(fstats)
        kept = batch.select(torch.nonzero(keep).squeeze(1))
        metrics["rollout_filter/rows_kept"] = float(len(kept))
        # advantages
        kept.traj_adv = trajectory_advantages(kept, norm_by_std=alg.norm_adv_by_std_in_grpo)
        if len(kept):
            _, std, _, _ = sk.group_stats(kept.scores.float(), list(kept.uids))
            metrics["advantage/abs_mean"] = float(kept.traj_adv.abs().mean())
            metrics["advantage/signal_groups"] = float((std > 0).float().mean())  # groups whose scores differ
        kept.tensors["advantages"] = self.token_advantages(kept)
        return kept, metrics

    def token_advantages(self, batch: StepBatch) -> torch.Tensor:
        """``[B, L]`` advantages over the loss mask: the trajectory's GRPO advantage (``grpo``), or per turn
        (``gigpo``: episode term + ``step_advantage_w`` x step term over anchor-state groups)."""
        alg = self.cfg.algorithm
        loss_mask = batch.tensors["response_mask"]
        if alg.adv_estimator == "grpo":
            return batch.traj_adv.to(loss_mask)[:, None] * loss_mask
        if batch.turns is None:
            raise ConfigError(
                "algorithm.adv_estimator=gigpo needs each row's turns (StepBatch.turns; the 'spear_env' agent loop "
                "reports them as 'turn_spans', 'turn_obs' and 'turn_rewards')"
            )
        bonus = batch.scores - batch.outcome.float().cpu()
        traj_ids = batch.traj_ids if batch.traj_ids is not None else list(range(len(batch)))
        step_rewards, groups, trajs, index, anchors, spans = [], [], [], [], [], []
        for i, turns in enumerate(batch.turns):
            for j, (start, end, step_index, anchor, reward) in enumerate(turns):
                last = j == len(turns) - 1
                step_rewards.append(float(reward) + (float(bonus[i]) if last else 0.0))
                groups.append(batch.uids[i])
                trajs.append(traj_ids[i])
                index.append(int(step_index))
                anchors.append(anchor)
                spans.append((i, start, end))
        adv = torch.zeros_like(loss_mask)
        if not spans:
            return adv
        adv_steps = gigpo_advantages(
            torch.tensor(step_rewards),
            groups,
            trajs,
            torch.tensor(index),
            anchors,
            gamma=alg.gamma,
            step_advantage_w=alg.step_advantage_w,
            mode=alg.gigpo_mode,
        )
        for (i, start, end), a in zip(spans, adv_steps.tolist(), strict=True):
            adv[i, start:end] = a
        return adv * loss_mask

    # ---- 7: the replay batch ----------------------------------------------------------------------

    def replay(self, step: int) -> tuple[dict[str, torch.Tensor] | None, float, dict]:
        """Drops stale entries and, when the buffer triggers, returns the rows to replay once (``REPLAY_KEYS`` with
        the old log-probs stored at collection time, and ``advantages`` recalibrated), with ``w_sil(step)``."""
        a = self.cfg.actor_rollout_ref.actor
        metrics: dict[str, float] = {}
        if not a.enable_trajectory_replay:
            return None, 0.0, metrics
        metrics["replay/dropped_stale"] = float(self.buffer.drop_stale(step))
        weight = replay_loss_weight(step, a.replay_loss_coef, a.max_replay_loss_steps)
        sample = self.buffer.sample()
        if sample is None:
            return None, weight, metrics
        tensors = dict(sample["tensors"])
        tensors["advantages"] = sample["advantages"].to(tensors["response_mask"])[:, None] * tensors["response_mask"]
        metrics.update(
            {
                "replay/weight": weight,
                "replay/batch_size": float(len(sample["rewards"])),
                "replay/advantage_mean": float(sample["advantages"].mean()),
            }
        )
        return tensors, weight, metrics

    # ---- 8: admission -----------------------------------------------------------------------------

    def admit(self, batch: StepBatch, step: int) -> dict[str, float]:
        """Offers the kept rows (with their ``old_log_probs``) to the buffer; returns the buffer metrics."""
        if not self.cfg.actor_rollout_ref.actor.enable_trajectory_replay:
            return {}
        metrics = {}
        if len(batch):
            missing = [k for k in REPLAY_KEYS if k not in batch.tensors]
            if missing:
                raise KeyError(f"admission needs the row tensors {missing}")
            tensors = {k: batch.tensors[k] for k in REPLAY_KEYS}
            metrics["replay/admitted"] = float(
                self.buffer.add(step, tensors, batch.scores, batch.traj_adv, batch.uids, batch.tensors["response_mask"])
            )
        if self.buffer.staleness == "newest_capped":
            metrics["replay/dropped_stale"] = float(self.buffer.dropped_before_add)
        metrics["replay/buffer_size"] = float(len(self.buffer))
        metrics["replay/events"] = float(self.buffer.replay_events)
        return metrics


def trajectory_advantages(batch: StepBatch, *, norm_by_std: bool) -> torch.Tensor:
    """``[B]``: the GRPO advantage of each row's trajectory score within its ``uid`` group (trajectories that span
    several rows, ``traj_ids``, are scored once: the sum of their rows' scores)."""
    if not len(batch):
        return torch.zeros(0)
    if batch.traj_ids is None:
        return sk.group_advantages(batch.scores, batch.uids, norm_by_std=norm_by_std)
    order: dict[Any, int] = {}
    for t in batch.traj_ids:
        order.setdefault(t, len(order))
    row_traj = torch.tensor([order[t] for t in batch.traj_ids])
    traj_scores = torch.zeros(len(order)).index_add_(0, row_traj, batch.scores.float())
    traj_groups = [None] * len(order)
    for t, u in zip(batch.traj_ids, batch.uids, strict=True):
        traj_groups[order[t]] = u
    return sk.group_advantages(traj_scores, traj_groups, norm_by_std=norm_by_std)[row_traj]


# ---- the update: mini-batches and the loss -----------------------------------------------------------


def minibatches(n_rows: int, mini_batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled partition of ``n_rows`` rows into mini-batches of ``mini_batch_size`` (the last may be shorter).

    Every PPO epoch iterates the same partition (as verl's worker does with its dataloader unshuffled)."""
    order = torch.randperm(n_rows, generator=generator)
    return [order[i : i + mini_batch_size] for i in range(0, n_rows, mini_batch_size)]


def normalisers(loss_mask: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the loss of a mini-batch divides by: its valid tokens (``token-mean``) and its non-empty rows
    (``seq-mean-*``): the rows a filter emptied count in neither."""
    m = loss_mask[rows]
    return {"batch_num_tokens": m.sum(), "global_batch_size": (m.sum(-1) > 0).sum()}


def update_loss(
    cfg: SpearConfig,
    log_prob: torch.Tensor,
    entropy: torch.Tensor | None,
    rows: dict[str, torch.Tensor],
    *,
    replay: bool,
    weight: float = 1.0,
    norms: dict[str, Any],
    dp_size: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch (``rows``: ``old_log_probs``, ``advantages``, ``response_mask``, and
    ``ref_log_probs`` when ``use_kl_loss``): :func:`spear.losses.actor_loss` normalised by the mini-batch's
    ``norms``, times ``weight`` (``w_sil(t)`` for replay). Replay uses the ``*_replay`` loss parameters and has no
    KL term (it is off-policy data by design)."""
    a = cfg.actor_rollout_ref.actor
    info = {
        "dp_size": dp_size,
        "batch_num_tokens": norms["batch_num_tokens"],
        "global_batch_size": norms["global_batch_size"],
        "loss_scale_factor": float(cfg.actor_rollout_ref.rollout.response_length),
    }
    loss, metrics = actor_loss(
        log_prob,
        entropy,
        rows["old_log_probs"],
        rows["advantages"],
        rows["response_mask"],
        a,
        replay=replay,
        ref_log_prob=None if replay else rows.get("ref_log_probs"),
        generator=generator,
        global_batch_info=info,
    )
    if weight != 1.0:
        loss = loss * weight
    return loss, metrics
