"""The slim single-process SPEAR trainer's loop: rollouts, rewards, Dr.BoT filters, advantages, PPO-style updates,
self-imitation replay, checkpoints and evaluation, on one machine with no Ray and no GPU. Each stage lives in its
own module of :mod:`spear.trainer`; this one reads top to bottom.

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
(see :func:`spear.trainer.forward.response_logprobs`).
"""

from __future__ import annotations

import copy
import json
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from .._files import remove_orphaned_temporaries
from ..config import SpearConfig, to_dict
from ..step import SEED_OFFSETS, SpearStep
from .checkpoint import (
    RunLock,
    check_resume_config,
    check_writable,
    latest_checkpoint,
    load_checkpoint_state,
    read_run_config,
    write_checkpoint,
)
from .engines import make_engine, vllm_available
from .evaluation import evaluate, summarize
from .forward import logprobs_no_grad
from .metrics import MetricsLogger, check_loggers
from .models import (
    PolicyDivergedError,
    check_finite_policy,
    check_model_dir,
    default_model_path,
    disable_dropout,
    load_configured_policy,
    resolve_device,
    set_threads,
)
from .rollout import collate, make_envs, run_rollout, step_batch_from_episodes
from .sft import run_sft, sft_is_current
from .update import ActorUpdate


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


