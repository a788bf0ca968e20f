"""SPEAR: the RL layer on top of ``spear_kernels``.

- algorithm: ``config`` (keys and presets), ``losses``, ``advantages``, ``replay``, ``rewards``, ``filters``,
  ``schedules``;
- verl: ``verl_plugin`` (drop-in losses and estimator), ``verl_recipe`` (SPEAR on verl's Ray trainer);
- slim trainer: ``envs``, ``models``, ``rollout``, ``trainer``, ``plot`` and the ``spear`` command (``cli``).
"""
