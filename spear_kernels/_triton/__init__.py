"""Triton kernels (GPU path). Importing this package imports triton; spear_kernels does so lazily."""

from . import group_advantages, linear_logprobs_entropy, logprobs_entropy, policy_loss

KERNEL_MODULES = (logprobs_entropy, linear_logprobs_entropy, policy_loss, group_advantages)


def aot_specs() -> list[dict]:
    """Every Triton kernel of the package, with the signatures `python -m spear_kernels.aot` compiles."""
    return [spec for module in KERNEL_MODULES for spec in module.aot_specs()]
