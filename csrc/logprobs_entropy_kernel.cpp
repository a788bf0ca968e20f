// Token log-prob and entropy of softmax(z / T), one row (token) at a time: the row math lives
// in softmax_rows.h; this file walks the rows in parallel.
//
// This file is compiled once per CPU capability (DEFAULT, AVX2, AVX512; see CMakeLists.txt);
// CPU_CAPABILITY names the namespace its symbols land in and at::vec::Vectorized<float> is 16,
// 8 or 1-lane-emulated wide accordingly. Forward: one read of each row. Backward: one read of
// the row and one write of its gradient.
#include "softmax_rows.h"

#include <ATen/Parallel.h>

#include <vector>

namespace spear_kernels {
inline namespace CPU_CAPABILITY {
namespace {

template <typename T>
void fwd_typed(const LogprobsEntropyFwdParams& p) {
  const T* base = static_cast<const T*>(p.logits);
  const float k = p.inv_temperature * kLog2e;
  at::parallel_for(0, p.rows, grain_rows(p.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = p.labels[i];
      if (y == kIgnoreIndex) {
        p.logp[i] = p.entropy[i] = p.stats[2 * i] = p.stats[2 * i + 1] = 0.f;
        continue;
      }
      const T* z = base + i * p.row_stride;
      SoftmaxRowState st;
      accumulate_row(z, p.vocab, k, st);
      const RowResult r = finish_row(st);
      // logp = x_y - lse = (z_y - max z) / T - ln2 log2 S
      p.logp[i] = (static_cast<float>(z[y]) - st.max_z) * p.inv_temperature - kLn2 * r.log2_s;
      p.entropy[i] = r.entropy;
      p.stats[2 * i] = st.max_z;
      p.stats[2 * i + 1] = r.log2_s;
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
      row_gradient(base + i * p.row_stride, dz, p.vocab, y, p.inv_temperature, p.stats[2 * i], p.stats[2 * i + 1],
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

// The benchmarks' compute limit: n of the kernels' exp2 (exp2_clamped), in parallel, on arguments that stay in
// registers (no memory traffic): the time a kernel doing n exps needs at least on this capability.
double exp_bound(int64_t n) {
  constexpr int64_t W = Vec::size();
  const int64_t nvec = n / (kUnroll * W);
  std::vector<double> partial(at::get_num_threads(), 0.0);
  at::parallel_for(0, nvec, 4096, [&](int64_t begin, int64_t end) {
    Vec x[kUnroll], acc[kUnroll];
    for (int u = 0; u < kUnroll; ++u) {
      x[u] = Vec(-0.37f * (u + 1));
      acc[u] = Vec(0.f);
    }
    const Vec step(-1e-7f);
    for (int64_t v = begin; v < end; ++v) {
      for (int u = 0; u < kUnroll; ++u) {
        acc[u] = acc[u] + exp2_clamped(x[u]);
        x[u] = x[u] + step;  // a new argument each time: nothing to hoist out of the loop
      }
    }
    alignas(64) float lanes[W];
    ((acc[0] + acc[1]) + (acc[2] + acc[3])).store(lanes);
    double s = 0.0;
    for (int64_t k = 0; k < W; ++k) s += lanes[k];
    partial[at::get_thread_num()] += s;
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

}  // namespace CPU_CAPABILITY
}  // namespace spear_kernels
