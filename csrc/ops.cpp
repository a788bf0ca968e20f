// spear_kernels._C: operator registration (TORCH_LIBRARY) and run-time choice of
// the CPU capability each kernel file was compiled for (ATen's DispatchStub rule:
// the best capability that both this build and this CPU have, as ATen reports it;
// ATEN_CPU_CAPABILITY lowers it). This file is compiled with no ISA flags and only ever calls into the
// per-capability files through the function pointers chosen below.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace spear_kernels {

#define SPEAR_DECLARE_CAPABILITY(CAP)                             \
  namespace CAP {                                                 \
  void logprobs_entropy_fwd(const LogprobsEntropyFwdParams& p); \
  void logprobs_entropy_bwd(const LogprobsEntropyBwdParams& p); \
  double stream_read(const float* data, int64_t n);               \
  }

SPEAR_DECLARE_CAPABILITY(DEFAULT)
#ifdef SPEAR_HAVE_AVX2
SPEAR_DECLARE_CAPABILITY(AVX2)
#endif
#ifdef SPEAR_HAVE_AVX512
SPEAR_DECLARE_CAPABILITY(AVX512)
#endif

namespace {

struct KernelTable {
  const char* name;
  LogprobsEntropyFwdFn fwd;
  LogprobsEntropyBwdFn bwd;
  StreamReadFn stream_read;
};

#define SPEAR_TABLE(CAP) KernelTable{#CAP, &CAP::logprobs_entropy_fwd, &CAP::logprobs_entropy_bwd, &CAP::stream_read}

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

// The gradient is a fresh [N, V] buffer, so first-touch page faults are a large part
// of the backward (measured here: 5x the compute at T=2048, V=32000). Asking for
// transparent huge pages on its 2 MB-aligned interior turns 512 faults into one.
// Advisory only: where THP is off, nothing changes.
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

void check_rows(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), "spear_kernels._C: CPU tensors only");
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) == 0 || logits.stride(1) == 1, "logits rows must be contiguous");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "labels must be [N]");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous(), "labels must be contiguous int64");
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

// Outputs are passed in (the Python launcher allocates them), so callers can reuse buffers
// and tests can pre-fill them with NaN to catch a missed store.
void logprobs_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                              const at::Tensor& logp, const at::Tensor& ent, const at::Tensor& stats) {
  check_rows(logits, labels);
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
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

double stream_read_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "stream_read: contiguous CPU tensor");
  // Reads the tensor's bytes as fp32 words: the cost of touching every byte once.
  const int64_t n = x.numel() * x.element_size() / 4;
  return kernels().stream_read(static_cast<const float*>(x.data_ptr()), n);
}

}  // namespace
}  // namespace spear_kernels

TORCH_LIBRARY(spear_kernels, m) {
  m.def(
      "logprobs_entropy_fwd(Tensor logits, Tensor labels, float temperature, Tensor(a!) logp, "
      "Tensor(b!) entropy, Tensor(c!) stats) -> ()");
  m.def(
      "logprobs_entropy_bwd(Tensor logits, Tensor labels, Tensor stats, Tensor entropy, Tensor? grad_logp, "
      "Tensor? grad_entropy, float temperature, Tensor(a!) grad_logits) -> ()");
  m.def("stream_read(Tensor x) -> float");
}

TORCH_LIBRARY_IMPL(spear_kernels, CPU, m) {
  m.impl("logprobs_entropy_fwd", &spear_kernels::logprobs_entropy_fwd_cpu);
  m.impl("logprobs_entropy_bwd", &spear_kernels::logprobs_entropy_bwd_cpu);
  m.impl("stream_read", &spear_kernels::stream_read_cpu);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "spear_kernels C++ CPU kernels (operators live in torch.ops.spear_kernels)";
  m.def("cpu_capability", [] { return std::string(spear_kernels::kernels().name); },
        "The CPU capability whose kernels this process runs (DEFAULT, AVX2 or AVX512).");
  m.def("compiled_capabilities", [] {
    std::vector<std::string> caps{"DEFAULT"};
#ifdef SPEAR_HAVE_AVX2
    caps.emplace_back("AVX2");
#endif
#ifdef SPEAR_HAVE_AVX512
    caps.emplace_back("AVX512");
#endif
    return caps;
  });
}