def rollout_agreement(rows: dict) -> dict[str, float]:
    """How far the engine's log-probs of the sampled tokens are from the trainer's (``old_log_probs``: the same
    weights and temperature). About 1e-6 when they agree; a stale or mis-synced engine shows here first (verl reports
    the same as ``training/rollout_probs_diff_*``). With ``top_p < 1``, vLLM's log-probs are over the nucleus."""
    mask = rows["response_mask"] > 0
    if not bool(mask.any()):
        return {}
    diff = (rows["old_log_probs"] - rows["rollout_log_probs"]).abs()[mask]
    return {"rollout/logprob_diff_mean": float(diff.mean()), "rollout/logprob_diff_max": float(diff.max())}


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
        set_threads(cfg)
        check_loggers(cfg.trainer.logger)
        if cfg.actor_rollout_ref.rollout.name == "vllm" and not vllm_available():
            raise ImportError(
                "actor_rollout_ref.rollout.name=vllm needs vLLM: `make setup-vllm` (or pip install 'spear-core[vllm]')"
            )
        seed = cfg.trainer.seed
        resume_from = None
        if resume:
            resume_from = self.latest_checkpoint()
            if resume_from is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt_dir}")
            saved = self.run_dir / "config.json"
            if saved.is_file():
                check_resume_config(read_run_config(saved), to_dict(cfg), allow_changes=allow_changes)
        # Everything that can fail on what the user gave fails here, before the run directory is touched: the
        # environments (env.kwargs) and the model directory.
        resolve_device(cfg)  # trainer.device names a device this machine has
        r = cfg.actor_rollout_ref.rollout
        self.envs = make_envs(cfg, cfg.data.train_batch_size * r.n)
        self.eval_envs = make_envs(cfg, min(64, cfg.env.num_eval_tasks))
        self.unseen_envs = make_envs(cfg, min(64, cfg.env.unseen_eval_tasks), unseen=True)
        if resume_from is None:
            check_model_dir(self._base_model())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(self.run_dir)  # a second `spear train` on this directory stops here
        try:
            self._setup(cfg, seed, resume_from)
        except BaseException:
            self._lock.release()
            raise

    def _setup(self, cfg: SpearConfig, seed: int, resume_from: Path | None) -> None:
        check_writable(self.run_dir, self.ckpt_dir)
        remove_orphaned_temporaries(self.ckpt_dir, ".step_*.tmp*")
        remove_orphaned_temporaries(self.ckpt_dir, "latest.tmp*")
        model_path = resume_from if resume_from is not None else self._initial_model()
        self.model, self.tokenizer = load_configured_policy(cfg, model_path)
        self.device = self.model.get_output_embeddings().weight.device
        check_finite_policy(self.model, f"the model in {model_path}")
        if cfg.actor_rollout_ref.model.disable_dropout:
            disable_dropout(self.model)
        self.model.train()
        a = cfg.actor_rollout_ref.actor
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=a.optim.lr, weight_decay=a.optim.weight_decay)
        self.ref_model = None
        if a.use_kl_loss:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        # sampling happens where the engine decodes (the model's device for hf), clip-cov's draws where the loss is
        rollout_device = self.device if cfg.actor_rollout_ref.rollout.name == "hf" else torch.device("cpu")
        self.rollout_gen = torch.Generator(device=rollout_device).manual_seed(seed + SEED_OFFSETS["rollout"])
        self.loss_gen = torch.Generator(device=self.device).manual_seed(seed + SEED_OFFSETS["loss"])
        self.shuffle_gen = torch.Generator().manual_seed(seed + SEED_OFFSETS["shuffle"])
        self.spear = SpearStep(cfg, seed=seed + SEED_OFFSETS["replay"])
        self.actor = ActorUpdate(cfg, self.model, self.optimizer, shuffle_gen=self.shuffle_gen, loss_gen=self.loss_gen)
        self.step = 0
        self.last_saved = -1
        self.last_eval: dict[str, float] = {}
        if resume_from is not None:
            load_checkpoint_state(resume_from, self._apply_state)
        self.engine = make_engine(cfg, self.model, self.tokenizer, model_path)
        self._engine_step = self.step  # the engine starts from model_path's weights: this step's
        if resume_from is None:
            self._forget_previous_run()
        (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        self.logger = MetricsLogger(
            self.run_dir, cfg.trainer.logger, to_dict(cfg), resume_step=self.step if resume_from is not None else None
        )

    def _forget_previous_run(self) -> None:
        """A fresh start in a used run directory (everything above has succeeded): ``--resume`` must not pick up
        the old run's checkpoints, and the old records go (its checkpoint directories stay until overwritten)."""
        removed = [p for p in (self.ckpt_dir / "latest", self.run_dir / "metrics.jsonl") if p.exists()]
        if not removed:
            return
        for path in removed:
            path.unlink()
        names = " and ".join(str(p.relative_to(self.run_dir)) for p in removed)
        print(
            f"spear: starting a new run in {self.run_dir}: removed {names} of the previous run (its step_* "
            "checkpoints are overwritten as new ones are saved; use --resume to continue it instead)",
            file=sys.stderr,
        )

    @property
    def buffer(self):
        """The self-imitation replay buffer (:class:`spear.replay.TrajectoryReplayBuffer`)."""
        return self.spear.buffer

    # -- setup --

    def _base_model(self) -> Path:
        """``actor_rollout_ref.model.path``, or the built-in tiny model of the environment."""
        path = self.cfg.actor_rollout_ref.model.path
        return Path(path) if path else default_model_path(self.cfg.env.name)

    def _initial_model(self) -> Path:
        cfg = self.cfg
        path = self._base_model()
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
        state = {
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
        final = write_checkpoint(self.ckpt_dir, self.step, self.model, self.tokenizer, state)
        self.last_saved = self.step
        return final

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

    def _logprobs_no_grad(self, model, batch: dict) -> torch.Tensor:
        return logprobs_no_grad(
            model,
            batch,
            micro_batch_size=self.cfg.actor_rollout_ref.actor.ppo_micro_batch_size,
            temperature=self.cfg.actor_rollout_ref.rollout.temperature,
        )

    def train_step(self) -> dict[str, float]:
        """One SPEAR step (:mod:`spear.step`): rollout, then the shared step around this trainer's updates. A policy
        whose weights or probabilities become NaN / inf stops the run with :class:`PolicyDivergedError` naming the
        step (nothing of that step is saved)."""
        try:
            return self._train_step()
        except PolicyDivergedError as err:
            raise PolicyDivergedError(f"the policy became non-finite at step {self.step + 1}: {err}") from None

    def _train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step + 1
        r = cfg.actor_rollout_ref.rollout
        t0 = time.perf_counter()
        tasks = self.task_seeds(step)
        seeds = [s for s in tasks for _ in range(r.n)]
        uids = [f"{step}:{i}" for i in range(len(tasks)) for _ in range(r.n)]
        sync_s = self._sync_engine()
        episodes = run_rollout(
            self.engine,
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
        timer = {}

        def old_log_probs(kept) -> dict[str, float]:
            # 4. old (and reference) log-probs of the kept rows
            timer["t1"] = time.perf_counter()
            rows = kept.tensors
            rows["old_log_probs"] = self._logprobs_no_grad(self.model, rows)
            if self.ref_model is not None:
                rows["ref_log_probs"] = self._logprobs_no_grad(self.ref_model, rows)
            return rollout_agreement(rows)

        # the shared step (spear.step.SpearStep.run): rewards, filters, advantages, old log-probs, replay, the
        # on-policy and self-imitation updates, admission
        kept, step_metrics = self.spear.run(
            step_batch_from_episodes(episodes, tensors),
            step,
            max_response_length=r.response_length,
            update=self.actor.run,
            old_log_probs=old_log_probs,
        )
        metrics.update(step_metrics)
        check_finite_policy(self.model, "the updated policy")
        t1 = timer.get("t1", time.perf_counter())
        t_end = time.perf_counter()
        kept_rows = kept.index
        tokens = int(tensors["prompt_mask"][kept_rows].sum() + tensors["response_attn"][kept_rows].sum())
        sampled = int(tensors["response_mask"].sum())
        metrics.update(
            {
                "time/rollout_s": t_rollout,
                "time/update_s": t_end - t1,
                "time/step_s": t_end - t0,
                "perf/weight_sync_s": sync_s,
                "perf/train_tokens_per_s": tokens / max(t_end - t1, 1e-9),
                "perf/rollout_tokens_per_s": sampled / max(t_rollout, 1e-9),
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
                    self.last_eval = evaluate(
                        self.engine, self.tokenizer, self.cfg, self.eval_envs, unseen_envs=self.unseen_envs
                    )
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
                        self._sync_engine()
                        self.last_eval = evaluate(
                            self.engine, self.tokenizer, self.cfg, self.eval_envs, unseen_envs=self.unseen_envs
                        )
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
            self.close()
        return self.last_eval

    def close(self) -> None:
        """Closes the metrics loggers and the rollout engine and releases the run directory (``fit`` does this when
        it returns or stops)."""
        self.logger.close()
        self.engine.close()
        self._lock.release()

    def _sync_engine(self) -> float:
        """Brings the rollout engine's weights to the model's (once per update); returns the seconds it took."""
        if self._engine_step == self.step:
            return 0.0
        seconds = self.engine.sync_weights(self.model)
        self._engine_step = self.step
        return seconds

    def _console(self, step: int, metrics: dict) -> None:
        if "console" not in self.cfg.trainer.logger:
            return
        keys = ("val/success", "val/reward", "val/tool_turns", "train/success", "actor/entropy", "replay/buffer_size")
        shown = "  ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics)
        print(f"[step {step}] {shown}", file=sys.stderr, flush=True)
