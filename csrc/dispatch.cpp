// The kernel table and the shared input checks (see dispatch.h). This file is compiled with no ISA flags and only
// ever calls into the per-capability kernel files through the function pointers chosen here.
#include "dispatch.h"

#include <cmath>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace spear_kernels {

#define SPEAR_DECLARE_CAPABILITY(CAP)                             \
  namespace CAP {                                                 \
  void logprobs_entropy_fwd(const LogprobsEntropyFwdParams& p); \
  void logprobs_entropy_bwd(const LogprobsEntropyBwdParams& p); \
  double stream_read(const float* data, int64_t n);               \
  double exp_bound(int64_t n);                                    \
  void policy_loss_fwd(const PolicyLossParams& p);                \
  void linear_chunk_fwd(const LinearChunkFwdParams& p);           \
  void linear_chunk_bwd(const LinearChunkBwdParams& p);           \
  }

SPEAR_DECLARE_CAPABILITY(DEFAULT)
#ifdef SPEAR_HAVE_AVX2
SPEAR_DECLARE_CAPABILITY(AVX2)
#endif
#ifdef SPEAR_HAVE_AVX512
SPEAR_DECLARE_CAPABILITY(AVX512)
#endif


#define SPEAR_TABLE(CAP)                                                                             \
  KernelTable {                                                                                      \
    #CAP, &CAP::logprobs_entropy_fwd, &CAP::logprobs_entropy_bwd, &CAP::stream_read, &CAP::exp_bound, &CAP::policy_loss_fwd, \
        &CAP::linear_chunk_fwd, &CAP::linear_chunk_bwd                                                     \
  }

const KernelTable& kernels() {
  static const KernelTable table = [] {
    // "AVX512", "AVX2", "DEFAULT" (or another ISA's name off x86): ATen's own choice for this CPU.
    const std::string cap = at::get_cpu_capability();
    (void)cap;
#if defined(SPEAR_HAVE_AVX512)
    if (cap == "AVX512") return SPEAR_TABLE(AVX512);
#endif
#if defined(SPEAR_HAVE_AVX2)
    if (cap == "AVX512" || cap == "AVX2") return SPEAR_TABLE(AVX2);
#endif
    return SPEAR_TABLE(DEFAULT);
  }();
  return table;
}

void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

FloatKind float_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatKind::kFloat32;
    case at::kBFloat16: return FloatKind::kBFloat16;
    case at::kHalf: return FloatKind::kFloat16;
    default: TORCH_CHECK(false, "spear_kernels: logits must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

constexpr double kMinTemperature = 1e-5;  // spear_kernels._validation.MIN_TEMPERATURE

void check_labels_in_range(const at::Tensor& labels, int64_t vocab) {
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t i = 0, n = labels.numel(); i < n; ++i) {
    TORCH_CHECK(y[i] == kIgnoreIndex || (y[i] >= 0 && y[i] < vocab), "label ", y[i], " at index ", i,
                " is out of range for a vocabulary of ", vocab, " (valid: 0..", vocab - 1, ", or -100 to ignore)");
  }
}

void check_temperature(double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature >= kMinTemperature,
              "temperature must be a finite float >= 1e-05, got ", temperature);
}

const float* optional_f32(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n, name,
              " must be a contiguous float32 tensor of ", n, " elements");
  return t->data_ptr<float>();
}

void check_out(const at::Tensor& out, at::IntArrayRef shape, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == dtype && out.sizes() == shape && out.is_contiguous(),
              name, " must be a contiguous CPU ", dtype, " tensor of shape ", shape);
}

void check_f32_tensor(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, name,
              " must be a contiguous float32 CPU tensor of ", n, " elements");
}

}  // namespace spear_kernels
