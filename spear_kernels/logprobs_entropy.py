"""``logprobs_entropy``: token log-prob and entropy of softmax(logits / T), fused, with autograd.

Layers (one name throughout): Triton kernels in :mod:`spear_kernels._triton.logprobs_entropy`
and C++ kernels in ``csrc/logprobs_entropy_kernel.cpp`` -> ``logprobs_entropy_fwd`` /
``logprobs_entropy_bwd`` launchers per backend -> :class:`LogprobsEntropyFunction` ->
:func:`logprobs_entropy`. The eager twin is :func:`spear_kernels.reference.logprobs_entropy`.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import resolve_backend
from ._validation import check_logits_labels


def _launchers(backend: str):
    if backend == "cpp":
        from . import _cpp as kernels
    else:
        from ._triton import logprobs_entropy as kernels  # imported on first use: needs triton
    return kernels.logprobs_entropy_fwd, kernels.logprobs_entropy_bwd


def differentiable_grads(outputs, grad_outputs, inputs) -> tuple[torch.Tensor, ...]:
    """Gradients of ``outputs`` (eager, recomputed) w.r.t. ``inputs`` with a graph, for double backward; a None
    upstream gradient drops its output."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if g is not None]
    return torch.autograd.grad(
        [o for o, _ in pairs],
        inputs,
        [g for _, g in pairs],
        create_graph=True,
        allow_unused=True,
        materialize_grads=True,
    )


class LogprobsEntropyFunction(torch.autograd.Function):
    """``logits [N, V]``, ``labels [N]`` int64 -> ``(logp [N], entropy [N])`` fp32, for the cpp/triton backends.

    The backward is the fused kernel; under ``create_graph`` it recomputes the eager formulas instead, so double
    backward works as on the torch backend (at the eager memory cost)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, temperature: float, backend: str):
        fwd, _ = _launchers(backend)
        logp, entropy, stats = fwd(logits, labels, temperature)
        ctx.save_for_backward(logits, labels, stats, entropy)
        ctx.temperature = temperature
        ctx.backend = backend
        ctx.set_materialize_grads(False)  # a None upstream grad skips that term, no zeros allocated
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        logits, labels, stats, entropy = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph (double backward): the eager formulas, differentiated
            outputs = reference.logprobs_entropy_math(logits, labels, ctx.temperature, True, torch.float32)
            return (*differentiable_grads(outputs, (grad_logp, grad_entropy), (logits,)), None, None, None)
        _, bwd = _launchers(ctx.backend)
        grad_logp = None if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        grad = bwd(logits, labels, stats, entropy, grad_logp, grad_entropy, ctx.temperature)
        return grad, None, None, None


def logprobs_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token log-prob and entropy of ``softmax(logits / temperature)``, without [tokens, V] temporaries.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16; any strides.
        labels: ``[...]`` integer token ids; ``-100`` (:data:`spear_kernels.IGNORE_INDEX`) marks a
            token to skip: its outputs are 0 and its row of the gradient is 0.
        temperature: ``> 0``; the distribution is ``softmax(logits / temperature)``.
        return_entropy: when False, the second output is None (its cost is the same either way).
        backend: ``"cpp"``, ``"triton"`` or ``"torch"``; None picks one (see :func:`available_backends`).

    Returns:
        ``(logp, entropy)``: fp32 tensors of shape ``[...]``, differentiable w.r.t. ``logits`` (either
        output or both may feed the loss); the gradient has the logits' dtype.

    Example:
        >>> logits = torch.randn(2, 5, 32000, requires_grad=True)
        >>> labels = torch.randint(0, 32000, (2, 5))
        >>> logp, ent = logprobs_entropy(logits, labels, temperature=0.7)
        >>> (logp.sum() + 0.01 * ent.sum()).backward()
    """
    temperature = check_logits_labels(logits, labels, temperature)
    backend = resolve_backend(backend, logits.device)
    if backend == "torch":
        return reference.logprobs_entropy(logits, labels, temperature=temperature, return_entropy=return_entropy)
    lead_shape = labels.shape
    vocab = logits.shape[-1]
    logits2d = logits.reshape(lead_shape.numel(), vocab)
    if logits2d.numel() > 0 and logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()
    logp, entropy = LogprobsEntropyFunction.apply(logits2d, labels1d, temperature, backend)
    logp = logp.view(lead_shape)
    return (logp, entropy.view(lead_shape)) if return_entropy else (logp, None)
