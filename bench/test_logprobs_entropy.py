"""logprobs_entropy: ours vs verl's eager formulas, the same under torch.compile, the torch reference,
and the streaming-read limit; time per mode and peak memory in a fresh process."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from . import providers, shapes
from .harness import MODES, loss_of, record_peak_memory, tag, time_it

CASES = shapes.LOGPROBS_ENTROPY  # parametrizes `case` (see conftest.py: full or --quick shapes)
OP = "logprobs_entropy"
DTYPES = [torch.float32, torch.bfloat16]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=1)
def inputs(case, dtype):
    """One set of inputs at a time (the largest is 1.2 GB), shared by every provider and mode."""
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(case.tokens, case.vocab, dtype=dtype).normal_(generator=g).to(DEVICE)
    labels = torch.randint(0, case.vocab, (case.tokens,), generator=g).to(DEVICE)
    return logits, labels


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(providers.LOGPROBS_ENTROPY))
def test_time(benchmark, provider, mode, dtype, case):
    reason = providers.available(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    fn = providers.LOGPROBS_ENTROPY[provider]
    logits, labels = inputs(case, dtype)
    tag(benchmark, op=OP, provider=provider, mode=mode, case=case, dtype=dtype, device=DEVICE.type)
    if mode == "fwd":
        with torch.no_grad():
            time_it(benchmark, lambda: fn(logits, labels), DEVICE)
        return
    x = logits.detach().requires_grad_(True)
    if mode == "bwd":
        loss = loss_of(fn(x, labels))
        time_it(benchmark, lambda: torch.autograd.grad(loss, x, retain_graph=True), DEVICE)
    else:
        time_it(benchmark, lambda: torch.autograd.grad(loss_of(fn(x, labels)), x), DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_limit_exp(benchmark, mode, dtype, case):
    """The compute limit: the kernels' exp2, once per logit in fwd and in bwd (twice in full), with no memory
    traffic. On AVX2 machines this, not the read, is the bound the kernel is at."""
    reason = providers.available("limit-exp", DEVICE)
    if reason:
        pytest.skip(reason)
    logits, _ = inputs(case, dtype)
    n = logits.numel() * (2 if mode == "full" else 1)
    tag(benchmark, op=OP, provider="limit-exp", mode=mode, case=case, dtype=dtype, device=DEVICE.type)
    time_it(benchmark, lambda: providers.exp_bound(n), DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_limit(benchmark, mode, dtype, case):
    """The physical limit of a memory-bound op: stream the bytes it must move.

    fwd reads the logits once; bwd reads them and writes the gradient; full does both.
    """
    reason = providers.available("limit", DEVICE)
    if reason:
        pytest.skip(reason)
    logits, _ = inputs(case, dtype)
    grad = torch.zeros_like(logits)  # pre-faulted: this measures bandwidth, not page faults
    tag(benchmark, op=OP, provider="limit", mode=mode, case=case, dtype=dtype, device=DEVICE.type)
    steps = {
        "fwd": lambda: providers.stream_read(logits),
        "bwd": lambda: (providers.stream_read(logits), grad.fill_(0.5)),
        "full": lambda: (providers.stream_read(logits), providers.stream_read(logits), grad.fill_(0.5)),
    }
    time_it(benchmark, steps[mode], DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["cpp", "verl", "verl-compile", "torch"])
def test_peak_memory(benchmark, provider, dtype, case):
    """Peak RSS of fwd+bwd in a fresh process (see bench/memory.py); recorded in extra_info."""
    reason = providers.available(provider, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    result = record_peak_memory(benchmark, op=OP, provider=provider, case=case, dtype=dtype)
    assert result["extra_bytes"] > 0
