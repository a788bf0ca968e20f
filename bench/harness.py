"""The one benchmark harness: timing through pytest-benchmark, rows tagged for the report."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .env import machine_info

MODES = ("fwd", "bwd", "full")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(benchmark, fn: Callable[[], object], device: torch.device, budget_s: float = 3.0) -> None:
    """Times ``fn`` with pytest-benchmark: one warm-up call, then as many rounds as fit ``budget_s``
    (3..50; 2 for calls over 2 s, whose run-to-run spread is small next to their length)."""

    def call():
        out = fn()
        synchronize(device)
        return out

    start = time.perf_counter()
    call()  # warm-up: compilation, first-touch allocation
    once = max(time.perf_counter() - start, 1e-6)
    rounds = 2 if once > 2.0 else int(min(50, max(3, budget_s / once)))
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1 if once < 0.5 else 0)


def tag(benchmark, *, op: str, provider: str, mode: str, case, dtype: torch.dtype, **extra) -> None:
    """Everything the report needs to group rows and compute ratios, plus the machine they ran on."""
    benchmark.group = f"{op} | {case.id} | {str(dtype).removeprefix('torch.')} | {mode}"
    shape = {
        k: getattr(case, k)
        for k in ("model", "tokens", "hidden", "vocab", "batch", "group_size", "length")
        if hasattr(case, k)
    }
    benchmark.extra_info.update(
        {
            "op": op,
            "provider": provider,
            "mode": mode,
            "case": case.id,
            **shape,
            "dtype": str(dtype).removeprefix("torch."),
            **extra,
            **machine_info(),
        }
    )


def grads_of(loss: torch.Tensor, inputs) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


def loss_of(outputs) -> torch.Tensor:
    """The scalar both outputs feed, so every gradient path runs: sum(logp) + sum(entropy)."""
    logp, ent = outputs
    return logp.sum() + ent.sum()
