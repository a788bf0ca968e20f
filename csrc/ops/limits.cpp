// stream_read: the memory-read limit the benchmarks compare the kernels with (exp_bound, the compute limit,
// is a plain function: module.cpp).
#include "dispatch.h"

#include <torch/library.h>

namespace spear_kernels {
namespace {

double stream_read_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "stream_read: contiguous CPU tensor");
  // Reads the tensor's bytes as fp32 words: the cost of touching every byte once.
  const int64_t n = x.numel() * x.element_size() / 4;
  return kernels().stream_read(static_cast<const float*>(x.data_ptr()), n);
}

}  // namespace
}  // namespace spear_kernels

TORCH_LIBRARY_FRAGMENT(spear_kernels, m) {
  m.def("stream_read(Tensor x) -> float");
}

TORCH_LIBRARY_IMPL(spear_kernels, CPU, m) {
  m.impl("stream_read", &spear_kernels::stream_read_cpu);
}
