"""SPEAR: the RL layer on top of ``spear_kernels``, in three tiers.

- the algorithm (torch + ``spear_kernels`` only): ``config`` (keys and presets), ``step`` (one SPEAR step, shared by
  both trainers), ``losses``, ``advantages``, ``replay``, ``rewards``, ``filters``, ``schedules``; and ``envs``, the
  text environments with their scripted experts;
- ``trainer`` (the ``train`` extra: transformers): the slim single-machine trainer, its rollouts, SFT, checkpoints,
  metrics, plots and the method comparison, driven by the ``spear`` command (``cli``);
- ``verl`` (the ``verl`` extra): ``verl.plugin`` (drop-in losses and estimator) and ``verl.recipe`` (SPEAR on verl's
  Ray trainer).
"""
