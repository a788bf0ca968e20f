"""Triton kernels (GPU path). Importing this package imports triton; spear_kernels does so lazily."""

from . import group_advantages, linear_logprobs_entropy, logprobs_entropy, policy_loss

KERNEL_MODULES = (logprobs_entropy, linear_logprobs_entropy, policy_loss, group_advantages)


def aot_specs() -> list[dict]:
    """Every Triton kernel of the package, with the signatures `python -m spear_kernels.aot` compiles."""
    return [spec for module in KERNEL_MODULES for spec in module.aot_specs()]


def launchers():
    """The Triton launchers under the names and signatures of :mod:`spear_kernels._cpp`'s."""
    from types import SimpleNamespace

    return SimpleNamespace(
        logprobs_entropy_fwd=logprobs_entropy.logprobs_entropy_fwd,
        logprobs_entropy_bwd=logprobs_entropy.logprobs_entropy_bwd,
        linear_logprobs_entropy_fwd=linear_logprobs_entropy.linear_logprobs_entropy_fwd,
        linear_logprobs_entropy_bwd=linear_logprobs_entropy.linear_logprobs_entropy_bwd,
        policy_loss_fwd=policy_loss.policy_loss_fwd,
        group_advantages=group_advantages.group_advantages,
    )
