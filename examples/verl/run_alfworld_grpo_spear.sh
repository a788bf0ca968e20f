#!/usr/bin/env bash
# SPEAR (GRPO) on verl's distributed trainer (Ray + FSDP). Needs GPUs, a model and a dataset in verl's
# format; every verl option works as with `python -m verl.trainer.main_ppo`. The SPEAR keys live under
# `spear.` (see docs/verl.md and docs/config.md).
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
TRAIN=${TRAIN:-$HOME/data/alfworld/train.parquet}
VAL=${VAL:-$HOME/data/alfworld/test.parquet}

python -m spear.verl.recipe.main \
  data.train_files="$TRAIN" data.val_files="$VAL" \
  data.train_batch_size=16 data.max_prompt_length=2048 data.max_response_length=512 \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=16 \
  actor_rollout_ref.actor.use_fused_kernels=true \
  actor_rollout_ref.rollout.n=8 \
  spear.actor_rollout_ref.actor.trajectory_buffer_size=128 \
  trainer.n_gpus_per_node=8 trainer.nnodes=1 trainer.total_training_steps=200 \
  "$@"
