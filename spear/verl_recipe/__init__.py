"""SPEAR on verl's distributed (Ray + FSDP) trainer.

- :mod:`spear.verl_recipe.hooks`: SPEAR's additions to a training step as functions on ``DataProto``
  batches (tool-call bonus, Dr.BoT filters, rollout std filter, advantages, replay buffer in and out);
- :class:`spear.verl_recipe.trainer.SpearRayPPOTrainer`: verl's ``RayPPOTrainer`` with those hooks around
  the actor update, and the replay buffer saved with every checkpoint;
- ``python -m spear.verl_recipe.main``: verl's ``main_ppo`` with that trainer and
  ``config/spear_trainer.yaml`` (verl's ``ppo_trainer`` plus a ``spear:`` section holding the README's keys).

See ``docs/verl.md``.
"""
