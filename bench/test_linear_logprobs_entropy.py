"""linear_logprobs_entropy (fused lm_head): ours vs eager (matmul + verl's formulas), verl's FusedLinearForPPO,
Liger-Kernel's fused linear cross-entropy, the torch reference, and the limit: the bare GEMMs the op must do."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from . import providers, shapes
from .harness import MODES, loss_of, record_peak_memory, tag, time_it

CASES = shapes.LINEAR_LOGPROBS_ENTROPY  # parametrizes `case` (see conftest.py: full or --quick shapes)
OP = "linear_logprobs_entropy"
DTYPES = [torch.float32, torch.bfloat16]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=1)
def inputs(case, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(case.tokens, case.hidden, generator=g).to(dtype)
    weight = (torch.randn(case.vocab, case.hidden, generator=g) * 0.02).to(dtype)
    labels = torch.randint(0, case.vocab, (case.tokens,), generator=g)
    return hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(providers.LINEAR_LOGPROBS_ENTROPY))
def test_time(benchmark, provider, mode, dtype, case):
    reason = providers.available(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    fn = providers.LINEAR_LOGPROBS_ENTROPY[provider]
    hidden, weight, labels = inputs(case, dtype)
    tag(benchmark, op=OP, provider=provider, mode=mode, case=case, dtype=dtype, device=DEVICE.type)
    if mode == "fwd":
        with torch.no_grad():
            time_it(benchmark, lambda: fn(hidden, weight, labels), DEVICE)
        return
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    if mode == "bwd":
        loss = loss_of(fn(h, w, labels))
        time_it(benchmark, lambda: torch.autograd.grad(loss, (h, w), retain_graph=True), DEVICE)
    else:
        time_it(benchmark, lambda: torch.autograd.grad(loss_of(fn(h, w, labels)), (h, w)), DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_limit(benchmark, mode, dtype, case):
    """The GEMMs the op cannot avoid: fwd h @ W^T; bwd the recompute, dZ @ W and dZ^T @ h; full all four."""
    hidden, weight, _ = inputs(case, dtype)
    dz = torch.randn(case.tokens, case.vocab, device=DEVICE).to(dtype)
    gemms = {
        "fwd": lambda: hidden @ weight.T,
        "bwd": lambda: (hidden @ weight.T, dz @ weight, dz.T @ hidden),
        "full": lambda: (hidden @ weight.T, hidden @ weight.T, dz @ weight, dz.T @ hidden),
    }
    tag(benchmark, op=OP, provider="limit", mode=mode, case=case, dtype=dtype, device=DEVICE.type)
    time_it(benchmark, gemms[mode], DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["cpp", "torch", "verl", "verl-fused", "liger"])
def test_peak_memory(benchmark, provider, dtype, case):
    """Peak RSS of fwd+bwd in a fresh process (see bench/memory.py); recorded in extra_info."""
    reason = providers.available(provider, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    result = record_peak_memory(benchmark, op=OP, provider=provider, case=case, dtype=dtype)
    assert result["extra_bytes"] > 0
