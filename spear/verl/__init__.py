"""SPEAR on verl (needs the ``verl`` extra): :mod:`spear.verl.plugin` registers the fused losses and the advantage
estimator in verl's registries (loaded by verl's ``verl.plugins`` entry point); :mod:`spear.verl.recipe` runs the
SPEAR step inside verl's Ray PPO trainer. Importing this package imports nothing of verl."""
