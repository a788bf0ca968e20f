"""The SPEAR recipe on verl's trainer: the DataProto hooks, the trainer subclass's step, the Hydra config."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close
from verl import DataProto
from verl.trainer.ppo.ray_trainer import RayPPOTrainer

from spear.advantages import grpo_advantages
from spear.config import load_config
from spear.replay import TrajectoryReplayBuffer
from spear.verl_recipe import hooks
from spear.verl_recipe.trainer import REPLAY_STATE_FILE, SpearRayPPOTrainer

L = 30


def make_batch(step=1, rewards=(1, 0, 1, 0, 3, 0, 0, 0), turns=(0, 2, 5, 12, 1, 1, 1, 1)):
    b = len(rewards)
    g = torch.Generator().manual_seed(step)
    lengths = torch.tensor([L, 10, 12, 8, 9, 11, 7, 13])[:b]
    mask = (torch.arange(L)[None, :] < lengths[:, None]).float()
    responses = torch.randint(5, 99, (b, L), generator=g)  # 99 is the "unreadable" token
    responses[2, :29] = 7  # repetitive: the 20-gram of 7s occurs 10 times
    mask[2, :29] = 1.0
    scores = torch.zeros(b, L)
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()
    scores[last] = torch.tensor(rewards, dtype=torch.float32)
    tensors = {
        "responses": responses,
        "response_mask": mask,
        "input_ids": torch.cat([torch.full((b, 4), 1), responses], dim=1),
        "attention_mask": torch.ones(b, 4 + L, dtype=torch.long),
        "old_log_probs": -torch.rand(b, L, generator=g),
        "token_level_scores": scores.clone(),
        "token_level_rewards": scores.clone(),
    }
    non_tensors = {
        "uid": np.array([f"s{step}-p{i // 4}" for i in range(b)], dtype=object),
        "tool_call_turns": np.array(turns),
        "incomplete": np.array([False, False, False, False, False, True, False, False]),
    }
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


class Tokenizer:
    """Decodes token 99 as an invalid byte sequence (U+FFFD), everything else as plain text."""

    def decode(self, ids):
        return "".join("\ufffd" if i == 99 else "a" for i in ids)


def test_toolcall_bonus_hook():
    batch = make_batch()
    before = batch.batch["token_level_rewards"].sum(-1)
    metrics = hooks.apply_toolcall_bonus(batch, step=1, cfg=load_config())
    factor = (math.cos(math.pi / 100) + 1) / 2
    expected = torch.tensor([0.0, 0.2, 0.5, 1.0, 0.1, 0.1, 0.1, 0.1]) * factor
    assert_close("bonus", batch.batch["token_level_rewards"].sum(-1) - before, expected, atol=1e-6, rtol=0)
    assert_close("scores too", batch.batch["token_level_scores"].sum(-1) - before, expected, atol=1e-6, rtol=0)
    assert metrics["toolcall/factor"] == pytest.approx(factor)


def test_response_filter_hook():
    batch = make_batch()
    batch.batch["responses"][6, 0] = 99  # unreadable
    metrics = hooks.apply_response_filters(batch, load_config(), max_response_length=L, tokenizer=Tokenizer())
    emptied = (batch.batch["response_mask"].sum(-1) == 0).tolist()
    # row 0 is overlong (L tokens), row 2 repetitive, row 5 incomplete, row 6 unreadable
    assert emptied == [True, False, True, False, False, True, True, False]
    assert metrics["filter/overlong"] == 1 and metrics["filter/any"] == 4


def test_rollout_filter_and_advantages_hooks():
    batch = make_batch(rewards=(1, 0, 1, 0, 5, 5, 5, 5))  # group p1 has no spread
    cfg = load_config(overrides=["actor_rollout_ref.rollout.rollout_filter_ratio=0.5"])
    stats = hooks.apply_rollout_filter(batch, cfg)
    assert (batch.batch["response_mask"][4:].sum() == 0) and (batch.batch["response_mask"][:4].sum() > 0)
    assert stats["rollout_filter/groups_kept"] == 1
    hooks.compute_advantages(batch, cfg)
    expected = grpo_advantages(
        batch.batch["token_level_rewards"],
        batch.batch["response_mask"],
        batch.non_tensor_batch["uid"],
        norm_adv_by_std_in_grpo=False,
    )
    assert_close("advantages", batch.batch["advantages"], expected, atol=0, rtol=0)


def test_buffer_hooks_round_trip_through_dataproto():
    cfg = load_config(
        overrides=[
            "actor_rollout_ref.actor.trajectory_buffer_size=1",
            "actor_rollout_ref.actor.trajectory_score_threshold=0",
            "actor_rollout_ref.actor.max_replay_loss_steps=4",
        ]
    )
    buffer = TrajectoryReplayBuffer.from_config(cfg)
    batch = make_batch(step=1)
    hooks.compute_advantages(batch, cfg)
    assert hooks.admit(buffer, batch, step=1) == 3  # rewards 1, 1, 3 are above their group means
    replay, metrics = hooks.replay_batch(buffer, step=2, cfg=cfg)
    assert replay is not None and metrics["replay/batch_size"] == 1.0
    assert replay.meta_info["spear_replay"] and len(replay) == 1
    weight = (1 - math.cos(math.pi * 2 / 4)) / 2
    row_mask = replay.batch["response_mask"][0]
    adv = replay.batch["advantages"][0]
    # baseline: p50 of this step's rewards (0.0); the row's advantage is its reward, scaled by w_sil(2) = 0.5
    assert bool((adv[row_mask == 0] == 0).all())
    value = adv[row_mask.bool()]
    assert value.unique().numel() == 1
    assert any(value[0].item() == pytest.approx(weight * r) for r in (1, 3))
    stored = {tuple(r) for r in batch.batch["old_log_probs"].tolist()}
    assert tuple(replay.batch["old_log_probs"][0].tolist()) in stored  # the stored old log-probs, not recomputed
    assert len(buffer) == 0


class _Recorder:
    """Stands in for RayPPOTrainer's worker RPCs: records each batch the actor update receives."""

    def __init__(self):
        self.batches = []

    def update(self, trainer, batch):
        self.batches.append(batch)
        return DataProto.from_dict(tensors={}, meta_info={"metrics": {"actor/pg_loss": float(len(self.batches))}})


