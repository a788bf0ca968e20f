// linear_logprobs_entropy: log-probs and entropies from hidden states and the lm_head weight, tile by tile
// (kernels: linear_logprobs_entropy_kernel.cpp).
#include "dispatch.h"

#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace spear_kernels {
namespace {

// ---- fused lm_head + log-prob / entropy -----------------------------------------------------
// Logits are produced one [token chunk, vocab chunk] tile at a time by ATen's GEMM into a
// bounded workspace and consumed by the epilogue at once; the backward recomputes each tile,
// turns it into d loss / d z in place and feeds it to the two gradient GEMMs. Memory beyond the
// outputs: the tile (kTokenChunk x kVocabChunk) and, for low-precision inputs, fp32 accumulators
// for grad_hidden [N, H] and one vocab chunk of grad_weight [kVocabChunk, H].
constexpr int64_t kTokenChunk = 1024;
constexpr int64_t kVocabChunk = 8192;  // [1024 x 896] @ [896 x 8192] GEMMs run within ~15% of one big GEMM here

// Low-precision inputs also hold an fp32 grad_weight chunk and the GEMMs' low-precision partial products:
// half the vocabulary chunk keeps that memory near the fp32 path's.
int64_t vocab_chunk(const at::Tensor& hidden, int64_t vocab) {
  return std::min(vocab, hidden.scalar_type() == at::kFloat ? kVocabChunk : kVocabChunk / 2);
}

void check_linear(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu(),
              "spear_kernels._C: CPU tensors only");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden must be [N, H] and weight [V, H]");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "hidden and weight must be contiguous");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden and weight must share a dtype");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == hidden.size(0),
              "labels must be a contiguous int64 [N] tensor");
  check_labels_in_range(labels, weight.size(0));
}

at::Tensor tile(const at::Tensor& workspace, int64_t rows, int64_t cols) {
  return workspace.view({-1}).narrow(0, 0, rows * cols).view({rows, cols});
}

void linear_logprobs_entropy_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                     double temperature, const at::Tensor& logp, const at::Tensor& ent,
                                     const at::Tensor& stats) {
  check_linear(hidden, weight, labels);
  check_temperature(temperature);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  check_out(logp, {n}, at::kFloat, "logp");
  check_out(ent, {n}, at::kFloat, "entropy");
  check_out(stats, {n, 2}, at::kFloat, "stats");
  if (n == 0) return;
  const int64_t tc = std::min(n, kTokenChunk), vc = vocab_chunk(hidden, vocab);
  at::Tensor workspace = at::empty({tc * vc}, hidden.options());
  std::vector<SoftmaxRowState> states(n);
  std::vector<float> label_logit(n, 0.f);
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t t0 = 0; t0 < n; t0 += tc) {
    const int64_t tn = std::min(tc, n - t0);
    const at::Tensor h = hidden.narrow(0, t0, tn);
    for (int64_t v0 = 0; v0 < vocab; v0 += vc) {
      const int64_t vn = std::min(vc, vocab - v0);
      at::Tensor z = tile(workspace, tn, vn);
      at::mm_out(z, h, weight.narrow(0, v0, vn).t());
      LinearChunkFwdParams p{z.data_ptr(), float_kind(hidden), tn, vn, v0, y + t0,
                             static_cast<float>(1.0 / temperature), states.data() + t0, label_logit.data() + t0,
                             v0 + vn >= vocab, logp.data_ptr<float>() + t0, ent.data_ptr<float>() + t0,
                             stats.data_ptr<float>() + 2 * t0};
      kernels().linear_fwd(p);
    }
  }
}

