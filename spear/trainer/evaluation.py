"""Evaluation on the held-out tasks, and the episode summaries logged every step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import SpearConfig
from ..episodes import Episode
from .engines import engine_device
from .rollout import make_envs, run_rollout


def summarize(episodes: Sequence[Episode], prefix: str) -> dict[str, float]:
    """Means over the episodes; ``<prefix>/success/<task type>`` for environments that report task types."""
    n = max(len(episodes), 1)
    by_task: dict[str, list[bool]] = {}
    for ep in episodes:
        if ep.task:
            by_task.setdefault(ep.task, []).append(ep.won)
    per_task = {f"{prefix}/success/{task}": sum(won) / len(won) for task, won in sorted(by_task.items())}
    return per_task | {
        f"{prefix}/success": sum(ep.won for ep in episodes) / n,
        f"{prefix}/reward": sum(ep.reward for ep in episodes) / n,
        f"{prefix}/tool_turns": sum(ep.tool_turns for ep in episodes) / n,
        f"{prefix}/turns": sum(len(ep.turn_spans) for ep in episodes) / n,
        f"{prefix}/response_tokens": sum(sum(ep.response_mask) for ep in episodes) / n,
    }


@torch.no_grad()
def evaluate(
    engine, tokenizer, cfg: SpearConfig, envs=None, *, unseen_envs=None, batch_size: int = 64
) -> dict[str, float]:
    """Success rate and friends on the held-out seeds ``[env.eval_seed, env.eval_seed + env.num_eval_tasks)``
    (``val/*``) and, with ``env.unseen_eval_tasks``, on as many seeds of the environment built with
    ``env.unseen_kwargs`` (``val_unseen/*``), decoding at ``rollout.val_temperature`` (0: greedy) with a fixed
    sampler seed per set. ``engine``: a rollout engine or a model (see :func:`spear.trainer.rollout.rollout`);
    ``envs`` / ``unseen_envs``: environments to reuse (made here when not given)."""
    sets = [("val", cfg.env.num_eval_tasks, envs, False)]
    if cfg.env.unseen_eval_tasks:
        sets.append(("val_unseen", cfg.env.unseen_eval_tasks, unseen_envs, True))
    out: dict[str, float] = {}
    for prefix, count, pool, unseen in sets:
        seeds = list(range(cfg.env.eval_seed, cfg.env.eval_seed + count))
        pool = pool if pool is not None else make_envs(cfg, min(batch_size, len(seeds)), unseen=unseen)
        generator = torch.Generator(device=engine_device(engine)).manual_seed(cfg.trainer.seed + 7919)
        episodes: list[Episode] = []
        for start in range(0, len(seeds), len(pool)):
            chunk = seeds[start : start + len(pool)]
            episodes += run_rollout(
                engine,
                tokenizer,
                cfg,
                pool,
                chunk,
                temperature=cfg.actor_rollout_ref.rollout.val_temperature,
                top_p=1.0,
                generator=generator,
            )
        out |= summarize(episodes, prefix)
    return out
