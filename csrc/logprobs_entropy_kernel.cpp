// Token log-prob and entropy of softmax(z / T), one row (token) at a time.
//
// This file is compiled once per CPU capability (DEFAULT, AVX2, AVX512; see
// CMakeLists.txt); CPU_CAPABILITY names the namespace its symbols land in and
// at::vec::Vectorized<float> is 16, 8 or 1-lane-emulated wide accordingly.
//
// Forward, per row: the row is read from memory once. It is walked in blocks of
// kBlock elements that stay in L1: a max over the block, then the exps. The
// running max M is shared by all lanes and only moves at block boundaries, so
// the (double) block totals are rescaled once per block, never per element:
//   S = sum_j e^{x_j - M},  D = sum_j (x_j - M) e^{x_j - M},   x = z / T
//   lse = M + log S,        H = lse - E_p[x] = log S - D / S.
// M is kept as the raw max logit and x_j - M formed as (z_j - max z) / T, as torch's
// log_softmax does: exact (0) for the max element, so a row with one dominant logit
// gets p = 1 and a zero gradient exactly. The backward gets (max z, log S) per row
// rather than lse, whose rounding at |lse| ~ 50 would be ~4e-6 in every p.
// Backward, per row (one read of z, one write of dz):
//   dz_j = (g_lp (1[j=y] - p_j) - g_H p_j (x_j - E_p[x])) / T,  p_j = e^{x_j - lse},
// with x_j - E_p[x] = (x_j - lse) + H.
// The kernels work in base 2 (x2 = x log2(e)), so the exp is one exp2 and the
// 1/T and log2(e) scalings are one multiply. -inf logits: x2 - M2 is clamped
// to kMinExp2Arg, so they give p = 0 and (x2 - M2) p = 0 exactly, not -inf * 0 = NaN.
#include "kernels.h"
#include "vec_utils.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace spear_kernels {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kBlock = 2048;   // 8 KB of fp32: the block max pass and the exp pass both hit L1
constexpr int kUnroll = 4;         // independent accumulators to cover the FMA/exp latency
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
float block_max(const T* z, int64_t n) {
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

struct RowStats {
  float max_z;   // max logit (raw, not divided by T)
  float log2_s;  // log2 sum_j 2^{(z_j - max_z) k}, k = log2(e) / T
  float entropy;
};

template <typename T>
RowStats row_forward(const T* z, int64_t V, float inv_t) {
  constexpr int64_t W = Vec::size();
  const float k = inv_t * kLog2e;  // (z - M) -> base-2 exponent
  float M = kNegInf;                // running max logit
  // sum 2^{d} and sum d 2^{d}, d = (z - M) k. Vector lanes hold one block's partial sums
  // (at most kBlock / (kUnroll W) terms each); blocks are summed in double, because a long
  // row of bf16 logits has many equal terms whose fp32 rounding errors do not cancel.
  double s_total = 0.0, d_total = 0.0;
  const Vec vk(k), vmin(kMinExp2Arg);

  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    const T* zb = z + b;
    const float bmax = block_max(zb, n);
    if (bmax > M) {
      if (M != kNegInf) {
        // Move the totals from base M to base bmax: 2^{d_old} = 2^{d_new} 2^{diff}.
        const double diff = static_cast<double>(M - bmax) * k, scale = std::exp2(diff);
        d_total = (d_total + s_total * diff) * scale;
        s_total *= scale;
      }
      M = bmax;
    }
    if (M == kNegInf) continue;  // nothing but -inf so far
    const Vec vm(M);
    Vec S[kUnroll], D[kUnroll];
    for (int u = 0; u < kUnroll; ++u) S[u] = D[u] = Vec(0.f);
    int64_t j = 0;
    for (; j + kUnroll * W <= n; j += kUnroll * W) {
      for (int u = 0; u < kUnroll; ++u) {
        const Vec d = at::vec::maximum((load_as_float(zb + j + u * W) - vm) * vk, vmin);
        const Vec e = exp2_clamped(d);
        S[u] = S[u] + e;
        D[u] = at::vec::fmadd(d, e, D[u]);
      }
    }
    for (; j + W <= n; j += W) {
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
      s_total += s_lanes[l];
      d_total += d_lanes[l];
    }
    for (; j < n; ++j) {
      const float d = std::max((static_cast<float>(zb[j]) - M) * k, kMinExp2Arg);
      const float e = std::exp2(d);
      s_total += e;
      d_total += d * e;
    }
  }
  if (M == kNegInf) {
    // Every logit is -inf: the distribution is undefined, as in torch.log_softmax.
    return {kNegInf, kNegInf, std::numeric_limits<float>::quiet_NaN()};
  }
  // H = lse - E[x] = ln2 (log2 S - D / S).
  const double log2_s = std::log2(s_total);
  return {M, static_cast<float>(log2_s), static_cast<float>(kLn2 * (log2_s - d_total / s_total))};
}

