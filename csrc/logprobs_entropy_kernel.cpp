// Token log-prob and entropy of softmax(z / T), one row (token) at a time.
//
// This file is compiled once per CPU capability (DEFAULT, AVX2, AVX512; see
// CMakeLists.txt); CPU_CAPABILITY names the namespace its symbols land in and
// at::vec::Vectorized<float> is 16, 8 or 1-lane-emulated wide accordingly.
//
// Forward, per row: the row is read from memory once. It is walked in blocks of
// kBlock elements that stay in L1: a max over the block, then the exps. The
// running max M is shared by all lanes and only moves at block boundaries, so
// the accumulators are rescaled once per block, never per element:
//   S = sum_j e^{x_j - M},  D = sum_j (x_j - M) e^{x_j - M},   x = z / T
//   lse = M + log S,        H = lse - E_p[x] = log S - D / S.
// Backward, per row (one read of z, one write of dz):
//   dz_j = (g_lp (1[j=y] - p_j) - g_H p_j (x_j - E_p[x])) / T,  p_j = e^{x_j - lse},
// with x_j - E_p[x] = (x_j - lse) + H.
// The kernels work in base 2 (x2 = x log2(e)), so the exp is one exp2 and the
// scaling folds into the FMA that subtracts the max. -inf logits: x2 - M2 is clamped
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
  float lse;
  float entropy;
};

template <typename T>
RowStats row_forward(const T* z, int64_t V, float inv_t) {
  constexpr int64_t W = Vec::size();
  const float k = inv_t * kLog2e;  // z -> x2 = z / T * log2(e)
  float M = kNegInf;                // running max of x2
  Vec S[kUnroll], D[kUnroll];       // sum 2^{x2-M}, sum (x2-M) 2^{x2-M}
  for (int u = 0; u < kUnroll; ++u) S[u] = D[u] = Vec(0.f);
  float s_tail = 0.f, d_tail = 0.f;  // tails of blocks, done in scalar code
  const Vec vk(k), vmin(kMinExp2Arg);

  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    const T* zb = z + b;
    const float bmax = block_max(zb, n) * k;  // k > 0, so max commutes with the scaling
    if (bmax > M) {
      if (M != kNegInf) {
        // Move every accumulator from base M to base bmax: 2^{x-M} = 2^{x-bmax} 2^{bmax-M}.
        const float diff = M - bmax, scale = std::exp2(diff);
        const Vec vdiff(diff), vscale(scale);
        for (int u = 0; u < kUnroll; ++u) {
          D[u] = (D[u] + S[u] * vdiff) * vscale;
          S[u] = S[u] * vscale;
        }
        d_tail = (d_tail + s_tail * diff) * scale;
        s_tail *= scale;
      }
      M = bmax;
    }
    if (M == kNegInf) continue;  // nothing but -inf so far
    const Vec vneg_m(-M);
    int64_t j = 0;
    for (; j + kUnroll * W <= n; j += kUnroll * W) {
      for (int u = 0; u < kUnroll; ++u) {
        const Vec d = at::vec::maximum(at::vec::fmadd(load_as_float(zb + j + u * W), vk, vneg_m), vmin);
        const Vec e = exp2_clamped(d);
        S[u] = S[u] + e;
        D[u] = at::vec::fmadd(d, e, D[u]);
      }
    }
    for (; j + W <= n; j += W) {
      const Vec d = at::vec::maximum(at::vec::fmadd(load_as_float(zb + j), vk, vneg_m), vmin);
      const Vec e = exp2_clamped(d);
      S[0] = S[0] + e;
      D[0] = at::vec::fmadd(d, e, D[0]);
    }
    for (; j < n; ++j) {
      const float d = std::max(static_cast<float>(zb[j]) * k - M, kMinExp2Arg);
      const float e = std::exp2(d);
      s_tail += e;
      d_tail += d * e;
    }
  }
  if (M == kNegInf) {
    // Every logit is -inf: the distribution is undefined, as in torch.log_softmax.
    const float nan = std::numeric_limits<float>::quiet_NaN();
    return {kNegInf, nan};
  }
  for (int u = 1; u < kUnroll; ++u) {
    S[0] = S[0] + S[u];
    D[0] = D[0] + D[u];
  }
  alignas(64) float s_lanes[W], d_lanes[W];
  S[0].store(s_lanes);
  D[0].store(d_lanes);
  double s = s_tail, d = d_tail;
  for (int64_t j = 0; j < W; ++j) {
    s += s_lanes[j];
    d += d_lanes[j];
  }
  // Back to natural units: lse = ln2 (M + log2 S), H = lse - E[x] = ln2 (log2 S - D / S).
  const double log2_s = std::log2(s);
  return {static_cast<float>(kLn2 * (M + log2_s)), static_cast<float>(kLn2 * (log2_s - d / s))};
}

template <typename T>
void row_backward(const T* z, T* dz, int64_t V, int64_t y, float inv_t, float lse, float H, float g_lp,
                  float g_h) {
  constexpr int64_t W = Vec::size();
  // dz_j = p_j (a + b d_j) + 1[j=y] g_lp / T with d_j = x_j - lse = ln2 * d2_j, p_j = 2^{d2_j}.
  const float a = -inv_t * (g_lp + g_h * H);
  const float b2 = -inv_t * g_h * kLn2;
  const float k = inv_t * kLog2e, lse2 = lse * kLog2e;
  const Vec va(a), vb2(b2), vk(k), vneg_lse2(-lse2), vmin(kMinExp2Arg);
  int64_t j = 0;
  for (; j + W <= V; j += W) {
    const Vec d2 = at::vec::maximum(at::vec::fmadd(load_as_float(z + j), vk, vneg_lse2), vmin);
    const Vec p = exp2_clamped(d2);
    store_from_float(dz + j, p * at::vec::fmadd(vb2, d2, va));
  }
  for (; j < V; ++j) {
    const float d2 = std::max(static_cast<float>(z[j]) * k - lse2, kMinExp2Arg);
    dz[j] = static_cast<T>(std::exp2(d2) * (a + b2 * d2));
  }
  // The label column, recomputed in fp32 so the one-hot term is not added in T's precision.
  const float d2_y = std::max(static_cast<float>(z[y]) * k - lse2, kMinExp2Arg);
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
        p.logp[i] = 0.f;
        p.entropy[i] = 0.f;
        p.lse[i] = 0.f;
        continue;
      }
      const T* z = base + i * p.row_stride;
      const RowStats st = row_forward(z, p.vocab, p.inv_temperature);
      p.logp[i] = static_cast<float>(z[y]) * p.inv_temperature - st.lse;
      p.entropy[i] = st.entropy;
      p.lse[i] = st.lse;
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
      row_backward(base + i * p.row_stride, dz, p.vocab, y, p.inv_temperature, p.lse[i], p.entropy[i], g_lp, g_h);
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
