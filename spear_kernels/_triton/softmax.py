"""The base-2 online softmax both log-prob kernels share (one row per program, or a block of rows).

For a row of raw logits ``z`` at inverse temperature ``1/T``, with ``k = log2(e) / T``, the running statistics are
``m`` (max raw logit), ``S = sum 2^{(z - m) k}`` and ``D = sum (z - m) k 2^{(z - m) k}``. Then
``log Z = m / T + ln2 log2 S``, the entropy is ``ln2 (log2 S - D / S)``, and ``log2 p = (z - m) k - log2 S``.
Exponents are floored at -300 (``2^-300`` is 0 in fp32), so ``-inf`` logits contribute exactly 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E_VALUE = 1.4426950408889634
LN2_VALUE = 0.6931471805599453
# inside kernels (a jit function reads only constexpr globals)
LOG2E = tl.constexpr(LOG2E_VALUE)
LN2 = tl.constexpr(LN2_VALUE)
MIN_EXP2_ARG = tl.constexpr(-300.0)  # 2^-300 == 0 in fp32


@triton.jit
def online_softmax_update(m, s, d, z, k, AXIS: tl.constexpr):
    """Folds the logits ``z`` (reduced along ``AXIS``) into ``(m, S, D)``; returns the new triple."""
    m_new = tl.maximum(m, tl.max(z, axis=AXIS))
    # While everything seen is -inf, keep the base finite so nothing becomes -inf - -inf.
    base = tl.where(m_new == -float("inf"), 0.0, m_new)
    shift = tl.where(m == -float("inf"), 0.0, (m - base) * k)
    scale = tl.exp2(shift)
    dz = tl.maximum((z - tl.expand_dims(base, AXIS)) * k, MIN_EXP2_ARG)
    e = tl.exp2(dz)
    d = (d + s * shift) * scale + tl.sum(dz * e, axis=AXIS)
    s = s * scale + tl.sum(e, axis=AXIS)
    return m_new, s, d


@triton.jit
def log2_softmax(z, m, log2_s, k):
    """``log2 p`` of the logits ``z`` from the saved ``(m, log2 S)`` (broadcast to ``z``'s shape by the caller)."""
    return tl.maximum((z - m) * k - log2_s, MIN_EXP2_ARG)
