"""The slim single-process SPEAR trainer: rollouts, rewards, Dr.BoT filters, advantages, PPO-style updates,
self-imitation replay, checkpoints and evaluation, on one machine with no Ray and no GPU.

One step (the order of :mod:`spear.step`):

1. ``data.train_batch_size`` tasks, each rolled out ``rollout.n`` times (one ``uid`` per group);
2. outcome reward + the intrinsic tool-call reward at the last assistant token;
3. Dr.BoT response filters (loss mask) and the rollout std filter (drops groups);
4. old log-probs with the current policy (and reference log-probs when ``use_kl_loss``);
5. GRPO / Dr.GRPO or GiGPO advantages;
6. the on-policy update over mini- and micro-batches (AdamW, gradient clipping);
7. the self-imitation update when the replay buffer triggers (stored old log-probs, ``w_sil(t)``);
8. the buffer admits this step's good trajectories.

Log-probs and entropies come from ``spear_kernels.linear_logprobs_entropy``
(see :func:`spear.rollout.response_logprobs`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, SpearConfig, UserError, to_dict
from .envs import make_env
from .models import default_model_path, expert_transcripts, load_policy
from .rollout import Episode, collate, response_logprobs, rollout
from .step import SpearStep, StepBatch, minibatches, normalisers, update_loss

STATE_FILE = "trainer_state.pt"
CHECKPOINT_VERSION = 1
UPDATE_KEYS = ("old_log_probs", "advantages", "response_mask", "ref_log_probs")
TIMING_PREFIXES = ("time/", "perf/")  # wall-clock metrics: the only ones that differ between identical runs


# ---- environments and evaluation ----------------------------------------------------------------


def env_kwargs(cfg: SpearConfig) -> dict:
    return {"max_turns": cfg.actor_rollout_ref.rollout.max_turns, **dict(cfg.env.kwargs)}


def make_envs(cfg: SpearConfig, count: int) -> list:
    try:
        return [make_env(cfg.env.name, **env_kwargs(cfg)) for _ in range(count)]
    except TypeError as err:
        raise ConfigError(f"env.kwargs {dict(cfg.env.kwargs)} do not fit environment {cfg.env.name!r}: {err}") from None


def run_rollout(model, tokenizer, cfg: SpearConfig, envs, seeds, uids=None, *, temperature, top_p, generator):
    r = cfg.actor_rollout_ref.rollout
    return rollout(
        model,
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


def summarize(episodes: Sequence[Episode], prefix: str) -> dict[str, float]:
    n = max(len(episodes), 1)
    return {
        f"{prefix}/success": sum(ep.won for ep in episodes) / n,
        f"{prefix}/reward": sum(ep.reward for ep in episodes) / n,
        f"{prefix}/tool_turns": sum(ep.tool_turns for ep in episodes) / n,
        f"{prefix}/turns": sum(len(ep.turn_spans) for ep in episodes) / n,
        f"{prefix}/response_tokens": sum(sum(ep.response_mask) for ep in episodes) / n,
    }


@torch.no_grad()
def evaluate(model, tokenizer, cfg: SpearConfig, envs=None, *, batch_size: int = 64) -> dict[str, float]:
    """Success rate and friends on the held-out seeds ``[env.eval_seed, env.eval_seed + env.num_eval_tasks)``,
    decoding at ``rollout.val_temperature`` (0: greedy) with a fixed sampler seed."""
    seeds = list(range(cfg.env.eval_seed, cfg.env.eval_seed + cfg.env.num_eval_tasks))
    envs = envs if envs is not None else make_envs(cfg, min(batch_size, len(seeds)))
    generator = torch.Generator().manual_seed(cfg.trainer.seed + 7919)
    episodes: list[Episode] = []
    for start in range(0, len(seeds), len(envs)):
        chunk = seeds[start : start + len(envs)]
        episodes += run_rollout(
            model,
            tokenizer,
            cfg,
            envs,
            chunk,
            temperature=cfg.actor_rollout_ref.rollout.val_temperature,
            top_p=1.0,
            generator=generator,
        )
    return summarize(episodes, "val")


def step_batch_of(episodes: Sequence[Episode], tensors: dict[str, torch.Tensor]) -> StepBatch:
    """The slim trainer's episodes (and their collated tensors) as the shared step's :class:`StepBatch`."""
    return StepBatch(
        tensors=tensors,
        uids=[ep.uid for ep in episodes],
        outcome=torch.tensor([ep.reward for ep in episodes], dtype=torch.float32),
        tool_turns=torch.tensor([ep.tool_turns for ep in episodes], dtype=torch.long),
        incomplete=torch.tensor([not ep.complete for ep in episodes], dtype=torch.bool),
        truncated=torch.tensor([ep.truncated for ep in episodes], dtype=torch.bool),
        texts=[ep.text for ep in episodes],
        turns=[turns_of(ep.turn_spans, ep.turn_obs, ep.turn_rewards) for ep in episodes],
    )


def turns_of(spans, observations, rewards) -> list:
    """GiGPO's turn layout of one trajectory: ``(start, end, step_index, observation acted on, reward)``."""
    return [
        (int(s), int(e), j, observations[j] if j < len(observations) else "", float(rewards[j]))
        for j, (s, e) in enumerate(spans)
    ]


