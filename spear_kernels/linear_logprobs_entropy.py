"""``linear_logprobs_entropy``: token log-prob and entropy of softmax(hidden @ weight.T / T) without ever
materialising the [tokens, V] logits.

Layers: the C++ driver (``linear_logprobs_entropy`` in ``csrc/ops.cpp``: ATen GEMMs over
[token chunk, vocab chunk] tiles of a bounded workspace, with the vectorised epilogue of
``csrc/linear_logprobs_entropy_kernel.cpp``) and the Triton kernels
(:mod:`spear_kernels._triton.linear_logprobs_entropy`: a tiled GEMM with an online-softmax epilogue)
-> :class:`LinearLogprobsEntropyFunction` -> :func:`linear_logprobs_entropy`. The eager twin is
:func:`spear_kernels.reference.linear_logprobs_entropy`.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import resolve_backend
from ._validation import check_hidden_weight_labels
from .logprobs_entropy import differentiable_grads


def _launchers(backend: str):
    if backend == "cpp":
        from . import _cpp as kernels
    else:
        from ._triton import linear_logprobs_entropy as kernels  # imported on first use: needs triton
    return kernels.linear_logprobs_entropy_fwd, kernels.linear_logprobs_entropy_bwd


class LinearLogprobsEntropyFunction(torch.autograd.Function):
    """``hidden [N, H]``, ``weight [V, H]``, ``labels [N]`` -> ``(logp [N], entropy [N])``; recomputes logits in
    the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature: float, backend: str):
        fwd, _ = _launchers(backend)
        logp, entropy, stats = fwd(hidden, weight, labels, temperature)
        ctx.save_for_backward(hidden, weight, labels, stats, entropy)
        ctx.temperature = temperature
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        hidden, weight, labels, stats, entropy = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph (double backward): the eager formulas, differentiated
            logits = hidden.float() @ weight.float().T
            outputs = reference.logprobs_entropy_math(logits, labels, ctx.temperature, True, torch.float32)
            grads = differentiable_grads(outputs, (grad_logp, grad_entropy), (hidden, weight))
            return (*grads, None, None, None)
        _, bwd = _launchers(ctx.backend)
        grad_logp = None if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        grad_hidden, grad_weight = bwd(hidden, weight, labels, stats, entropy, grad_logp, grad_entropy, ctx.temperature)
        return grad_hidden, grad_weight, None, None, None


def linear_logprobs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token log-prob and entropy of ``softmax(hidden @ weight.T / temperature)``, fused with the lm_head GEMM.

    Args:
        hidden: ``[..., H]`` final hidden states, float32 / bfloat16 / float16.
        weight: ``[V, H]`` lm_head weight (no bias), same dtype as ``hidden``.
        labels: ``[...]`` token ids; ``-100`` ignores a token (outputs 0, no gradient from it).
        temperature: ``> 0``.
        return_entropy: when False the second output is None.
        backend: ``cpp``, ``triton``, ``torch`` or None (see :func:`spear_kernels.available_backends`).

    Returns:
        ``(logp, entropy)``, fp32 ``[...]``; differentiable w.r.t. ``hidden`` and ``weight``, whose gradients
        are accumulated in fp32 and returned in the inputs' dtype. The logits are never materialised:
        memory beyond the inputs and gradients is a bounded workspace, independent of tokens x V.

    Example:
        >>> hidden = torch.randn(2, 128, 896, requires_grad=True)
        >>> lm_head = torch.randn(151936, 896, requires_grad=True)
        >>> logp, ent = linear_logprobs_entropy(hidden, lm_head, torch.randint(0, 151936, (2, 128)))
        >>> logp.sum().backward()
    """
    temperature = check_hidden_weight_labels(hidden, weight, labels, temperature)
    backend = resolve_backend(backend, hidden.device)
    if backend == "torch":
        return reference.linear_logprobs_entropy(
            hidden, weight, labels, temperature=temperature, return_entropy=return_entropy
        )
    lead_shape = labels.shape
    hidden2d = hidden.reshape(lead_shape.numel(), hidden.shape[-1]).contiguous()
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()
    logp, entropy = LinearLogprobsEntropyFunction.apply(hidden2d, weight.contiguous(), labels1d, temperature, backend)
    logp = logp.view(lead_shape)
    return (logp, entropy.view(lead_shape)) if return_entropy else (logp, None)