template <typename T>
void row_backward(const T* z, T* dz, int64_t V, int64_t y, float inv_t, float max_z, float log2_s, float H,
                  float g_lp, float g_h) {
  constexpr int64_t W = Vec::size();
  // dz_j = p_j (a + b d_j) + 1[j=y] g_lp / T, with d_j = x_j - lse = ln2 * d2_j, p_j = 2^{d2_j},
  // d2_j = (z_j - max_z) k - log2 S.
  const float a = -inv_t * (g_lp + g_h * H);
  const float b2 = -inv_t * g_h * kLn2;
  const float k = inv_t * kLog2e;
  const Vec va(a), vb2(b2), vk(k), vm(max_z), vneg_log2_s(-log2_s), vmin(kMinExp2Arg);
  int64_t j = 0;
  for (; j + W <= V; j += W) {
    const Vec d2 = at::vec::maximum(at::vec::fmadd(load_as_float(z + j) - vm, vk, vneg_log2_s), vmin);
    const Vec p = exp2_clamped(d2);
    store_from_float(dz + j, p * at::vec::fmadd(vb2, d2, va));
  }
  for (; j < V; ++j) {
    const float d2 = std::max((static_cast<float>(z[j]) - max_z) * k - log2_s, kMinExp2Arg);
    dz[j] = static_cast<T>(std::exp2(d2) * (a + b2 * d2));
  }
  // The label column, recomputed in fp32 so the one-hot term is not added in T's precision.
  const float d2_y = std::max((static_cast<float>(z[y]) - max_z) * k - log2_s, kMinExp2Arg);
  dz[y] = static_cast<T>(std::exp2(d2_y) * (a + b2 * d2_y) + inv_t * g_lp);
}

int64_t grain_rows(int64_t V) {
  // Rows are independent; keep at least ~64K elements per task so tiny V does not drown in overhead.
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1));
}

template <typename T>
void fwd_typed(const LogprobsEntropyFwdParams& p) {
  const T* base = static_cast<const T*>(p.logits);
  at::parallel_for(0, p.rows, grain_rows(p.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = p.labels[i];
      if (y == kIgnoreIndex) {
        p.logp[i] = p.entropy[i] = p.stats[2 * i] = p.stats[2 * i + 1] = 0.f;
        continue;
      }
      const T* z = base + i * p.row_stride;
      const RowStats st = row_forward(z, p.vocab, p.inv_temperature);
      // logp = x_y - lse = (z_y - max z) / T - ln2 log2 S
      p.logp[i] = (static_cast<float>(z[y]) - st.max_z) * p.inv_temperature - kLn2 * st.log2_s;
      p.entropy[i] = st.entropy;
      p.stats[2 * i] = st.max_z;
      p.stats[2 * i + 1] = st.log2_s;
    }
  });
}

template <typename T>
void bwd_typed(const LogprobsEntropyBwdParams& p) {
  const T* base = static_cast<const T*>(p.logits);
  T* gbase = static_cast<T*>(p.grad_logits);
  at::parallel_for(0, p.rows, grain_rows(p.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* dz = gbase + i * p.vocab;
      const int64_t y = p.labels[i];
      const float g_lp = p.grad_logp ? p.grad_logp[i] : 0.f;
      const float g_h = p.grad_entropy ? p.grad_entropy[i] : 0.f;
      if (y == kIgnoreIndex || (g_lp == 0.f && g_h == 0.f)) {
        std::fill(dz, dz + p.vocab, static_cast<T>(0.f));
        continue;
      }
      row_backward(base + i * p.row_stride, dz, p.vocab, y, p.inv_temperature, p.stats[2 * i], p.stats[2 * i + 1],
                   p.entropy[i], g_lp, g_h);
    }
  });
}

}  // namespace

void logprobs_entropy_fwd(const LogprobsEntropyFwdParams& p) {
  switch (p.kind) {
    case FloatKind::kFloat32: return fwd_typed<float>(p);
    case FloatKind::kBFloat16: return fwd_typed<c10::BFloat16>(p);
    case FloatKind::kFloat16: return fwd_typed<c10::Half>(p);
  }
}

void logprobs_entropy_bwd(const LogprobsEntropyBwdParams& p) {
  switch (p.kind) {
    case FloatKind::kFloat32: return bwd_typed<float>(p);
    case FloatKind::kBFloat16: return bwd_typed<c10::BFloat16>(p);
    case FloatKind::kFloat16: return bwd_typed<c10::Half>(p);
  }
}

// The benchmarks' physical limit: read n floats once, in parallel, doing as little as possible.
double stream_read(const float* data, int64_t n) {
  constexpr int64_t W = Vec::size();
  const int64_t nvec = n / W;
  double total = 0.0;
  std::vector<double> partial(at::get_num_threads(), 0.0);
  at::parallel_for(0, nvec, 4096, [&](int64_t begin, int64_t end) {
    Vec acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
    int64_t v = begin;
    for (; v + 4 <= end; v += 4) {
      acc0 = acc0 + Vec::loadu(data + (v + 0) * W);
      acc1 = acc1 + Vec::loadu(data + (v + 1) * W);
      acc2 = acc2 + Vec::loadu(data + (v + 2) * W);
      acc3 = acc3 + Vec::loadu(data + (v + 3) * W);
    }
    for (; v < end; ++v) acc0 = acc0 + Vec::loadu(data + v * W);
    alignas(64) float lanes[W];
    ((acc0 + acc1) + (acc2 + acc3)).store(lanes);
    double s = 0.0;
    for (int64_t k = 0; k < W; ++k) s += lanes[k];
    partial[at::get_thread_num()] += s;
  });
  for (double s : partial) total += s;
  for (int64_t j = nvec * W; j < n; ++j) total += data[j];
  return total;
}

}  // namespace CPU_CAPABILITY
}  // namespace spear_kernels
