"""``policy_loss``: per-token PPO-family losses (vanilla, clip_cov, kl_cov, gpg) with their stats.

Layers: the C++ kernel (``csrc/policy_loss_kernel.cpp``) and the Triton kernels
(:mod:`spear_kernels._triton.policy_loss`) compute the loss, its derivative w.r.t. ``log_prob``
and the stats in one fused pass (plus the clip-cov / kl-cov selection); :class:`PolicyLossFunction`
saves the derivative so the backward is one multiply. The eager twin is
:func:`spear_kernels.reference.policy_loss`, which documents the semantics.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import resolve_backend

STAT_NAMES = ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")


def _seed_from(generator: torch.Generator | None, device: torch.device) -> int:
    """One 62-bit draw from ``generator`` (or the default generator): clip_cov's choice is reproducible."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).item())


class PolicyLossFunction(torch.autograd.Function):
    """Fused forward; the backward multiplies the upstream gradient by the saved d loss / d log_prob."""

    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, mask, mode, params, backend, generator):
        if backend == "cpp":
            from . import _cpp

            loss, dloss, stats = _cpp.policy_loss_fwd(
                log_prob, old_log_prob, advantages, mask, mode, params, _seed_from(generator, log_prob.device)
            )
        else:
            from ._triton import policy_loss as tk

            loss, dloss, stats = tk.policy_loss_fwd(log_prob, old_log_prob, advantages, mask, mode, params, generator)
        ctx.save_for_backward(dloss)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (dloss,) = ctx.saved_tensors
        return grad_loss * dloss, None, None, None, None, None, None, None


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: str = "vanilla",
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float = 3.0,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 2e-4,
    ppo_kl_coef: float = 0.1,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy loss ``[B, L]`` (differentiable w.r.t. ``log_prob``) and stats (0-d fp32 tensors).

    Args:
        log_prob, old_log_prob, advantages: ``[B, L]`` float; ``response_mask``: ``[B, L]`` bool / int / float
            in [0, 1].
        mode: ``vanilla`` (clip-higher + dual clip), ``clip_cov``, ``kl_cov`` or ``gpg``; see
            :func:`spear_kernels.reference.policy_loss` for the exact formulas. The log-ratio is clamped
            to +-20 in every mode, so log-ratios of +-50 give finite losses.
        generator: ``torch.Generator`` for clip_cov's random choice (reproducible runs).
        backend: ``cpp``, ``triton``, ``torch`` or None (see :func:`spear_kernels.available_backends`).

    Returns:
        ``(loss_mat, {"pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"})``. Aggregate ``loss_mat`` with the
        mask (e.g. verl's ``agg_loss``). The cpp/triton backends never synchronise with the host
        beyond drawing clip_cov's seed from ``generator``.

    Example:
        >>> loss_mat, stats = policy_loss(logp, old_logp, adv, mask, mode="clip_cov", generator=g)
        >>> loss = (loss_mat * mask).sum() / mask.sum()
    """
    params = {
        "clip_ratio_low": float(clip_ratio_low),
        "clip_ratio_high": float(clip_ratio_high),
        "clip_ratio_c": float(clip_ratio_c),
        "clip_cov_ratio": float(clip_cov_ratio),
        "clip_cov_lb": float(clip_cov_lb),
        "clip_cov_ub": float(clip_cov_ub),
        "kl_cov_ratio": float(kl_cov_ratio),
        "ppo_kl_coef": float(ppo_kl_coef),
    }
    reference.check_policy_loss_inputs(log_prob, old_log_prob, advantages, response_mask, mode, params)
    backend = resolve_backend(backend, log_prob.device)
    if backend == "torch":
        return reference.policy_loss(
            log_prob, old_log_prob, advantages, response_mask, mode=mode, generator=generator, **params
        )

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32).contiguous()

    loss, stats = PolicyLossFunction.apply(
        f32(log_prob),
        f32(old_log_prob.detach()),
        f32(advantages.detach()),
        f32(response_mask.detach()),
        mode,
        params,
        backend,
        generator,
    )
    return loss, dict(zip(STAT_NAMES, stats.unbind(0), strict=True))
