// logprobs_entropy: the forward and backward ops over [N, V] logits (kernels: logprobs_entropy_kernel.cpp).
#include "dispatch.h"

#include <torch/library.h>

namespace spear_kernels {
namespace {

void check_rows(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), "spear_kernels._C: CPU tensors only");
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) == 0 || logits.stride(1) == 1, "logits rows must be contiguous");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "labels must be [N]");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous(), "labels must be contiguous int64");
  check_labels_in_range(labels, logits.size(1));
}

// Outputs are passed in (the Python launcher allocates them), so callers can reuse buffers
// and tests can pre-fill them with NaN to catch a missed store.
void logprobs_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                              const at::Tensor& logp, const at::Tensor& ent, const at::Tensor& stats) {
  check_rows(logits, labels);
  check_temperature(temperature);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_out(logp, {rows}, at::kFloat, "logp");
  check_out(ent, {rows}, at::kFloat, "entropy");
  check_out(stats, {rows, 2}, at::kFloat, "stats");
  if (rows == 0) return;
  LogprobsEntropyFwdParams p{logits.data_ptr(), logits.stride(0), float_kind(logits), labels.data_ptr<int64_t>(),
                             rows, vocab, static_cast<float>(1.0 / temperature), logp.data_ptr<float>(),
                             ent.data_ptr<float>(), stats.data_ptr<float>()};
  kernels().fwd(p);
}

void logprobs_entropy_bwd_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
                              const at::Tensor& entropy, const std::optional<at::Tensor>& grad_logp,
                              const std::optional<at::Tensor>& grad_entropy, double temperature,
                              const at::Tensor& grad) {
  check_rows(logits, labels);
  check_temperature(temperature);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_out(grad, {rows, vocab}, logits.scalar_type(), "grad_logits");
  if (grad.numel() == 0) return;
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  LogprobsEntropyBwdParams p{logits.data_ptr(),
                             logits.stride(0),
                             float_kind(logits),
                             labels.data_ptr<int64_t>(),
                             rows,
                             vocab,
                             static_cast<float>(1.0 / temperature),
                             optional_f32(stats, 2 * rows, "stats"),
                             optional_f32(entropy, rows, "entropy"),
                             optional_f32(grad_logp, rows, "grad_logp"),
                             optional_f32(grad_entropy, rows, "grad_entropy"),
                             grad.data_ptr()};
  kernels().bwd(p);
}

}  // namespace
}  // namespace spear_kernels

TORCH_LIBRARY_FRAGMENT(spear_kernels, m) {
  m.def(
      "logprobs_entropy_fwd(Tensor logits, Tensor labels, float temperature, Tensor(a!) logp, "
      "Tensor(b!) entropy, Tensor(c!) stats) -> ()");
  m.def(
      "logprobs_entropy_bwd(Tensor logits, Tensor labels, Tensor stats, Tensor entropy, Tensor? grad_logp, "
      "Tensor? grad_entropy, float temperature, Tensor(a!) grad_logits) -> ()");
}

TORCH_LIBRARY_IMPL(spear_kernels, CPU, m) {
  m.impl("logprobs_entropy_fwd", &spear_kernels::logprobs_entropy_fwd_cpu);
  m.impl("logprobs_entropy_bwd", &spear_kernels::logprobs_entropy_bwd_cpu);
}