void linear_logprobs_entropy_bwd_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                     const at::Tensor& stats, const at::Tensor& entropy,
                                     const std::optional<at::Tensor>& grad_logp,
                                     const std::optional<at::Tensor>& grad_entropy, double temperature,
                                     const at::Tensor& grad_hidden, const at::Tensor& grad_weight) {
  check_linear(hidden, weight, labels);
  check_temperature(temperature);
  const int64_t n = hidden.size(0), vocab = weight.size(0), dim = hidden.size(1);
  check_out(grad_hidden, {n, dim}, hidden.scalar_type(), "grad_hidden");
  check_out(grad_weight, {vocab, dim}, hidden.scalar_type(), "grad_weight");
  grad_hidden.zero_();
  grad_weight.zero_();
  if (n == 0 || vocab == 0) return;
  const bool fp32 = hidden.scalar_type() == at::kFloat;
  const int64_t tc = std::min(n, kTokenChunk), vc = vocab_chunk(hidden, vocab);
  at::Tensor workspace = at::empty({tc * vc}, hidden.options());
  // fp32 inputs accumulate straight into the outputs; others into fp32 buffers, rounded once at the end.
  at::Tensor gh_acc = fp32 ? grad_hidden : at::zeros({n, dim}, hidden.options().dtype(at::kFloat));
  at::Tensor gw_acc = fp32 ? at::Tensor() : at::empty({vc, dim}, hidden.options().dtype(at::kFloat));
  const int64_t* y = labels.data_ptr<int64_t>();
  const float* glp = optional_f32(grad_logp, n, "grad_logp");
  const float* gh = optional_f32(grad_entropy, n, "grad_entropy");
  for (int64_t v0 = 0; v0 < vocab; v0 += vc) {
    const int64_t vn = std::min(vc, vocab - v0);
    const at::Tensor w = weight.narrow(0, v0, vn);
    at::Tensor gw = fp32 ? grad_weight.narrow(0, v0, vn) : tile(gw_acc, vn, dim);
    if (!fp32) gw.zero_();
    for (int64_t t0 = 0; t0 < n; t0 += tc) {
      const int64_t tn = std::min(tc, n - t0);
      const at::Tensor h = hidden.narrow(0, t0, tn);
      at::Tensor z = tile(workspace, tn, vn);
      at::mm_out(z, h, w.t());
      LinearChunkBwdParams p{z.data_ptr(), float_kind(hidden), tn, vn, v0, y + t0,
                             static_cast<float>(1.0 / temperature), optional_f32(stats, 2 * n, "stats") + 2 * t0,
                             optional_f32(entropy, n, "entropy") + t0, glp ? glp + t0 : nullptr,
                             gh ? gh + t0 : nullptr};
      kernels().linear_bwd(p);  // z now holds d loss / d z
      at::Tensor gh_t = gh_acc.narrow(0, t0, tn);
      if (fp32) {
        gh_t.addmm_(z, w);
        gw.addmm_(z.t(), h);
      } else {
        gh_t.add_(at::mm(z, w));
        gw.add_(at::mm(z.t(), h));
      }
    }
    if (!fp32) grad_weight.narrow(0, v0, vn).copy_(gw);
  }
  if (!fp32) grad_hidden.copy_(gh_acc);
}

}  // namespace
}  // namespace spear_kernels

TORCH_LIBRARY_FRAGMENT(spear_kernels, m) {
  m.def(
      "linear_logprobs_entropy_fwd(Tensor hidden, Tensor weight, Tensor labels, float temperature, "
      "Tensor(a!) logp, Tensor(b!) entropy, Tensor(c!) stats) -> ()");
  m.def(
      "linear_logprobs_entropy_bwd(Tensor hidden, Tensor weight, Tensor labels, Tensor stats, Tensor entropy, "
      "Tensor? grad_logp, Tensor? grad_entropy, float temperature, Tensor(a!) grad_hidden, "
      "Tensor(b!) grad_weight) -> ()");
}

TORCH_LIBRARY_IMPL(spear_kernels, CPU, m) {
  m.impl("linear_logprobs_entropy_fwd", &spear_kernels::linear_logprobs_entropy_fwd_cpu);
  m.impl("linear_logprobs_entropy_bwd", &spear_kernels::linear_logprobs_entropy_bwd_cpu);
}
