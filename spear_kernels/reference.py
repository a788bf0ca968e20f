"""Eager references: the specification of every op, written for clarity, fp32 math.

Tests and benchmarks import these; they are also the ``torch`` backend. Each function has
the same signature as its public twin in :mod:`spear_kernels`, minus ``backend``.
"""

from __future__ import annotations

import torch

from ._validation import IGNORE_INDEX, check_logits_labels

__all__ = ["logprobs_entropy"]


def logprobs_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token log-prob and entropy of ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16.
        labels: ``[...]`` integer; ``-100`` marks a token to ignore (outputs 0, no gradient).
    Returns:
        ``(logp, entropy)``, both fp32 ``[...]``; ``entropy`` is None when ``return_entropy`` is False.
    """
    temperature = check_logits_labels(logits, labels, temperature)
    return logprobs_entropy_math(logits, labels, temperature, return_entropy, torch.float32)


def logprobs_entropy_math(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, return_entropy: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The formulas of :func:`logprobs_entropy` evaluated in ``dtype``, with no input checks.

    fp32 is the reference; tests also evaluate it in float64 as the ground truth both the
    kernels and the fp32 reference are measured against (at V ~ 150k the fp32 reference
    itself is off by ~1e-4 in the entropy).
    """
    ignore = labels == IGNORE_INDEX
    log_p = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    logp = log_p.gather(-1, labels.masked_fill(ignore, 0).long().unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(ignore, 0.0)
    if not return_entropy:
        return logp, None
    # p log p with p = 0 is 0 (a -inf logit), not 0 * -inf = NaN.
    finite_log_p = log_p.masked_fill(log_p == float("-inf"), 0.0)
    entropy = -(log_p.exp() * finite_log_p).sum(-1)
    return logp, entropy.masked_fill(ignore, 0.0)
