"""Shared test helpers: one place that explains a mismatch."""

from __future__ import annotations

import torch


def explain_mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> str:
    a, e = actual.detach().double(), expected.detach().double()
    both_nan = a.isnan() & e.isnan()
    same_inf = a.isinf() & e.isinf() & (a == e)
    diff = (a - e).abs().masked_fill(both_nan | same_inf, 0.0)
    bad = (diff > atol + rtol * e.abs().nan_to_num(0.0, 0.0, 0.0)) | (a.isnan() != e.isnan())
    bad_idx = bad.nonzero()[:5].tolist()
    finite = diff[diff.isfinite()]
    return (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
        f"max abs diff {finite.max().item() if finite.numel() else float('nan'):.3e}; "
        f"first bad indices {bad_idx}; actual {[a[tuple(i)].item() for i in bad_idx]}, "
        f"expected {[e[tuple(i)].item() for i in bad_idx]}"
    )


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    try:
        torch.testing.assert_close(
            actual.detach().double(), expected.detach().double(), atol=atol, rtol=rtol, equal_nan=True
        )
    except AssertionError:
        raise AssertionError(explain_mismatch(name, actual, expected, atol, rtol)) from None


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    d = (actual.detach().double() - expected.detach().double()).abs()
    return d.max().item() if d.numel() else 0.0


def run_with_grads(
    fn,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    temperature: float,
    g_lp: torch.Tensor | None,
    g_h: torch.Tensor | None,
    **kw,
):
    """``fn(*inputs, labels, temperature=..., **kw) -> (logp, entropy)``, then backward with the upstream grads
    (None = that output unused). Returns ``(logp, entropy, *input grads)``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    lp, ent = fn(*leaves, labels, temperature=temperature, **kw)
    loss = 0.0
    if g_lp is not None:
        loss = loss + (lp * g_lp).sum()
    if g_h is not None:
        loss = loss + (ent * g_h).sum()
    loss.backward()
    return (lp.detach(), ent.detach(), *(t.grad for t in leaves))