# ---- cold-start SFT -----------------------------------------------------------------------------


def expert_episodes(cfg: SpearConfig, tokenizer, count: int) -> list[Episode]:
    """Expert trajectories on training seeds, tokenised piece by piece like rollouts (assistant turns masked in)."""
    k = cfg.env.num_train_tasks
    seeds = [i % k for i in range(count)] if k else list(range(count))
    unique = sorted(set(seeds))
    by_seed = dict(zip(unique, expert_transcripts(cfg.env.name, unique, env_kwargs(cfg)), strict=True))
    tokenized = {}
    for seed, pieces in by_seed.items():  # once per distinct task; repeated seeds share the episode
        ep = Episode(seed=seed, uid=seed, prompt_ids=tokenizer.encode(pieces[0][0], add_special_tokens=False))
        for text, is_assistant in pieces[1:]:
            ids = tokenizer.encode(text, add_special_tokens=False)
            ep.response_ids += ids
            ep.response_mask += [int(is_assistant)] * len(ids)
        too_long = len(ep.response_ids) > cfg.actor_rollout_ref.rollout.response_length
        if len(ep.prompt_ids) > cfg.data.max_prompt_length or too_long:
            raise ConfigError(
                f"expert episode of seed {seed} does not fit data.max_prompt_length / rollout.response_length "
                f"({len(ep.prompt_ids)} / {len(ep.response_ids)} tokens)"
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
    _set_threads(cfg)
    path = model_path or cfg.actor_rollout_ref.model.path or default_model_path(cfg.env.name)
    model, tokenizer = load_policy(path)
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
    out = Path(output_dir)
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
    (tmp / "spear_sft.json").write_text(json.dumps(summary, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return summary


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_orphaned_temporaries(directory: Path, pattern: str) -> None:
    """Deletes ``directory/pattern`` entries named ``...tmp<pid>`` whose writer is dead (a SIGKILL mid-save leaves
    them behind); a live writer's are kept."""
    if not directory.is_dir():
        return
    for path in directory.glob(pattern):
        match = re.search(r"\.tmp(\d+)$", path.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


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
        mask = batch["response_mask"]
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
        saved = json.loads((Path(sft_dir) / "spear_sft.json").read_text()).get("key")
    except (OSError, ValueError):
        return False
    return saved == _sft_key(cfg, base_model)


# ---- metrics ------------------------------------------------------------------------------------


def _complete_records(path: Path) -> list[tuple[str, Any]]:
    """``(line, parsed record)`` for the JSON lines of ``metrics.jsonl``; a last line cut by a kill mid-write is
    dropped (it is repaired, not fatal), a bad line anywhere else is an error naming the file and line."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}: line {i + 1} is not a JSON record") from None
    return out


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the run (the CLI prints it on one line)."""


class DeferredInterrupt:
    """SIGINT / SIGTERM during a training step ask the loop to stop at the next step boundary (the step finishes,
    is logged and checkpointed) instead of stopping mid-step; a second signal stops at once, saving nothing (the
    last checkpoint stays the resume point). Outside the main thread it does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nspear: stopping after this step (interrupt again to stop now, without saving it)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class MetricsLogger:
    """``metrics.jsonl`` (always), tensorboard (``tensorboard`` in ``trainer.logger``) and wandb (``wandb``)."""

    def __init__(self, run_dir: Path, loggers: Iterable[str], config: dict, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # drop the records of steps after the checkpoint: they are about to be recomputed
            kept = [
                line
                for line, record in _complete_records(self.path)
                if not isinstance(record, dict) or record.get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.console = "console" in loggers
        self.tb = None
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("spear: tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr)
            else:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step and resume_step + 1)
        self.wandb = None
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("trainer.logger has 'wandb' but wandb is not installed: pip install wandb") from err
            self.wandb = wandb.init(project="spear", dir=str(run_dir), config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_loggers(loggers: Iterable[str]) -> None:
    """Before anything is written: wandb, when asked for, is installed and logged in (or in offline mode)."""
    if "wandb" not in loggers:
        return
    try:
        import wandb
    except ImportError:
        raise ImportError("trainer.logger has 'wandb' but wandb is not installed: pip install wandb") from None
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if not wandb.login(prompt=False):
        raise ConfigError(
            "trainer.logger has 'wandb' but wandb is not logged in: run `wandb login`, set WANDB_API_KEY, "
            "set WANDB_MODE=offline, or drop wandb from trainer.logger"
        )


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a spear run directory")
    records = [record for _, record in _complete_records(path)]
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            raise UserError(f"{path}: record {i + 1} is not a metrics record (a JSON object with an integer 'step')")
    return records


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``<run_dir>/checkpoints/latest`` points to, or None."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not re.fullmatch(r"step_[0-9]{6,}", name):
        raise UserError(f"{pointer} names {name!r}, not a checkpoint of this run directory (step_NNNNNN)")
    path = ckpt_dir / name
    return path if (path / STATE_FILE).is_file() else None


# keys a resumed run may change with --allow-changes (they change when or how the run reports, not what it trains)
RESUMABLE_KEYS = (
    "trainer.total_training_steps",
    "trainer.save_freq",
    "trainer.test_freq",
    "trainer.logger",
    "trainer.num_threads",
    "trainer.val_before_train",
)
_IGNORED_ON_RESUME = ("trainer.default_local_dir",)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict, new: dict, *, allow_changes: bool = False) -> None:
    """Refuses to resume a run with a different config: a ``ConfigError`` naming every key that differs.
    With ``allow_changes``, the keys of ``RESUMABLE_KEYS`` may differ."""
    a, b = _flat(saved), _flat(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in _IGNORED_ON_RESUME)
    refused = [k for k in changed if not (allow_changes and k in RESUMABLE_KEYS)]
    if refused:
        detail = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in refused)
        hint = ""
        if all(k in RESUMABLE_KEYS for k in refused):
            hint = " (these may change with --allow-changes)"
        raise ConfigError(f"--resume: the config differs from the run's config.json: {detail}{hint}")


def _set_threads(cfg: SpearConfig) -> None:
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)


def _mean_metrics(items: list[dict[str, float]]) -> dict[str, float]:
    sums: dict[str, list[float]] = defaultdict(list)
    for item in items:
        for k, v in item.items():
            sums[k].append(v)
    return {k: sum(v) / len(v) for k, v in sums.items()}


# ---- the trainer --------------------------------------------------------------------------------


class Trainer:
    """The SPEAR loop on one process. ``fit()`` runs ``trainer.total_training_steps`` steps.

    Args:
        cfg: a validated :class:`~spear.config.SpearConfig`.
        resume: continue from the latest checkpoint in ``trainer.default_local_dir`` (an error if there is none).
        progress: show tqdm progress bars.
    """

    def __init__(self, cfg: SpearConfig, *, resume: bool = False, progress: bool = True, allow_changes: bool = False):
        self.cfg = cfg
        self.progress = progress
        self.run_dir = Path(cfg.trainer.default_local_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        _set_threads(cfg)
        check_loggers(cfg.trainer.logger)
        seed = cfg.trainer.seed
        resume_from = None
        if resume:
            resume_from = self.latest_checkpoint()
            if resume_from is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt_dir}")
            saved = self.run_dir / "config.json"
            if saved.is_file():
                try:
                    saved_cfg = json.loads(saved.read_text())
                except ValueError as err:
                    raise ConfigError(f"--resume: {saved} is not valid JSON ({err})") from None
                check_resume_config(saved_cfg, to_dict(cfg), allow_changes=allow_changes)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temporaries(self.ckpt_dir, ".step_*.tmp*")
        remove_orphaned_temporaries(self.ckpt_dir, "latest.tmp*")
        if resume_from is None and (self.ckpt_dir / "latest").exists():
            # a fresh start in a used run directory: --resume must not pick up the old run's checkpoints
            (self.ckpt_dir / "latest").unlink()
            print(
                f"spear: starting a new run in {self.run_dir} (its old checkpoints are overwritten as new ones are "
                "saved; use --resume to continue instead)",
                file=sys.stderr,
            )
        if resume_from is not None:
            model_path = resume_from
        else:
            model_path = self._initial_model()
        self.model, self.tokenizer = load_policy(model_path)
        self.model.train()
        a = cfg.actor_rollout_ref.actor
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=a.optim.lr, weight_decay=a.optim.weight_decay)
        self.ref_model = None
        if a.use_kl_loss:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.rollout_gen = torch.Generator().manual_seed(seed)
        self.loss_gen = torch.Generator().manual_seed(seed + 1)
        self.shuffle_gen = torch.Generator().manual_seed(seed + 2)
        self.spear = SpearStep(cfg, seed=seed + 3)
        self.step = 0
        self.last_saved = -1
        self.last_eval: dict[str, float] = {}
        r = cfg.actor_rollout_ref.rollout
        self.envs = make_envs(cfg, cfg.data.train_batch_size * r.n)
        self.eval_envs = make_envs(cfg, min(64, cfg.env.num_eval_tasks))
        if resume_from is not None:
            self._load_state(resume_from)
        (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        self.logger = MetricsLogger(
            self.run_dir, cfg.trainer.logger, to_dict(cfg), resume_step=self.step if resume_from is not None else None
        )

    @property
    def buffer(self):
        """The self-imitation replay buffer (:class:`spear.replay.TrajectoryReplayBuffer`)."""
        return self.spear.buffer

    # -- setup --

    def _initial_model(self) -> Path:
        cfg = self.cfg
        path = Path(cfg.actor_rollout_ref.model.path) if cfg.actor_rollout_ref.model.path else None
        if path is None:
            path = default_model_path(cfg.env.name)
        if cfg.trainer.cold_start_sft:
            sft_dir = self.run_dir / "sft"
            if not sft_is_current(cfg, path, sft_dir):
                summary = run_sft(cfg, sft_dir, model_path=path, progress=self.progress)
                if self.progress:
                    print(f"sft: loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}", file=sys.stderr)
            path = sft_dir
        return path

    # -- checkpoints --

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def save_checkpoint(self) -> Path:
        """Model + tokenizer (HF format), optimizer, RNG states and replay buffer at the current step."""
        name = f"step_{self.step:06d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        state = {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "rng": {
                "rollout": self.rollout_gen.get_state(),
                "loss": self.loss_gen.get_state(),
                "shuffle": self.shuffle_gen.get_state(),
                "torch": torch.get_rng_state(),
            },
            "buffer": self.spear.buffer.state_dict(),
            "last_eval": dict(self.last_eval),
            "config": to_dict(self.cfg),
        }
        if self.ref_model is not None:
            state["ref_model"] = self.ref_model.state_dict()
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = self.ckpt_dir / f"latest.tmp{os.getpid()}"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, self.ckpt_dir / "latest")
        self.last_saved = self.step
        return final

    def _load_state(self, path: Path) -> None:
        file = path / STATE_FILE
        hint = "delete that checkpoint directory and write the previous step's name into checkpoints/latest"
        try:
            state = torch.load(file, weights_only=True)
        except Exception as err:  # truncated, empty or garbage: whatever the unpickler raises
            reason = "not a checkpoint file" if isinstance(err, pickle.UnpicklingError) else _first_line(err)
            raise CheckpointError(f"{file} cannot be read ({reason}); {hint}") from None
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{file}: not a version-{CHECKPOINT_VERSION} trainer state (found {found!r})")
        try:
            self._apply_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            raise CheckpointError(f"{file} does not fit this run ({_first_line(err)}); {hint}") from None

    def _apply_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        for param in self.model.parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    shapes = f"{tuple(value.shape)}, not {tuple(param.shape)}"
                    raise ValueError(f"optimizer state {key!r} has shape {shapes}")
        self.rollout_gen.set_state(state["rng"]["rollout"])
        self.loss_gen.set_state(state["rng"]["loss"])
        self.shuffle_gen.set_state(state["rng"]["shuffle"])
        torch.set_rng_state(state["rng"]["torch"])
        self.spear.buffer.load_state_dict(state["buffer"])
        self.last_eval = dict(state.get("last_eval", {}))
        if self.ref_model is not None and "ref_model" in state:
            self.ref_model.load_state_dict(state["ref_model"])
        if not isinstance(state["step"], int) or state["step"] < 0:
            raise ValueError(f"step {state['step']!r} is not a step number")
        self.step = state["step"]
        self.last_saved = self.step

    # -- one step --

    def task_seeds(self, step: int) -> list[int]:
        g, k = self.cfg.data.train_batch_size, self.cfg.env.num_train_tasks
        base = (step - 1) * g
        return [(base + i) % k for i in range(g)] if k else [base + i for i in range(g)]

    def _forward(self, model, batch: dict, rows: torch.Tensor, *, entropy: bool):
        sub = {k: batch[k][rows] for k in ("prompts", "prompt_mask", "responses", "response_attn", "response_mask")}
        return response_logprobs(
            model, sub, temperature=self.cfg.actor_rollout_ref.rollout.temperature, return_entropy=entropy
        )

    @torch.no_grad()
    def _logprobs_no_grad(self, model, batch: dict) -> torch.Tensor:
        micro = self.cfg.actor_rollout_ref.actor.ppo_micro_batch_size
        n = batch["responses"].shape[0]
        out = [
            self._forward(model, batch, torch.arange(i, min(i + micro, n)), entropy=False)[0]
            for i in range(0, n, micro)
        ]
        return torch.cat(out) if out else torch.zeros_like(batch["response_mask"])

    def _update(self, on_policy: dict | None, replay_rows: dict | None, weight: float) -> dict:
        """The on-policy update and the self-imitation update, interleaved per PPO epoch as in the reference: each
        epoch runs the on-policy mini-batches, then the replay mini-batches (one optimizer step each, over
        micro-batches accumulating gradients).

        Batches hold only rows with a non-empty loss mask. The partition into mini-batches is
        :func:`spear.step.minibatches` (the same in every epoch, as in the verl recipe); each mini-batch's loss is
        normalised by its own tokens / rows (:func:`spear.step.normalisers`). With ``replay_update: mixed`` and a
        replay batch: one pass over each batch as a single mini-batch, and one optimizer step for both.
        """
        a = self.cfg.actor_rollout_ref.actor
        mixed = a.replay_update == "mixed" and replay_rows is not None
        parts = [(b, replay) for b, replay in ((on_policy, False), (replay_rows, True)) if b is not None]
        if mixed:
            epochs, minis = 1, [[torch.arange(b["responses"].shape[0])] for b, _ in parts]
        else:
            epochs = a.ppo_epochs
            minis = [minibatches(b["responses"].shape[0], a.ppo_mini_batch_size, self.shuffle_gen) for b, _ in parts]
        records = {False: [], True: []}
        grad_norms = {False: [], True: []}
        skipped = {False: 0, True: 0}
        if mixed:
            self.optimizer.zero_grad(set_to_none=True)
        for _ in range(epochs):
            for (batch, replay), part_minis in zip(parts, minis, strict=True):
                for mini in part_minis:
                    if not mixed:
                        self.optimizer.zero_grad(set_to_none=True)
                    records[replay] += self._accumulate(batch, mini, replay=replay, weight=weight if replay else 1.0)
                    if not mixed:
                        gn, ok = self._optimizer_step()
                        grad_norms[replay].append(gn)
                        skipped[replay] += int(not ok)
        out: dict[str, float] = {}
        for _, replay in parts:
            suffix = "_replay" if replay else ""
            m = _mean_metrics(records[replay])
            if grad_norms[replay]:
                m[f"grad_norm{suffix}"] = sum(grad_norms[replay]) / len(grad_norms[replay])
            m[f"optim/skipped_steps{suffix}"] = float(skipped[replay])
            out.update({f"actor/{k}": v for k, v in m.items()})
        if mixed:
            gn, ok = self._optimizer_step()
            out["actor/grad_norm"] = gn
            out["actor/optim/skipped_steps"] = float(not ok)
        return out

    def _accumulate(self, batch: dict, mini: torch.Tensor, *, replay: bool, weight: float) -> list[dict]:
        """Back-propagates one mini-batch's loss over its micro-batches; returns their metrics."""
        a = self.cfg.actor_rollout_ref.actor
        norms = normalisers(batch["response_mask"], mini)
        records = []
        for u0 in range(0, len(mini), a.ppo_micro_batch_size):
            rows = mini[u0 : u0 + a.ppo_micro_batch_size]
            logp, ent = self._forward(self.model, batch, rows, entropy=True)
            micro = {k: v[rows] for k, v in batch.items() if k in UPDATE_KEYS}
            loss, metrics = update_loss(
                self.cfg, logp, ent, micro, replay=replay, weight=weight, norms=norms, generator=self.loss_gen
            )
            loss.backward()
            records.append(metrics)
        return records

    def _optimizer_step(self) -> tuple[float, bool]:
        clip = self.cfg.actor_rollout_ref.actor.optim.grad_clip
        gn = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not math.isfinite(gn):
            self.optimizer.zero_grad(set_to_none=True)
            return gn, False
        self.optimizer.step()
        return gn, True

    def train_step(self) -> dict[str, float]:
        """One SPEAR step (:mod:`spear.step`): rollout, then the shared step around this trainer's updates."""
        cfg, step = self.cfg, self.step + 1
        r = cfg.actor_rollout_ref.rollout
        t0 = time.perf_counter()
        tasks = self.task_seeds(step)
        seeds = [s for s in tasks for _ in range(r.n)]
        uids = [f"{step}:{i}" for i in range(len(tasks)) for _ in range(r.n)]
        episodes = run_rollout(
            self.model,
            self.tokenizer,
            cfg,
            self.envs,
            seeds,
            uids,
            temperature=r.temperature,
            top_p=r.top_p,
            generator=self.rollout_gen,
        )
        t_rollout = time.perf_counter() - t0
        metrics = summarize(episodes, "train")
        tensors = collate(
            episodes,
            pad_id=self.tokenizer.pad_token_id,
            max_prompt_length=cfg.data.max_prompt_length,
            response_length=r.response_length,
        )
        # 2-3, 5: rewards, filters (the std filter removes rows), advantages
        batch, step_metrics = self.spear.prepare(
            step_batch_of(episodes, tensors), step, max_response_length=r.response_length
        )
        metrics.update(step_metrics)
        episodes = [episodes[i] for i in batch.index.tolist()]
        # 4. old (and reference) log-probs of the kept rows
        t1 = time.perf_counter()
        rows = batch.tensors
        rows["old_log_probs"] = self._logprobs_no_grad(self.model, rows)
        if self.ref_model is not None:
            rows["ref_log_probs"] = self._logprobs_no_grad(self.ref_model, rows)
        # 6. on-policy update over the rows with a non-empty loss mask; 7. replay
        replay_rows, weight, replay_metrics = self.spear.replay(step)
        metrics.update(replay_metrics)
        train_rows = torch.nonzero(rows["response_mask"].sum(-1) > 0).squeeze(1)
        on_policy = {k: v[train_rows] for k, v in rows.items()} if len(train_rows) else None
        if on_policy is not None or replay_rows is not None:
            metrics.update(self._update(on_policy, replay_rows, weight))
        # 8. admission (after the update: replay at t uses data <= t - 1)
        metrics.update(self.spear.admit(batch, step))
        t_end = time.perf_counter()
        tokens = sum(len(ep.response_ids) + len(ep.prompt_ids) for ep in episodes)
        metrics.update(
            {
                "time/rollout_s": t_rollout,
                "time/update_s": t_end - t1,
                "time/step_s": t_end - t0,
                "perf/train_tokens_per_s": tokens / max(t_end - t1, 1e-9),
                "perf/rollout_tokens_per_s": sum(len(ep.response_ids) for ep in episodes) / max(t_rollout, 1e-9),
            }
        )
        self.step = step
        return metrics

    # -- the loop --

    def fit(self) -> dict[str, float]:
        """Runs to ``trainer.total_training_steps``; returns the last evaluation.

        Ctrl-C (SIGINT) or SIGTERM finishes the current step (its evaluation, log record and checkpoint), then raises
        ``KeyboardInterrupt``: a checkpoint never holds half a step, and ``--resume`` continues exactly. A second
        signal stops at once and saves nothing (the last checkpoint is the resume point)."""
        from tqdm.auto import tqdm

        t = self.cfg.trainer
        try:
            with DeferredInterrupt() as interrupt:
                if self.step == 0 and t.val_before_train:
                    self.last_eval = evaluate(self.model, self.tokenizer, self.cfg, self.eval_envs)
                    self.logger.log(0, self.last_eval)
                    self._console(0, self.last_eval)
                bar = tqdm(
                    total=t.total_training_steps,
                    initial=self.step,
                    desc="train",
                    disable=not self.progress,
                    dynamic_ncols=True,
                )
                while self.step < t.total_training_steps and not interrupt.requested:
                    metrics = self.train_step()
                    last = self.step == t.total_training_steps
                    if last or (t.test_freq and self.step % t.test_freq == 0):
                        self.last_eval = evaluate(self.model, self.tokenizer, self.cfg, self.eval_envs)
                        metrics.update(self.last_eval)
                    self.logger.log(self.step, metrics)
                    if last or (t.save_freq and self.step % t.save_freq == 0) or interrupt.requested:
                        self.save_checkpoint()
                    bar.update(1)
                    bar.set_postfix(
                        success=f"{metrics['train/success']:.2f}",
                        val=f"{self.last_eval.get('val/success', float('nan')):.2f}",
                        reward=f"{metrics['train/reward']:.2f}",
                    )
                    if "val/success" in metrics:
                        self._console(self.step, metrics)
                bar.close()
                if interrupt.requested:
                    done = f"saved step {self.step}" if self.last_saved == self.step else "no step finished"
                    print(f"interrupted: {done} in {self.run_dir}; continue with --resume", file=sys.stderr)
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if self.step > self.last_saved:
                print(
                    f"interrupted: nothing saved after step {self.last_saved} (stopped mid-step)",
                    file=sys.stderr,
                )
            raise
        finally:
            self.logger.close()
        return self.last_eval

    def _console(self, step: int, metrics: dict) -> None:
        if "console" not in self.cfg.trainer.logger:
            return
        keys = ("val/success", "val/reward", "val/tool_turns", "train/success", "actor/entropy", "replay/buffer_size")
        shown = "  ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics)
        print(f"[step {step}] {shown}", file=sys.stderr, flush=True)