def make_trainer(tmp_path, monkeypatch, recorder, overrides=()):
    trainer = object.__new__(SpearRayPPOTrainer)  # no Ray workers: only the SPEAR step is exercised
    trainer.spear = load_config(
        overrides=[
            "actor_rollout_ref.actor.enable_trajectory_replay=true",
            "actor_rollout_ref.actor.trajectory_buffer_size=1",
            "actor_rollout_ref.actor.trajectory_score_threshold=0",
            *overrides,
        ]
    )
    trainer.replay_buffer = TrajectoryReplayBuffer.from_config(trainer.spear)
    trainer.tokenizer = Tokenizer()
    from omegaconf import OmegaConf

    trainer.config = OmegaConf.create(
        {"data": {"max_response_length": L + 1}, "trainer": {"default_local_dir": str(tmp_path)}}
    )
    monkeypatch.setattr(RayPPOTrainer, "_update_actor", lambda self, batch: recorder.update(self, batch))
    return trainer


def test_trainer_step_runs_on_policy_then_replay_then_admits(tmp_path, monkeypatch):
    recorder = _Recorder()
    # all groups kept: step 1 admits the two unfiltered rows above their group means, which trigger at step 2
    trainer = make_trainer(tmp_path, monkeypatch, recorder, ["actor_rollout_ref.rollout.rollout_filter_ratio=1.0"])
    trainer.global_steps = 1
    out1 = trainer._update_actor(make_batch(step=1))
    assert len(recorder.batches) == 1 and len(trainer.replay_buffer) > 0
    assert out1.meta_info["metrics"]["replay/admitted"] == len(trainer.replay_buffer)
    trainer.global_steps = 2
    out2 = trainer._update_actor(make_batch(step=2))
    assert len(recorder.batches) == 3, "step 2: on-policy update, then one replay update"
    assert recorder.batches[2].meta_info.get("spear_replay")
    assert out2.meta_info["metrics"]["actor_replay/pg_loss"] == 3.0
    assert {"toolcall/factor", "filter/any", "rollout_filter/std_before", "replay/weight"} <= out2.meta_info[
        "metrics"
    ].keys()


