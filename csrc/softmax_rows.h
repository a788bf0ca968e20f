// Softmax row statistics shared by the kernel files (included once per CPU capability).
//
// A row (or a chunk of a row: the fused-linear op sees the vocabulary chunk by chunk) is
// walked in blocks of kBlock elements that stay in L1: a max over the block, then the exps.
// The running max M only moves at block boundaries, so the double totals are rescaled once
// per block, never per element:
//   S = sum_j 2^{d_j},  D = sum_j d_j 2^{d_j},   d_j = (z_j - M) log2(e) / T
//   lse = M / T + ln2 log2 S,   H = lse - E_p[z / T] = ln2 (log2 S - D / S).
// M is the raw max logit and d_j is formed from (z_j - M), as torch's log_softmax does: exact
// (0) for the max element, so a dominant logit gets p = 1 and a zero gradient exactly.
// -inf logits: d is clamped to kMinExp2Arg, so they give p = 0 and d p = 0, not -inf * 0 = NaN.
#pragma once

#include "kernels.h"
#include "vec_utils.h"

#include <algorithm>

namespace spear_kernels {
inline namespace CPU_CAPABILITY {

constexpr int64_t kBlock = 2048;  // 8 KB of fp32: the block max pass and the exp pass both hit L1
constexpr int kUnroll = 4;        // independent accumulators to cover the FMA/exp latency
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline float block_max(const T* z, int64_t n) {
  constexpr int64_t W = Vec::size();
  Vec m0(kNegInf), m1(kNegInf);
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    m0 = at::vec::maximum(m0, load_as_float(z + j));
    m1 = at::vec::maximum(m1, load_as_float(z + j + W));
  }
  for (; j + W <= n; j += W) m0 = at::vec::maximum(m0, load_as_float(z + j));
  m0 = at::vec::maximum(m0, m1);
  alignas(64) float lanes[W];
  m0.store(lanes);
  float m = kNegInf;
  for (int64_t k = 0; k < W; ++k) m = std::max(m, lanes[k]);
  for (; j < n; ++j) m = std::max(m, static_cast<float>(z[j]));
  return m;
}

// Adds z[0..n) to a row's running statistics (k = log2(e) / T).
template <typename T>
inline void accumulate_row(const T* z, int64_t n, float k, SoftmaxRowState& st) {
  constexpr int64_t W = Vec::size();
  const Vec vk(k), vmin(kMinExp2Arg);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    const T* zb = z + b;
    const float bmax = block_max(zb, len);
    if (bmax > st.max_z) {
      if (st.max_z != kNegInf) {
        // Move the totals from base M to base bmax: 2^{d_old} = 2^{d_new} 2^{diff}.
        const double diff = static_cast<double>(st.max_z - bmax) * k, scale = std::exp2(diff);
        st.d = (st.d + st.s * diff) * scale;
        st.s *= scale;
      }
      st.max_z = bmax;
    }
    if (st.max_z == kNegInf) continue;  // nothing but -inf so far
    // Lanes hold one block's partial sums (at most kBlock / (kUnroll W) terms each); blocks are
    // summed in double, because a long row of bf16 logits has many equal terms whose fp32
    // rounding errors do not cancel.
    const Vec vm(st.max_z);
    Vec S[kUnroll], D[kUnroll];
    for (int u = 0; u < kUnroll; ++u) S[u] = D[u] = Vec(0.f);
    int64_t j = 0;
    for (; j + kUnroll * W <= len; j += kUnroll * W) {
      for (int u = 0; u < kUnroll; ++u) {
        const Vec d = at::vec::maximum((load_as_float(zb + j + u * W) - vm) * vk, vmin);
        const Vec e = exp2_clamped(d);
        S[u] = S[u] + e;
        D[u] = at::vec::fmadd(d, e, D[u]);
      }
    }
    for (; j + W <= len; j += W) {
      const Vec d = at::vec::maximum((load_as_float(zb + j) - vm) * vk, vmin);
      const Vec e = exp2_clamped(d);
      S[0] = S[0] + e;
      D[0] = at::vec::fmadd(d, e, D[0]);
    }
    for (int u = 1; u < kUnroll; ++u) {
      S[0] = S[0] + S[u];
      D[0] = D[0] + D[u];
    }
    alignas(64) float s_lanes[W], d_lanes[W];
    S[0].store(s_lanes);
    D[0].store(d_lanes);
    for (int64_t l = 0; l < W; ++l) {
      st.s += s_lanes[l];
      st.d += d_lanes[l];
    }
    for (; j < len; ++j) {
      const float d = std::max((static_cast<float>(zb[j]) - st.max_z) * k, kMinExp2Arg);
      const float e = std::exp2(d);
      st.s += e;
      st.d += d * e;
    }
  }
}

struct RowResult {
  float log2_s;
  float entropy;
};

inline RowResult finish_row(const SoftmaxRowState& st) {
  if (st.max_z == kNegInf) {
    // Every logit is -inf: the distribution is undefined, as in torch.log_softmax.
    return {kNegInf, std::numeric_limits<float>::quiet_NaN()};
  }
  const double log2_s = std::log2(st.s);
  return {static_cast<float>(log2_s), static_cast<float>(kLn2 * (log2_s - st.d / st.s))};
}

// Gradient of g_lp * logp + g_h * H w.r.t. the logits z[0..n) of a row (or a chunk of one):
//   dz_j = p_j (a + b d_j) + 1[j = y] g_lp / T,  d_j = x_j - lse = ln2 d2_j,  p_j = 2^{d2_j},
//   d2_j = (z_j - max_z) k - log2 S,  a = -(g_lp + g_h H) / T,  b = -g_h / T.
// `y` is the label's column within this chunk, or -1 if it lies elsewhere. dz may alias z.
template <typename T>
inline void row_gradient(const T* z, T* dz, int64_t n, int64_t y, float inv_t, float max_z, float log2_s, float H,
                         float g_lp, float g_h) {
  constexpr int64_t W = Vec::size();
  const float a = -inv_t * (g_lp + g_h * H);
  const float b2 = -inv_t * g_h * kLn2;
  const float k = inv_t * kLog2e;
  const float z_y = (y >= 0 && y < n) ? static_cast<float>(z[y]) : 0.f;  // read before dz overwrites it
  const Vec va(a), vb2(b2), vk(k), vm(max_z), vneg_log2_s(-log2_s), vmin(kMinExp2Arg);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec d2 = at::vec::maximum(at::vec::fmadd(load_as_float(z + j) - vm, vk, vneg_log2_s), vmin);
    const Vec p = exp2_clamped(d2);
    store_from_float(dz + j, p * at::vec::fmadd(vb2, d2, va));
  }
  for (; j < n; ++j) {
    const float d2 = std::max((static_cast<float>(z[j]) - max_z) * k - log2_s, kMinExp2Arg);
    dz[j] = static_cast<T>(std::exp2(d2) * (a + b2 * d2));
  }
  if (y >= 0 && y < n) {
    // The label column, recomputed in fp32 so the one-hot term is not added in T's precision.
    const float d2_y = std::max((z_y - max_z) * k - log2_s, kMinExp2Arg);
    dz[y] = static_cast<T>(std::exp2(d2_y) * (a + b2 * d2_y) + inv_t * g_lp);
  }
}

inline int64_t grain_rows(int64_t V) {
  // Rows are independent; keep at least ~64K elements per task so tiny V does not drown in overhead.
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1));
}

}  // namespace CPU_CAPABILITY
}  // namespace spear_kernels
