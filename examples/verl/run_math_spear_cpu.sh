#!/usr/bin/env bash
# The SPEAR recipe on verl's own trainer, on a CPU-only machine (laptop mode, docs/verl.md): the built-in tiny
# model after its cold-start SFT, the math tool environment through the spear_env agent loop, a few steps.
# Needs the dev extras (`make setup`); takes about 2-3 minutes here, most of it Ray and worker start-up.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/verl_math_cpu}
mkdir -p "$OUT"
# 1. the tiny model's cold-start SFT (the slim trainer's `spear sft`) and a dataset of task seeds
[ -f "$OUT/sft/spear_sft.json" ] || "$(dirname "$PY")/spear" sft --preset tiny_math --output "$OUT/sft" --no-eval --quiet sft.steps=300
"$PY" -m spear.verl.recipe.data --env math --train 64 --val 16 --out "$OUT/data"
# 2. verl's trainer with the CPU mode loaded in every process
export VERL_USE_EXTERNAL_MODULES=spear.verl.recipe.cpu VERL_PLATFORM=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
"$PY" -m spear.verl.recipe.main $("$PY" -c "from spear.verl.recipe import cpu; print(*cpu.overrides())" 2>/dev/null) \
  data.train_files="$OUT/data/train.parquet" data.val_files="$OUT/data/val.parquet" \
  data.train_batch_size=4 data.max_prompt_length=32 data.max_response_length=96 \
  actor_rollout_ref.model.path="$OUT/sft" \
  actor_rollout_ref.rollout.n=4 actor_rollout_ref.rollout.prompt_length=32 actor_rollout_ref.rollout.response_length=96 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
  actor_rollout_ref.actor.ppo_mini_batch_size=4 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
  actor_rollout_ref.actor.optim.lr=1e-4 \
  spear.env.name=math +spear.env.kwargs.min_ops=1 +spear.env.kwargs.max_ops=3 +spear.env.kwargs.expert_direct_prob=0.5 \
  spear.actor_rollout_ref.rollout.max_turns=5 spear.actor_rollout_ref.rollout.max_turn_tokens=16 \
  spear.actor_rollout_ref.actor.trajectory_buffer_size=4 spear.actor_rollout_ref.actor.max_replay_loss_steps=20 \
  trainer.total_training_steps=${STEPS:-6} trainer.test_freq=0 trainer.save_freq=3 trainer.val_before_train=false \
  trainer.logger='[console]' trainer.default_local_dir="$OUT/checkpoints" hydra.run.dir="$OUT/hydra" \
  "$@"
