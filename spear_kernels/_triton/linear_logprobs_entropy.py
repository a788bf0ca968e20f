"""Triton kernels for the fused lm_head + log-prob/entropy op (GPU path; tested under TRITON_INTERPRET=1).

Forward: program (token block, vocab split) computes logit tiles ``hidden[BT] @ weight[BV]^T`` with
``tl.dot`` (fp32 accumulation) and folds each tile into per-row online statistics in base 2, as
the logprobs_entropy kernel does: ``m`` (max raw logit), ``S = sum 2^d``, ``D = sum d 2^d`` with
``d = (z - m) log2(e) / T``. Tiles never reach memory; each split writes ``(m, S, D)`` per row and a
tiny torch step merges the splits. Backward: program (token block, vocab block) recomputes its
tile, forms ``dz`` in registers and atomically adds ``dz @ W`` and ``dz^T @ h`` into fp32 gradient
buffers (the Cut-Cross-Entropy scheme).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpret
from .._validation import IGNORE_INDEX
from .softmax import LN2, LN2_VALUE, LOG2E, LOG2E_VALUE, log2_softmax, online_softmax_update

BLOCK_T, BLOCK_V, BLOCK_K = 64, 64, 64
NUM_WARPS = 4


@triton.jit
def _logit_tile(
    h_ptr,
    w_ptr,
    t_offs,
    v_offs,
    N,
    V,
    H,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(
            h_ptr + t_offs[:, None] * H + k_offs[None, :], mask=(t_offs[:, None] < N) & (k_offs[None, :] < H), other=0.0
        )
        w = tl.load(
            w_ptr + v_offs[:, None] * H + k_offs[None, :], mask=(v_offs[:, None] < V) & (k_offs[None, :] < H), other=0.0
        )
        if DOT_FP32:
            acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(h, tl.trans(w))
    return acc


@triton.jit
def _linear_fwd_kernel(
    h_ptr,
    w_ptr,
    labels_ptr,
    part_ptr,
    label_logit_ptr,
    N,
    V,
    H,
    blocks_per_split,
    inv_t,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    labels = tl.load(labels_ptr + t_offs, mask=t_offs < N, other=-1)
    k = inv_t * LOG2E
    m = tl.full([BLOCK_T], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    d = tl.zeros([BLOCK_T], dtype=tl.float32)
    for vb in range(0, blocks_per_split):
        v_offs = (split * blocks_per_split + vb) * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _logit_tile(h_ptr, w_ptr, t_offs, v_offs, N, V, H, BLOCK_T, BLOCK_V, BLOCK_K, DOT_FP32)
        z = tl.where(v_offs[None, :] < V, z, -float("inf"))
        hit = v_offs[None, :] == labels[:, None]
        z_label = tl.sum(tl.where(hit, z, 0.0), axis=1)
        found = tl.sum(hit.to(tl.int32), axis=1) > 0
        tl.store(label_logit_ptr + t_offs, z_label, mask=found & (t_offs < N))
        m, s, d = online_softmax_update(m, s, d, z, k, 1)
    out = part_ptr + (split * N + t_offs) * 3
    tl.store(out, m, mask=t_offs < N)
    tl.store(out + 1, s, mask=t_offs < N)
    tl.store(out + 2, d, mask=t_offs < N)


@triton.jit
def _linear_bwd_kernel(
    h_ptr,
    w_ptr,
    labels_ptr,
    stats_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_h_ptr,
    grad_w_ptr,
    N,
    V,
    H,
    inv_t,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    IGNORE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    v_offs = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    t_in = t_offs < N
    labels = tl.load(labels_ptr + t_offs, mask=t_in, other=IGNORE)
    g_lp = tl.zeros([BLOCK_T], dtype=tl.float32)
    g_h = tl.zeros([BLOCK_T], dtype=tl.float32)
    if HAS_GRAD_LOGP:
        g_lp = tl.load(grad_logp_ptr + t_offs, mask=t_in, other=0.0)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + t_offs, mask=t_in, other=0.0)
    active = labels != IGNORE
    g_lp = tl.where(active, g_lp, 0.0)
    g_h = tl.where(active, g_h, 0.0)
    m = tl.load(stats_ptr + 2 * t_offs, mask=t_in, other=0.0)
    log2_s = tl.load(stats_ptr + 2 * t_offs + 1, mask=t_in, other=0.0)
    entropy = tl.load(entropy_ptr + t_offs, mask=t_in, other=0.0)
    k = inv_t * LOG2E
    a = -inv_t * (g_lp + g_h * entropy)
    b2 = -inv_t * g_h * LN2
    z = _logit_tile(h_ptr, w_ptr, t_offs, v_offs, N, V, H, BLOCK_T, BLOCK_V, BLOCK_K, DOT_FP32)
    d2 = log2_softmax(z, m[:, None], log2_s[:, None], k)
    p = tl.where(active[:, None], tl.exp2(d2), 0.0)
    dz = p * (a[:, None] + b2[:, None] * d2)
    dz = tl.where(v_offs[None, :] == labels[:, None], dz + inv_t * g_lp[:, None], dz)
    dz = tl.where((v_offs[None, :] < V) & t_in[:, None], dz, 0.0)
    for k0 in range(0, H, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_in = k_offs < H
        w = tl.load(
            w_ptr + v_offs[:, None] * H + k_offs[None, :], mask=(v_offs[:, None] < V) & k_in[None, :], other=0.0
        )
        h = tl.load(h_ptr + t_offs[:, None] * H + k_offs[None, :], mask=t_in[:, None] & k_in[None, :], other=0.0)
        if DOT_FP32:
            gh = tl.dot(dz, w.to(tl.float32), input_precision="ieee")
            gw = tl.dot(tl.trans(dz), h.to(tl.float32), input_precision="ieee")
        else:
            dz_lp = dz.to(w.dtype)
            gh = tl.dot(dz_lp, w)
            gw = tl.dot(tl.trans(dz_lp), h)
        tl.atomic_add(grad_h_ptr + t_offs[:, None] * H + k_offs[None, :], gh, mask=t_in[:, None] & k_in[None, :])
        tl.atomic_add(
            grad_w_ptr + v_offs[:, None] * H + k_offs[None, :], gw, mask=(v_offs[:, None] < V) & k_in[None, :]
        )


def _dot_fp32(dtype: torch.dtype) -> bool:
    # fp32 inputs use IEEE fp32 dots (not TF32); the CPU interpreter has no bf16 arithmetic.
    return dtype == torch.float32 or triton_interpret()


def linear_logprobs_entropy_fwd(hidden, weight, labels, temperature: float):
    """``hidden [N, H]``, ``weight [V, H]`` (contiguous), ``labels [N]`` -> fp32 ``(logp, entropy, stats)``."""
    n, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    if n == 0:
        return torch.empty(0, device=device), torch.empty(0, device=device), torch.empty(0, 2, device=device)
    v_blocks = triton.cdiv(vocab, BLOCK_V)
    t_blocks = triton.cdiv(n, BLOCK_T)
    # Enough vocab splits to fill the GPU when there are few token blocks.
    splits = max(1, min(v_blocks, 256 // t_blocks))
    per_split = triton.cdiv(v_blocks, splits)
    splits = triton.cdiv(v_blocks, per_split)
    part = torch.empty(splits, n, 3, device=device, dtype=torch.float32)
    label_logit = torch.zeros(n, device=device, dtype=torch.float32)
    _linear_fwd_kernel[(t_blocks, splits)](
        hidden,
        weight,
        labels,
        part,
        label_logit,
        n,
        vocab,
        dim,
        per_split,
        1.0 / temperature,
        BLOCK_T=BLOCK_T,
        BLOCK_V=BLOCK_V,
        BLOCK_K=BLOCK_K,
        DOT_FP32=_dot_fp32(hidden.dtype),
        num_warps=NUM_WARPS,
    )
    # Merge the splits: rebase each (S, D) from its own max to the global one.
    k = LOG2E_VALUE / temperature
    m_i, s_i, d_i = part.unbind(-1)
    m = m_i.max(0).values
    live = s_i > 0
    shift = torch.where(live, (m_i - m) * k, torch.zeros_like(m_i))
    scale = torch.where(live, torch.exp2(shift), torch.zeros_like(m_i))
    s = (s_i * scale).sum(0)
    d = ((d_i + s_i * shift) * scale).sum(0)
    log2_s = torch.log2(s)
    entropy = LN2_VALUE * (log2_s - d / s)
    logp = (label_logit - m) / temperature - LN2_VALUE * log2_s
    ignore = labels == IGNORE_INDEX
    zero = torch.zeros_like(logp)
    stats = torch.stack([torch.where(ignore, zero, m), torch.where(ignore, zero, log2_s)], dim=1)
    return torch.where(ignore, zero, logp), torch.where(ignore, zero, entropy), stats.contiguous()


def linear_logprobs_entropy_bwd(hidden, weight, labels, stats, entropy, grad_logp, grad_entropy, temperature: float):
    """``(grad_hidden [N, H], grad_weight [V, H])`` in the inputs' dtype, accumulated in fp32."""
    n, dim = hidden.shape
    vocab = weight.shape[0]
    grad_h = torch.zeros(n, dim, device=hidden.device, dtype=torch.float32)
    grad_w = torch.zeros(vocab, dim, device=hidden.device, dtype=torch.float32)
    if n > 0 and vocab > 0:
        _linear_bwd_kernel[(triton.cdiv(n, BLOCK_T), triton.cdiv(vocab, BLOCK_V))](
            hidden,
            weight,
            labels,
            stats,
            entropy,
            grad_logp if grad_logp is not None else entropy,
            grad_entropy if grad_entropy is not None else entropy,
            grad_h,
            grad_w,
            n,
            vocab,
            dim,
            1.0 / temperature,
            HAS_GRAD_LOGP=grad_logp is not None,
            HAS_GRAD_ENTROPY=grad_entropy is not None,
            IGNORE=IGNORE_INDEX,
            BLOCK_T=BLOCK_T,
            BLOCK_V=BLOCK_V,
            BLOCK_K=BLOCK_K,
            DOT_FP32=_dot_fp32(hidden.dtype),
            num_warps=NUM_WARPS,
        )
    return grad_h.to(hidden.dtype), grad_w.to(weight.dtype)


