"""``SpearRayPPOTrainer``: verl's RayPPOTrainer with SPEAR's step around the actor update.

verl's ``fit()`` computes rewards, old log-probs and advantages, then calls ``_update_actor(batch)``.
This subclass turns that call into SPEAR's step (SPEAR-SPEC section 1): the tool-call bonus, the Dr.BoT
response filters and the rollout std filter act on the batch, advantages are recomputed from the
shaped rewards over the filtered mask, the on-policy update runs, then the self-imitation update on a
replay batch when the buffer triggers, and finally the buffer admits this step's good trajectories.
The buffer is saved and restored with verl's checkpoints (``spear_replay.pt`` in each step folder).

Requirements on the verl side: ``trainer.use_v1=false`` (this extends the v0 trainer), the
``spear_*`` loss and ``spear_grpo`` estimator (registered by the plugin), and a replay batch size
(``trajectory_buffer_size``, a power of two at most) divisible by ``ppo_mini_batch_size * rollout.n`` and
the data-parallel size. The ``*_replay`` clip-cov parameters apply in the single-process trainer; here the
replay step runs the on-policy loss mode with its advantages scaled by ``w_sil(t)`` (exact for vanilla and
GPG, whose losses are linear in positive advantages).
"""

from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf
from verl.trainer.ppo.ray_trainer import RayPPOTrainer

from ..config import load_config
from ..replay import TrajectoryReplayBuffer
from . import hooks

REPLAY_STATE_FILE = "spear_replay.pt"


class SpearRayPPOTrainer(RayPPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        spear_section = self.config.get("spear", None)
        source = OmegaConf.to_container(spear_section, resolve=True) if spear_section is not None else None
        self.spear = load_config(source)
        self.replay_buffer = TrajectoryReplayBuffer.from_config(
            self.spear, seed=int(self.config.trainer.get("seed", 0))
        )

    def _update_actor(self, batch):
        step = self.global_steps
        metrics = {}
        metrics.update(hooks.apply_toolcall_bonus(batch, step, self.spear))
        metrics.update(
            hooks.apply_response_filters(
                batch, self.spear, tokenizer=self.tokenizer, max_response_length=self.config.data.max_response_length
            )
        )
        metrics.update(hooks.apply_rollout_filter(batch, self.spear))
        hooks.compute_advantages(batch, self.spear)
        output = super()._update_actor(batch)
        if self.spear.actor_rollout_ref.actor.enable_trajectory_replay:
            replay, replay_metrics = hooks.replay_batch(self.replay_buffer, step, self.spear)
            metrics.update(replay_metrics)
            if replay is not None:
                replay_output = super()._update_actor(replay)
                for key, value in replay_output.meta_info["metrics"].items():
                    metrics[key.replace("actor/", "actor_replay/", 1)] = value
            metrics["replay/admitted"] = float(hooks.admit(self.replay_buffer, batch, step))
        output.meta_info["metrics"].update(metrics)
        return output

    def _step_folder(self) -> str:
        return os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")

    def _save_checkpoint(self):
        super()._save_checkpoint()
        os.makedirs(self._step_folder(), exist_ok=True)
        torch.save(self.replay_buffer.state_dict(), os.path.join(self._step_folder(), REPLAY_STATE_FILE))

    def _load_checkpoint(self):
        result = super()._load_checkpoint()
        path = os.path.join(self._step_folder(), REPLAY_STATE_FILE)
        if self.global_steps > 0 and os.path.exists(path):
            self.replay_buffer.load_state_dict(torch.load(path, weights_only=False))
        return result
