// Epilogues of the fused lm_head + log-prob/entropy op: they consume one GEMM-produced chunk of
// logits at a time (see linear_logprobs_entropy in ops/linear_logprobs_entropy.cpp for the chunk loop and the GEMMs).
// The row math is softmax_rows.h's, shared with logprobs_entropy. Compiled per CPU capability.
#include "softmax_rows.h"

#include <ATen/Parallel.h>

namespace spear_kernels {
inline namespace CPU_CAPABILITY {
namespace {

template <typename T>
void chunk_fwd_typed(const LinearChunkFwdParams& p) {
  const T* base = static_cast<const T*>(p.z);
  const float k = p.inv_temperature * kLog2e;
  at::parallel_for(0, p.rows, grain_rows(p.cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = p.labels[i];
      if (y == kIgnoreIndex) {
        if (p.last) p.logp[i] = p.entropy[i] = p.stats[2 * i] = p.stats[2 * i + 1] = 0.f;
        continue;
      }
      const T* z = base + i * p.cols;
      accumulate_row(z, p.cols, k, p.states[i]);
      if (y >= p.col0 && y < p.col0 + p.cols) p.label_logit[i] = static_cast<float>(z[y - p.col0]);
      if (p.last) {
        const SoftmaxRowState& st = p.states[i];
        const RowResult r = finish_row(st);
        p.logp[i] = (p.label_logit[i] - st.max_z) * p.inv_temperature - kLn2 * r.log2_s;
        p.entropy[i] = r.entropy;
        p.stats[2 * i] = st.max_z;
        p.stats[2 * i + 1] = r.log2_s;
      }
    }
  });
}

template <typename T>
void chunk_bwd_typed(const LinearChunkBwdParams& p) {
  T* base = static_cast<T*>(p.z);
  at::parallel_for(0, p.rows, grain_rows(p.cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* z = base + i * p.cols;
      const int64_t y = p.labels[i];
      const float g_lp = p.grad_logp ? p.grad_logp[i] : 0.f;
      const float g_h = p.grad_entropy ? p.grad_entropy[i] : 0.f;
      if (y == kIgnoreIndex || (g_lp == 0.f && g_h == 0.f)) {
        std::fill(z, z + p.cols, static_cast<T>(0.f));
        continue;
      }
      row_gradient(z, z, p.cols, y - p.col0, p.inv_temperature, p.stats[2 * i], p.stats[2 * i + 1], p.entropy[i],
                   g_lp, g_h);
    }
  });
}

}  // namespace

void linear_chunk_fwd(const LinearChunkFwdParams& p) {
  switch (p.kind) {
    case FloatKind::kFloat32: return chunk_fwd_typed<float>(p);
    case FloatKind::kBFloat16: return chunk_fwd_typed<c10::BFloat16>(p);
    case FloatKind::kFloat16: return chunk_fwd_typed<c10::Half>(p);
  }
}

void linear_chunk_bwd(const LinearChunkBwdParams& p) {
  switch (p.kind) {
    case FloatKind::kFloat32: return chunk_bwd_typed<float>(p);
    case FloatKind::kBFloat16: return chunk_bwd_typed<c10::BFloat16>(p);
    case FloatKind::kFloat16: return chunk_bwd_typed<c10::Half>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace spear_kernels
