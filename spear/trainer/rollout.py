"""The slim trainer's rollouts: a batch of episodes on the configured engine (:func:`spear.episodes.run_episodes`),
collated into row tensors, and the shared step's :class:`~spear.step.StepBatch` built from them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config import ConfigError, SpearConfig, env_kwargs, env_kwargs_error
from ..envs import make_env
from ..episodes import Episode, run_episodes
from ..step import StepBatch, Turn, turns_of


def rollout(engine, tokenizer, envs: Sequence[Any], seeds: Sequence[int], uids: Sequence[Any] | None = None, **kwargs):
    """:func:`spear.episodes.run_episodes` on a rollout engine, or on a model (decoded as the ``hf`` engine)."""
    return run_episodes(as_engine(engine, tokenizer), tokenizer, envs, seeds, uids, **kwargs)


def as_engine(engine_or_model, tokenizer):
    """A rollout engine as is; a model as the ``hf`` engine on it."""
    if not isinstance(engine_or_model, torch.nn.Module):
        return engine_or_model
    from .engines import HFEngine

    return HFEngine(engine_or_model, tokenizer)


def training_rows(ep: Episode) -> list[tuple[list[int], list[int], list[int], list[float]]]:
    """The rows an episode trains as ``(prompt_ids, response_ids, response_mask, logprobs)``: the whole trajectory,
    or one row per step of a per-step episode (verl-agent's layout)."""
    if ep.steps is None:
        return [(ep.prompt_ids, ep.response_ids, ep.response_mask, ep.response_logprobs)]
    return [(s.prompt_ids, s.response_ids, [1] * len(s.response_ids), s.logprobs) for s in ep.steps]


def collate(episodes: Sequence[Episode], *, pad_id: int, max_prompt_length: int, response_length: int) -> dict:
    """Fixed-width tensors, one row per :func:`training_rows` row: prompts left-padded to ``max_prompt_length``,
    responses right-padded to ``response_length`` (``prompts``, ``prompt_mask``, ``responses``, ``response_attn``,
    ``response_mask``), and ``rollout_log_probs``: the engine's log-probs of the sampled tokens (0 elsewhere, and for
    episodes without them)."""
    rows = [row for ep in episodes for row in training_rows(ep)]
    b = len(rows)
    prompts = torch.full((b, max_prompt_length), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, max_prompt_length), dtype=torch.long)
    responses = torch.full((b, response_length), pad_id, dtype=torch.long)
    response_attn = torch.zeros((b, response_length), dtype=torch.long)
    response_mask = torch.zeros((b, response_length), dtype=torch.float32)
    rollout_log_probs = torch.zeros((b, response_length), dtype=torch.float32)
    for i, (prompt_ids, response_ids, mask, logprobs) in enumerate(rows):
        p, r = len(prompt_ids), len(response_ids)
        if p > max_prompt_length or r > response_length:
            raise ConfigError(
                f"row {i} does not fit: prompt {p} > {max_prompt_length} or response {r} > {response_length}"
            )
        prompts[i, max_prompt_length - p :] = torch.tensor(prompt_ids, dtype=torch.long)
        prompt_mask[i, max_prompt_length - p :] = 1
        if r:
            responses[i, :r] = torch.tensor(response_ids, dtype=torch.long)
            response_attn[i, :r] = 1
            response_mask[i, :r] = torch.tensor(mask, dtype=torch.float32)
            if len(logprobs) == r:
                rollout_log_probs[i, :r] = torch.tensor(logprobs, dtype=torch.float32)
    return {
        "prompts": prompts,
        "prompt_mask": prompt_mask,
        "responses": responses,
        "response_attn": response_attn,
        "response_mask": response_mask,
        "rollout_log_probs": rollout_log_probs,
    }


# ---- the trainer's rollouts ------------------------------------------------------------------


def make_envs(cfg: SpearConfig, count: int, *, unseen: bool = False) -> list:
    """``count`` environments of ``env.name`` (``unseen``: with ``env.unseen_kwargs`` over ``env.kwargs``)."""
    try:
        return [make_env(cfg.env.name, **env_kwargs(cfg, unseen=unseen)) for _ in range(count)]
    except (TypeError, ValueError) as err:  # an unknown keyword, or a value the environment refuses
        raise env_kwargs_error(cfg, err, unseen=unseen) from None


def run_rollout(engine, tokenizer, cfg: SpearConfig, envs, seeds, uids=None, *, temperature, top_p, generator):
    r = cfg.actor_rollout_ref.rollout
    return rollout(
        engine,
        tokenizer,
        envs[: len(seeds)],
        seeds,
        uids,
        max_turns=r.max_turns,
        max_turn_tokens=r.max_turn_tokens,
        response_length=r.response_length,
        max_prompt_length=cfg.data.max_prompt_length,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
        fail_reward=envs[0].fail_reward,
    )


def step_batch_from_episodes(episodes: Sequence[Episode], tensors: dict[str, torch.Tensor]) -> StepBatch:
    """The slim trainer's episodes (and their :func:`collate` tensors) as the shared step's :class:`StepBatch`.

    A per-step episode gives one row per step (verl-agent's layout): each carries the episode's reward, length and
    completion, its own step's validity, reward and anchor observation, and the episode as its trajectory."""
    if all(ep.steps is None for ep in episodes):
        return StepBatch(
            tensors=tensors,
            uids=[ep.uid for ep in episodes],
            outcome=torch.tensor([ep.reward for ep in episodes], dtype=torch.float32),
            tool_turns=torch.tensor([ep.tool_turns for ep in episodes], dtype=torch.long),
            invalid_actions=torch.tensor([ep.turn_valid.count(False) for ep in episodes], dtype=torch.long),
            incomplete=torch.tensor([not ep.complete for ep in episodes], dtype=torch.bool),
            truncated=torch.tensor([ep.truncated for ep in episodes], dtype=torch.bool),
            texts=[ep.text for ep in episodes],
            turns=[turns_of(ep.turn_spans, ep.turn_obs, ep.turn_rewards, ep.turn_valid) for ep in episodes],
        )
    if any(ep.steps is None for ep in episodes):
        raise ValueError("a batch mixes per-step and whole-trajectory episodes")
    uids, outcome, tool_turns, invalid, incomplete, truncated, texts, turns, traj_ids = ([] for _ in range(9))
    for t, ep in enumerate(episodes):
        for j, row in enumerate(ep.steps or ()):
            uids.append(ep.uid)
            traj_ids.append(t)
            outcome.append(ep.reward)
            tool_turns.append(ep.tool_turns)
            invalid.append(int(not row.valid))
            incomplete.append(not ep.complete)
            truncated.append(ep.truncated)
            texts.append(row.text)
            turns.append([Turn(0, len(row.response_ids), j, row.observation, row.reward, row.valid)])
    return StepBatch(
        tensors=tensors,
        uids=uids,
        outcome=torch.tensor(outcome, dtype=torch.float32),
        tool_turns=torch.tensor(tool_turns, dtype=torch.long),
        invalid_actions=torch.tensor(invalid, dtype=torch.long),
        incomplete=torch.tensor(incomplete, dtype=torch.bool),
        truncated=torch.tensor(truncated, dtype=torch.bool),
        texts=texts,
        turns=turns,
        traj_ids=traj_ids,
    )