def aot_specs() -> list[dict]:
    specs = []
    for dtype in ("fp32", "bf16"):
        blocks = {"BLOCK_T": BLOCK_T, "BLOCK_V": BLOCK_V, "BLOCK_K": BLOCK_K, "DOT_FP32": dtype == "fp32"}
        specs.append(
            {
                "name": f"linear_logprobs_entropy_fwd[{dtype}]",
                "fn": _linear_fwd_kernel,
                "signature": {
                    "h_ptr": f"*{dtype}",
                    "w_ptr": f"*{dtype}",
                    "labels_ptr": "*i64",
                    "part_ptr": "*fp32",
                    "label_logit_ptr": "*fp32",
                    "N": "i32",
                    "V": "i32",
                    "H": "i32",
                    "blocks_per_split": "i32",
                    "inv_t": "fp32",
                    **dict.fromkeys(blocks, "constexpr"),
                },
                "constexprs": blocks,
                "num_warps": NUM_WARPS,
            }
        )
        flags = {"HAS_GRAD_LOGP": True, "HAS_GRAD_ENTROPY": True, "IGNORE": IGNORE_INDEX, **blocks}
        specs.append(
            {
                "name": f"linear_logprobs_entropy_bwd[{dtype}]",
                "fn": _linear_bwd_kernel,
                "signature": {
                    "h_ptr": f"*{dtype}",
                    "w_ptr": f"*{dtype}",
                    "labels_ptr": "*i64",
                    "stats_ptr": "*fp32",
                    "entropy_ptr": "*fp32",
                    "grad_logp_ptr": "*fp32",
                    "grad_entropy_ptr": "*fp32",
                    "grad_h_ptr": "*fp32",
                    "grad_w_ptr": "*fp32",
                    "N": "i32",
                    "V": "i32",
                    "H": "i32",
                    "inv_t": "fp32",
                    **dict.fromkeys(flags, "constexpr"),
                },
                "constexprs": flags,
                "num_warps": NUM_WARPS,
            }
        )
    return specs
