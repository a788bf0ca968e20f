"""SPEAR on verl's distributed (Ray + FSDP) trainer.

- :class:`spear.verl.recipe.trainer.SpearRayPPOTrainer`: verl's ``RayPPOTrainer`` whose actor update is the shared
  SPEAR step (:mod:`spear.step`), with :class:`spear.verl.recipe.loss.SpearActorLoss` on the actor workers and
  the replay buffer saved with every checkpoint;
- :mod:`spear.verl.recipe.agent_loop`: the built-in environments as verl's ``spear_env`` agent loop
  (:data:`AGENT_LOOPS_YAML` registers it: ``actor_rollout_ref.rollout.agent.agent_loop_config_path``);
- :mod:`spear.verl.recipe.data`: parquet datasets of task seeds for it;
- :mod:`spear.verl.recipe.cpu`: verl on a CPU-only machine (opt-in, ``VERL_USE_EXTERNAL_MODULES``);
- ``python -m spear.verl.recipe.main``: verl's ``main_ppo`` with that trainer and ``config/spear_trainer.yaml``.

See ``docs/verl.md``.
"""

from pathlib import Path

AGENT_LOOPS_YAML = Path(__file__).resolve().parent / "config" / "agent_loops.yaml"