def test_trainer_checkpoints_the_buffer(tmp_path, monkeypatch):
    recorder = _Recorder()
    trainer = make_trainer(tmp_path, monkeypatch, recorder)
    monkeypatch.setattr(RayPPOTrainer, "_save_checkpoint", lambda self: None)
    monkeypatch.setattr(RayPPOTrainer, "_load_checkpoint", lambda self: None)
    trainer.global_steps = 1
    trainer._update_actor(make_batch(step=1))
    trainer._save_checkpoint()
    assert (Path(tmp_path) / "global_step_1" / REPLAY_STATE_FILE).exists()
    restored = make_trainer(tmp_path, monkeypatch, _Recorder())
    restored.global_steps = 1
    restored._load_checkpoint()
    assert restored.replay_buffer.state_dict()["baseline"] == trainer.replay_buffer.state_dict()["baseline"]
    assert len(restored.replay_buffer) == len(trainer.replay_buffer) > 0


def test_hydra_config_composes_with_verls_ppo_trainer():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    config_dir = Path(__file__).resolve().parent.parent / "spear" / "verl_recipe" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose(config_name="spear_trainer", overrides=["spear.algorithm.max_toolcall_steps=50"])
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "spear_clip_cov"
    assert cfg.algorithm.adv_estimator == "spear_grpo" and cfg.trainer.use_v1 is False
    assert "max_response_length" in cfg.data  # verl's own sections are all there
    spear = load_config(OmegaConf.to_container(cfg.spear, resolve=True))
    assert spear.algorithm.max_toolcall_steps == 50 and spear.actor_rollout_ref.actor.enable_trajectory_replay


def test_gigpo_advantages_hook_uses_the_per_step_layout():
    from spear.advantages import gigpo_advantages

    batch = make_batch(rewards=(0, 1, 0, 0, 1, 0, 0, 0))
    # rows are turns: trajectories t0 (rows 0-1), t1 (2-3) in group p0; t2 (4-5), t3 (6-7) in group p1
    batch.non_tensor_batch["traj_uid"] = np.array(["t0", "t0", "t1", "t1", "t2", "t2", "t3", "t3"], dtype=object)
    batch.non_tensor_batch["step_index"] = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    batch.non_tensor_batch["anchor_obs"] = np.array(
        ["start", "room", "start", "hall", "s", "x", "s", "x"], dtype=object
    )
    cfg = load_config(overrides=["algorithm.adv_estimator=gigpo", "algorithm.gigpo_mode=mean_norm"])
    hooks.compute_advantages(batch, cfg)
    nt = batch.non_tensor_batch
    expected = gigpo_advantages(
        batch.batch["token_level_rewards"].sum(-1),
        list(nt["uid"]),
        list(nt["traj_uid"]),
        torch.as_tensor(nt["step_index"]),
        list(nt["anchor_obs"]),
        mode="mean_norm",
    )
    assert expected.abs().sum() > 0
    assert_close(
        "advantages", batch.batch["advantages"], expected[:, None] * batch.batch["response_mask"], atol=0, rtol=0
    )
    del batch.non_tensor_batch["anchor_obs"]
    with pytest.raises(ValueError, match="anchor_obs"):
        hooks.compute_advantages(batch, cfg)
