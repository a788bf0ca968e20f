"""The slim single-machine SPEAR trainer (needs the ``train`` extra: transformers).

Modules, in the order one step uses them: :mod:`~spear.trainer.models` (the policy and the built-in tiny model),
:mod:`~spear.trainer.rollout` (multi-turn episodes), :mod:`~spear.trainer.forward` (log-probs through the fused
lm_head kernel), :mod:`~spear.trainer.update` (the actor update), :mod:`~spear.trainer.loop` (the loop around
:class:`spear.step.SpearStep`), :mod:`~spear.trainer.evaluation`, :mod:`~spear.trainer.checkpoint`,
:mod:`~spear.trainer.metrics`; :mod:`~spear.trainer.sft` for the cold start, :mod:`~spear.trainer.plot` and
:mod:`~spear.trainer.compare` for the curves and the method comparison.
"""

from __future__ import annotations

from .checkpoint import STATE_FILE, CheckpointError, check_resume_config, latest_checkpoint
from .evaluation import evaluate
from .loop import Trainer
from .metrics import TIMING_PREFIXES, read_metrics
from .models import ModelLoadError, build_tiny_model, default_model_path, load_policy
from .sft import run_sft, sft_is_current

__all__ = [
    "STATE_FILE",
    "TIMING_PREFIXES",
    "CheckpointError",
    "ModelLoadError",
    "Trainer",
    "build_tiny_model",
    "check_resume_config",
    "default_model_path",
    "evaluate",
    "latest_checkpoint",
    "load_policy",
    "read_metrics",
    "run_sft",
    "sft_is_current",
]
