"""Triton kernels for group statistics and GRPO advantages (GPU path; tested under TRITON_INTERPRET=1).

Two passes of per-sample atomics into fp64 per-group accumulators (sum and count, then the
centred squares), then one elementwise pass for the advantages. fp64 accumulation keeps the
result independent of the order atomics land in, to within fp32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _group_sum_kernel(scores_ptr, inverse_ptr, sum_ptr, count_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    s = tl.load(scores_ptr + offs, mask=inb, other=0.0).to(tl.float64)
    g = tl.load(inverse_ptr + offs, mask=inb, other=0)
    tl.atomic_add(sum_ptr + g, s, mask=inb)
    tl.atomic_add(count_ptr + g, tl.full([BLOCK], 1.0, tl.float64), mask=inb)


@triton.jit
def _group_sq_kernel(scores_ptr, inverse_ptr, mean_ptr, sq_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    s = tl.load(scores_ptr + offs, mask=inb, other=0.0).to(tl.float64)
    g = tl.load(inverse_ptr + offs, mask=inb, other=0)
    c = s - tl.load(mean_ptr + g, mask=inb, other=0.0)
    tl.atomic_add(sq_ptr + g, c * c, mask=inb)


@triton.jit
def _group_adv_kernel(
    scores_ptr, inverse_ptr, mean_ptr, std_ptr, adv_ptr, n, eps, NORM: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    s = tl.load(scores_ptr + offs, mask=inb, other=0.0).to(tl.float64)
    g = tl.load(inverse_ptr + offs, mask=inb, other=0)
    a = s - tl.load(mean_ptr + g, mask=inb, other=0.0)
    if NORM:
        a = a / (tl.load(std_ptr + g, mask=inb, other=1.0) + eps)
    tl.store(adv_ptr + offs, a.to(tl.float32), mask=inb)


def group_advantages(scores, inverse, groups: int, norm_by_std: bool, eps: float, with_advantages: bool = True):
    """fp32 or fp64 ``scores [B]``, ``inverse [B]`` int64 -> fp32 ``(mean [G], std [G], count [G], advantages [B]
    or None)``; the statistics and the advantages are computed in fp64."""
    n, device = scores.numel(), scores.device
    sums = torch.zeros(groups, device=device, dtype=torch.float64)
    counts = torch.zeros(groups, device=device, dtype=torch.float64)
    squares = torch.zeros(groups, device=device, dtype=torch.float64)
    grid = (triton.cdiv(max(n, 1), BLOCK),)
    if n > 0:
        _group_sum_kernel[grid](scores, inverse, sums, counts, n, BLOCK=BLOCK)
    mean64 = sums / counts.clamp_min(1.0)
    if n > 0:
        _group_sq_kernel[grid](scores, inverse, mean64, squares, n, BLOCK=BLOCK)
    single = counts <= 1.0
    mean64 = mean64.masked_fill(single, 0.0)
    std64 = (squares / (counts - 1.0).clamp_min(1.0)).sqrt().masked_fill(single, 1.0)
    adv = None
    if with_advantages:
        adv = torch.empty(n, device=device, dtype=torch.float32)
        if n > 0:
            _group_adv_kernel[grid](scores, inverse, mean64, std64, adv, n, eps, NORM=norm_by_std, BLOCK=BLOCK)
    return mean64.float(), std64.float(), counts.float(), adv


def aot_specs() -> list[dict]:
    common = {"scores_ptr": "*fp32", "inverse_ptr": "*i64"}
    return [
        {
            "name": "group_sum",
            "fn": _group_sum_kernel,
            "signature": {**common, "sum_ptr": "*fp64", "count_ptr": "*fp64", "n": "i32", "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": BLOCK},
            "num_warps": 4,
        },
        {
            "name": "group_sq",
            "fn": _group_sq_kernel,
            "signature": {**common, "mean_ptr": "*fp64", "sq_ptr": "*fp64", "n": "i32", "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": BLOCK},
            "num_warps": 4,
        },
        {
            "name": "group_adv",
            "fn": _group_adv_kernel,
            "signature": {
                **common,
                "mean_ptr": "*fp64",
                "std_ptr": "*fp64",
                "adv_ptr": "*fp32",
                "n": "i32",
                "eps": "fp32",
                "NORM": "constexpr",
                "BLOCK": "constexpr",
            },
            "constexprs": {"NORM": True, "BLOCK": BLOCK},
            "num_warps": 4,
        },
    ]
