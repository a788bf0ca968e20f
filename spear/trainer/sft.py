"""Cold-start SFT: next-token cross-entropy on the expert's assistant tokens, and when a saved SFT is reusable."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .._files import remove_orphaned_temporaries
from ..config import ConfigError, SpearConfig, UserError, env_kwargs, to_dict
from ..envs import env_class, expert_transcripts
from ..episodes import Episode, StepRow
from .forward import response_logprobs
from .models import default_model_path, load_configured_policy, set_threads
from .rollout import collate


def expert_episodes(cfg: SpearConfig, tokenizer, count: int) -> list[Episode]:
    """Expert trajectories on training seeds, tokenised piece by piece like rollouts (assistant turns masked in)."""
    k = cfg.env.num_train_tasks
    seeds = [i % k for i in range(count)] if k else list(range(count))
    unique = sorted(set(seeds))
    by_seed = dict(zip(unique, expert_transcripts(cfg.env.name, unique, env_kwargs(cfg)), strict=True))
    per_step = bool(getattr(env_class(cfg.env.name), "per_step_prompts", False))
    r_len, p_len = cfg.actor_rollout_ref.rollout.response_length, cfg.data.max_prompt_length
    tokenized = {}
    for seed, pieces in by_seed.items():  # once per distinct task; repeated seeds share the episode
        ids = [tokenizer.encode(text, add_special_tokens=False) for text, _ in pieces]
        ep = Episode(seed=seed, uid=seed, prompt_ids=ids[0])
        if per_step:  # one row per step: the step's prompt, the expert's action
            ep.steps = [
                StepRow(ids[j - 1], ids[j], [0.0] * len(ids[j]), pieces[j - 1][0])
                for j in range(1, len(pieces))
                if pieces[j][1]
            ]
            sizes = [(len(s.prompt_ids), len(s.response_ids)) for s in ep.steps]
        else:
            for piece, (_, is_assistant) in zip(ids[1:], pieces[1:], strict=True):
                ep.response_ids += piece
                ep.response_mask += [int(is_assistant)] * len(piece)
            sizes = [(len(ep.prompt_ids), len(ep.response_ids))]
        if any(p > p_len or r > r_len for p, r in sizes):
            p, r = max(p for p, _ in sizes), max(r for _, r in sizes)
            raise ConfigError(
                f"expert episode of seed {seed} does not fit data.max_prompt_length / rollout.response_length "
                f"({p} / {r} tokens)"
            )
        tokenized[seed] = ep
    return [tokenized[seed] for seed in seeds]


def run_sft(
    cfg: SpearConfig, output_dir: str | Path, *, model_path: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Cold-start SFT: next-token cross-entropy on the expert's assistant tokens; saves the model to ``output_dir``.
    With ``sft.direct_steps``, a second stage on transcripts where the expert answers at once (no tool call).

    Returns ``{"loss_first", "loss_last", "steps", "output", ...}`` and writes them to ``output_dir/spear_sft.json``.
    """
    s = cfg.sft
    out = check_sft_output(output_dir)
    set_threads(cfg)
    path = model_path or cfg.actor_rollout_ref.model.path or default_model_path(cfg.env.name)
    model, tokenizer = load_configured_policy(cfg, path)
    model.train()
    episodes = expert_episodes(cfg, tokenizer, s.num_examples)
    r = cfg.actor_rollout_ref.rollout
    data = collate(
        episodes,
        pad_id=tokenizer.pad_token_id,
        max_prompt_length=cfg.data.max_prompt_length,
        response_length=r.response_length,
    )
    generator = torch.Generator().manual_seed(cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)
    losses = _sft_loop(model, data, s.steps, s.lr, cfg, generator, desc="sft", progress=progress)
    direct_losses = []
    if s.direct_steps:
        # the second stage: the expert answers every task at once, without the tool
        direct_cfg = copy.deepcopy(cfg)
        direct_cfg.env.kwargs = {**direct_cfg.env.kwargs, "expert_direct_prob": 1.0}
        direct = collate(
            expert_episodes(direct_cfg, tokenizer, s.num_examples),
            pad_id=tokenizer.pad_token_id,
            max_prompt_length=cfg.data.max_prompt_length,
            response_length=r.response_length,
        )
        direct_losses = _sft_loop(
            model, direct, s.direct_steps, s.direct_lr, cfg, generator, desc="sft (direct answers)", progress=progress
        )
    remove_orphaned_temporaries(out.parent, f"{out.name}.tmp*")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    summary = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": s.steps,
        "direct_steps": s.direct_steps,
        "direct_loss_last": direct_losses[-1] if direct_losses else None,
        "examples": len(episodes),
        "base_model": str(path),
        "output": str(out),
        "key": _sft_key(cfg, path),
    }
    (tmp / SFT_MARKER).write_text(json.dumps(summary, indent=1))
    if out.exists():
        check_sft_output(out)  # still a replaceable SFT output (nothing else appeared there meanwhile)
        shutil.rmtree(out)
    os.replace(tmp, out)
    return summary


SFT_MARKER = "spear_sft.json"


def check_sft_output(output_dir: str | Path) -> Path:
    """``output_dir`` as the SFT's destination: new, empty, or an earlier SFT output of ours (it holds
    ``spear_sft.json``), which is replaced. Anything else, such as a directory of other files, a previous run or a
    parent of the current directory, is refused before any work: the SFT never deletes what it did not write."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"the SFT output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / SFT_MARKER).is_file():
        raise UserError(
            f"refusing to write the SFT model into {out}: it is not empty and not an SFT output of spear (no "
            f"{SFT_MARKER}); choose a new or empty directory"
        )
    if out.is_dir() and Path.cwd().resolve().is_relative_to(out.resolve()):
        raise UserError(f"refusing to replace {out}: it holds the current directory")
    return out


def _sft_loop(model, data: dict, steps: int, lr: float, cfg: SpearConfig, generator, *, desc: str, progress: bool):
    """``steps`` AdamW steps of next-token cross-entropy on the assistant tokens of ``data`` (shuffled batches,
    linear warm-up over 5% of the steps then cosine decay to 0); returns the losses."""
    from tqdm.auto import tqdm

    s = cfg.sft
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=s.weight_decay)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    n = data["responses"].shape[0]
    losses = []
    order = torch.randperm(n, generator=generator)
    cursor = 0
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        if cursor + s.batch_size > len(order):
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor : cursor + s.batch_size]
        cursor += s.batch_size
        batch = {k: v[idx] for k, v in data.items()}
        logp, _ = response_logprobs(model, batch, temperature=1.0, return_entropy=False)
        mask = batch["response_mask"].to(logp.device)
        loss = -(logp * mask).sum() / mask.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.actor_rollout_ref.actor.optim.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def _sft_key(cfg: SpearConfig, base_model) -> dict:
    """What a cold-start SFT model depends on: reused only when all of it matches."""
    d = to_dict(cfg)
    return {
        "base_model": str(base_model),
        "sft": d["sft"],
        "env": d["env"],
        "data": d["data"],
        "max_turns": cfg.actor_rollout_ref.rollout.max_turns,
        "response_length": cfg.actor_rollout_ref.rollout.response_length,
        "seed": cfg.trainer.seed,
    }


def sft_is_current(cfg: SpearConfig, base_model, sft_dir: str | Path) -> bool:
    """Whether ``sft_dir`` holds the SFT of ``base_model`` with exactly these settings (so it can be reused)."""
    try:
        saved = json.loads((Path(sft_dir) / SFT_MARKER).read_text()).get("key")
    except (OSError, ValueError):
        return False
    return saved == _sft_key(cfg, base_model)
