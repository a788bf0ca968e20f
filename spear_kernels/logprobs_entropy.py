"""``logprobs_entropy``: token log-prob and entropy of softmax(logits / T), fused, with autograd.

Layers (one name throughout): Triton kernels in :mod:`spear_kernels._triton.logprobs_entropy`
and C++ kernels in ``csrc/logprobs_entropy_kernel.cpp`` -> ``logprobs_entropy_fwd`` /
``logprobs_entropy_bwd`` launchers per backend -> the custom ops ``torch.ops.spear_kernels.logprobs_entropy``
(+ ``_backward``, :mod:`spear_kernels._ops`) with the autograd registered here ->
:func:`logprobs_entropy`. The eager twin is :func:`spear_kernels.reference.logprobs_entropy`.
"""

from __future__ import annotations

import torch

from . import _ops, reference
from ._backend import resolve_backend
from ._validation import check_logits_labels


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


def f32_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def _grad_logits(saved, grad_logp, grad_entropy, temperature: float, bwd) -> torch.Tensor | None:
    """The fused backward ``bwd``; under ``create_graph`` the eager formulas, differentiated instead, so double
    backward works as on the torch backend (at the eager memory cost). A None upstream grad skips its term."""
    if grad_logp is None and grad_entropy is None:
        return None
    logits, labels, stats, entropy = saved
    if torch.is_grad_enabled():
        outputs = reference.logprobs_entropy_math(logits, labels, temperature, True, torch.float32)
        return differentiable_grads(outputs, (grad_logp, grad_entropy), (logits,))[0]
    return bwd(logits, labels, stats, entropy, f32_or_none(grad_logp), f32_or_none(grad_entropy), temperature)


# autograd of the custom op ``torch.ops.spear_kernels.logprobs_entropy`` (both kernel backends)
def _setup_context(ctx, inputs, output):
    logits, labels, temperature, backend = inputs
    _, entropy, stats = output
    ctx.save_for_backward(logits, labels, stats, entropy)
    ctx.temperature, ctx.backend = temperature, backend
    ctx.set_materialize_grads(False)  # a None upstream grad skips that term, no zeros allocated


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    def bwd(*args):
        return _ops.logprobs_entropy_backward(*args, ctx.backend)

    return _grad_logits(ctx.saved_tensors, grad_logp, grad_entropy, ctx.temperature, bwd), None, None, None


_ops.logprobs_entropy.register_autograd(_backward, setup_context=_setup_context)


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
        temperature: ``>= 1e-5`` and finite; the distribution is ``softmax(logits / temperature)``.
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
    logp, entropy, _ = _ops.logprobs_entropy(logits2d, labels1d, temperature, backend)
    logp = logp.view(lead_shape)
    return (logp, entropy.view(lead_shape)) if return_entropy else (logp, None)
