"""Launchers for the C++ CPU kernels (``spear_kernels._C``, registered as ``torch.ops.spear_kernels``).

Same signatures as the Triton launchers: they allocate the outputs (or take ``out=``) and
call the op; no autograd here.
"""

from __future__ import annotations

import numpy as np
import torch

from ._backend import cpp_module
from ._validation import POLICY_LOSS_MODE_IDS


def _ops():
    cpp_module()  # importing the extension registers torch.ops.spear_kernels
    return torch.ops.spear_kernels


def logprobs_entropy_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits [N, V]`` (unit stride inside a row), ``labels [N]`` int64 -> fp32 ``(logp, entropy, stats)``.

    ``stats [N, 2]`` = (max logit, log2 of the softmax normaliser), what the backward needs.
    """
    if out is None:
        rows = logits.shape[0]
        out = (torch.empty(rows), torch.empty(rows), torch.empty(rows, 2))
    _ops().logprobs_entropy_fwd(logits, labels, temperature, *out)
    return out


def logprobs_entropy_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient ``[N, V]`` (contiguous, logits' dtype) for upstream grads of logp and entropy (either may be None)."""
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype)
    _ops().logprobs_entropy_bwd(logits, labels, stats, entropy, grad_logp, grad_entropy, temperature, out)
    return out


def exp_bound(n: int) -> float:
    """Computes ``n`` of the kernels' exp2 on register-resident arguments (the compute limit benchmarks compare
    with: a kernel doing ``n`` exps takes at least this long on this CPU capability)."""
    return cpp_module().exp_bound(n)


def stream_read(x: torch.Tensor) -> float:
    """Reads every byte of a contiguous CPU tensor once (the memory-bound limit benchmarks compare with)."""
    return _ops().stream_read(x)


def policy_loss_fwd(log_prob, old_log_prob, advantages, mask, mode: str, params: dict, seed: int):
    """fp32 contiguous ``[B, L]`` inputs -> ``(loss [B, L], dloss_dlogp [B, L], stats [3])``."""
    loss = torch.empty_like(log_prob)
    dloss = torch.empty_like(log_prob)
    stats = torch.empty(3)
    _ops().policy_loss_fwd(
        log_prob,
        old_log_prob,
        advantages,
        mask,
        POLICY_LOSS_MODE_IDS[mode],
        params["clip_ratio_low"],
        params["clip_ratio_high"],
        params["clip_ratio_c"],
        params["clip_cov_ratio"],
        params["clip_cov_lb"],
        params["clip_cov_ub"],
        params["kl_cov_ratio"],
        params["ppo_kl_coef"],
        seed,
        loss,
        dloss,
        stats,
    )
    return loss, dloss, stats


def group_advantages(scores, inverse, groups: int, norm_by_std: bool, eps: float, with_advantages: bool = True):
    """fp32 or fp64 ``scores [B]``, ``inverse [B]`` int64 -> fp32 ``(mean [G], std [G], count [G], advantages [B]
    or None)``, computed in fp64."""
    mean, std, count = torch.empty(groups), torch.empty(groups), torch.empty(groups)
    adv = torch.empty(scores.shape[0]) if with_advantages else None
    _ops().group_advantages(scores, inverse, groups, norm_by_std, eps, mean, std, count, adv)
    return mean, std, count, adv


def group_index(group_ids) -> tuple[torch.Tensor, int]:
    """Like :func:`spear_kernels.reference.group_index` (first-appearance numbering), in one C++ pass:
    an open-addressing table keyed by Python's own hash and equality (or by the int64 value)."""
    if isinstance(group_ids, torch.Tensor):
        flat = group_ids.reshape(-1).to(torch.int64).contiguous()
        inverse = torch.empty_like(flat)
        return inverse, int(_ops().group_index_int(flat, inverse))
    ids = group_ids.tolist() if isinstance(group_ids, np.ndarray) else list(group_ids)
    out = np.empty(len(ids), dtype=np.int64)
    groups = cpp_module().group_index(ids, out, torch.Tensor)  # one-element tensor ids count as their value
    return torch.from_numpy(out), int(groups)


def linear_logprobs_entropy_fwd(hidden, weight, labels, temperature: float):
    """``hidden [N, H]``, ``weight [V, H]`` (contiguous, same dtype), ``labels [N]`` -> ``(logp, entropy, stats)``."""
    n = hidden.shape[0]
    out = (torch.empty(n), torch.empty(n), torch.empty(n, 2))
    _ops().linear_logprobs_entropy_fwd(hidden, weight, labels, temperature, *out)
    return out


def linear_logprobs_entropy_bwd(hidden, weight, labels, stats, entropy, grad_logp, grad_entropy, temperature: float):
    """``(grad_hidden [N, H], grad_weight [V, H])`` in the inputs' dtype, accumulated in fp32."""
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.empty_like(weight)
    _ops().linear_logprobs_entropy_bwd(
        hidden, weight, labels, stats, entropy, grad_logp, grad_entropy, temperature, grad_hidden, grad_weight
    )
    return grad_hidden, grad_weight
