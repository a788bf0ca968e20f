"""SPEAR RL layer (config, losses, replay, trainer); filled in by later releases."""
