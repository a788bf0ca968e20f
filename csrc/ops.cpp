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

#include <cmath>
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

namespace {

struct KernelTable {
  const char* name;
  LogprobsEntropyFwdFn fwd;
  LogprobsEntropyBwdFn bwd;
  StreamReadFn stream_read;
  ExpBoundFn exp_bound;
  PolicyLossFn policy_loss;
  LinearChunkFwdFn linear_fwd;
  LinearChunkBwdFn linear_bwd;
};

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

constexpr int64_t kIgnoreIndex = -100;
constexpr double kMinTemperature = 1e-5;  // spear_kernels._validation.MIN_TEMPERATURE

// Registered ops are public: everything a kernel reads through a pointer is checked here first.
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

void check_rows(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), "spear_kernels._C: CPU tensors only");
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) == 0 || logits.stride(1) == 1, "logits rows must be contiguous");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "labels must be [N]");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous(), "labels must be contiguous int64");
  check_labels_in_range(labels, logits.size(1));
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

double stream_read_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "stream_read: contiguous CPU tensor");
  // Reads the tensor's bytes as fp32 words: the cost of touching every byte once.
  const int64_t n = x.numel() * x.element_size() / 4;
  return kernels().stream_read(static_cast<const float*>(x.data_ptr()), n);
}

double exp_bound_cpu(int64_t n) {
  TORCH_CHECK(n >= 0, "exp_bound: n must be >= 0");
  return kernels().exp_bound(n);
}

void check_f32_tensor(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, name,
              " must be a contiguous float32 CPU tensor of ", n, " elements");
}

// Outputs: loss [B, L], d loss / d log_prob [B, L], stats [3] (pg_clipfrac, ppo_kl, pg_clipfrac_lower).
void policy_loss_fwd_cpu(const at::Tensor& log_prob, const at::Tensor& old_log_prob, const at::Tensor& advantages,
                         const at::Tensor& mask, int64_t mode, double clip_low, double clip_high, double clip_c,
                         double clip_cov_ratio, double clip_cov_lb, double clip_cov_ub, double kl_cov_ratio,
                         double ppo_kl_coef, int64_t seed, const at::Tensor& loss, const at::Tensor& dloss_dlogp,
                         const at::Tensor& stats) {
  TORCH_CHECK(mode >= 0 && mode < kNumPolicyLossModes, "policy_loss: unknown mode ", mode);
  auto finite_in = [](double v, double lo, double hi) { return std::isfinite(v) && v >= lo && v <= hi; };
  TORCH_CHECK(finite_in(clip_low, 0.0, 1.0) && clip_low < 1.0, "clip_ratio_low must be in [0, 1), got ", clip_low);
  TORCH_CHECK(finite_in(clip_high, 0.0, HUGE_VAL), "clip_ratio_high must be finite and >= 0, got ", clip_high);
  TORCH_CHECK(finite_in(clip_c, 1.0, HUGE_VAL) && clip_c > 1.0, "clip_ratio_c must be finite and > 1, got ", clip_c);
  TORCH_CHECK(finite_in(clip_cov_ratio, 0.0, 1.0) && clip_cov_ratio > 0, "clip_cov_ratio must be in (0, 1], got ",
              clip_cov_ratio);
  TORCH_CHECK(!std::isnan(clip_cov_lb) && !std::isnan(clip_cov_ub) && clip_cov_lb < clip_cov_ub,
              "clip_cov_lb must be < clip_cov_ub");
  TORCH_CHECK(finite_in(kl_cov_ratio, 0.0, 1.0) && kl_cov_ratio > 0, "kl_cov_ratio must be in (0, 1], got ",
              kl_cov_ratio);
  TORCH_CHECK(finite_in(ppo_kl_coef, 0.0, HUGE_VAL), "ppo_kl_coef must be finite and >= 0, got ", ppo_kl_coef);
  const int64_t n = log_prob.numel();
  for (const auto& [t, name] : {std::pair{&log_prob, "log_prob"}, {&old_log_prob, "old_log_prob"},
                                {&advantages, "advantages"}, {&mask, "response_mask"}, {&loss, "loss"},
                                {&dloss_dlogp, "dloss_dlogp"}}) {
    check_f32_tensor(*t, n, name);
  }
  check_f32_tensor(stats, 3, "stats");
  PolicyLossParams p{log_prob.data_ptr<float>(),
                     old_log_prob.data_ptr<float>(),
                     advantages.data_ptr<float>(),
                     mask.data_ptr<float>(),
                     n,
                     static_cast<PolicyLossMode>(mode),
                     static_cast<float>(clip_low),
                     static_cast<float>(clip_high),
                     static_cast<float>(clip_c),
                     clip_cov_ratio,
                     static_cast<float>(clip_cov_lb),
                     static_cast<float>(clip_cov_ub),
                     kl_cov_ratio,
                     static_cast<float>(ppo_kl_coef),
                     static_cast<uint64_t>(seed),
                     loss.data_ptr<float>(),
                     dloss_dlogp.data_ptr<float>(),
                     stats.data_ptr<float>()};
  kernels().policy_loss(p);
}

// Per-group mean, unbiased std (singleton: 0 and 1, verl's convention) and count, accumulated in
// double; then, when `advantages` is given, (s - mean) / (std + eps) or s - mean for every sample,
// computed in double and rounded once. Scores are fp32 or fp64 (1e8 + 1 and 1e8 + 2 differ in fp64 only).
template <typename T>
void group_advantages_impl(const T* s, const int64_t* g, int64_t n, int64_t groups, bool norm_by_std, double eps,
                           float* m, float* sd, float* ct, float* a) {
  std::vector<double> mean(groups, 0.0), sq(groups, 0.0), cnt(groups, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(g[i] >= 0 && g[i] < groups, "group index ", g[i], " out of range [0, ", groups, ")");
    mean[g[i]] += s[i];
    cnt[g[i]] += 1.0;
  }
  for (int64_t j = 0; j < groups; ++j) mean[j] /= std::max(cnt[j], 1.0);
  for (int64_t i = 0; i < n; ++i) {
    const double c = static_cast<double>(s[i]) - mean[g[i]];
    sq[g[i]] += c * c;
  }
  std::vector<double> stdev(groups);
  for (int64_t j = 0; j < groups; ++j) {
    const bool single = cnt[j] <= 1.0;
    mean[j] = single ? 0.0 : mean[j];
    stdev[j] = single ? 1.0 : std::sqrt(sq[j] / (cnt[j] - 1.0));
    m[j] = static_cast<float>(mean[j]);
    sd[j] = static_cast<float>(stdev[j]);
    ct[j] = static_cast<float>(cnt[j]);
  }
  if (a == nullptr) return;
  for (int64_t i = 0; i < n; ++i) {
    const double centred = static_cast<double>(s[i]) - mean[g[i]];
    a[i] = static_cast<float>(norm_by_std ? centred / (stdev[g[i]] + eps) : centred);
  }
}

void group_advantages_cpu(const at::Tensor& scores, const at::Tensor& inverse, int64_t groups, bool norm_by_std,
                          double eps, const at::Tensor& mean, const at::Tensor& std, const at::Tensor& count,
                          const std::optional<at::Tensor>& advantages) {
  const int64_t n = scores.numel();
  TORCH_CHECK(scores.device().is_cpu() && scores.is_contiguous() &&
                  (scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble),
              "scores must be a contiguous float32 or float64 CPU tensor");
  TORCH_CHECK(inverse.device().is_cpu() && inverse.scalar_type() == at::kLong && inverse.is_contiguous() &&
                  inverse.numel() == n,
              "inverse must be a contiguous int64 CPU tensor of ", n, " elements");
  TORCH_CHECK(groups >= 0, "groups must be >= 0");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  check_f32_tensor(mean, groups, "mean");
  check_f32_tensor(std, groups, "std");
  check_f32_tensor(count, groups, "count");
  float* adv = nullptr;
  if (advantages.has_value() && advantages->defined()) {
    check_f32_tensor(*advantages, n, "advantages");
    adv = advantages->data_ptr<float>();
  }
  const int64_t* g = inverse.data_ptr<int64_t>();
  if (scores.scalar_type() == at::kDouble) {
    group_advantages_impl(scores.data_ptr<double>(), g, n, groups, norm_by_std, eps, mean.data_ptr<float>(),
                          std.data_ptr<float>(), count.data_ptr<float>(), adv);
  } else {
    group_advantages_impl(scores.data_ptr<float>(), g, n, groups, norm_by_std, eps, mean.data_ptr<float>(),
                          std.data_ptr<float>(), count.data_ptr<float>(), adv);
  }
}

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

// Open-addressing table from a key to its group number (first appearance order). Keys are
// hashed once; equal hashes are confirmed with `equal`.
template <typename Key, typename Hash, typename Equal>
int64_t assign_groups(int64_t n, Key (*key_at)(const void*, int64_t), const void* src, Hash hash, Equal equal,
                      int64_t* out) {
  struct Slot {
    Key key;
    uint64_t hash;
    int64_t group;  // -1: empty
  };
  int64_t capacity = 16;
  while (capacity < 2 * n) capacity <<= 1;
  std::vector<Slot> table(capacity, Slot{Key{}, 0, -1});
  const uint64_t mask = static_cast<uint64_t>(capacity - 1);
  int64_t groups = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Key key = key_at(src, i);
    const uint64_t h = hash(key);
    uint64_t slot = (h * 0x9E3779B97F4A7C15ull) >> 7 & mask;
    while (true) {
      Slot& e = table[slot];
      if (e.group < 0) {
        e = Slot{key, h, groups++};
        out[i] = e.group;
        break;
      }
      if (e.hash == h && equal(e.key, key)) {
        out[i] = e.group;
        break;
      }
      slot = (slot + 1) & mask;
    }
  }
  return groups;
}

int64_t group_index_int_cpu(const at::Tensor& ids, const at::Tensor& inverse) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.dim() == 1,
              "ids must be a contiguous 1-D int64 CPU tensor");
  TORCH_CHECK(inverse.scalar_type() == at::kLong && inverse.is_contiguous() && inverse.numel() == ids.numel(),
              "inverse must be a contiguous int64 tensor like ids");
  auto key_at = [](const void* src, int64_t i) { return static_cast<const int64_t*>(src)[i]; };
  return assign_groups<int64_t>(
      ids.numel(), +key_at, ids.data_ptr<int64_t>(), [](int64_t k) { return static_cast<uint64_t>(k); },
      [](int64_t a, int64_t b) { return a == b; }, inverse.data_ptr<int64_t>());
}

// Python objects (verl's uid strings, or any hashables) -> group numbers, with Python's own
// hash and equality, written into an int64 buffer (a numpy array). The ids are read from a
// snapshot of the list and held by owned references: __hash__ / __eq__ run arbitrary Python code,
// which may mutate or clear the caller's list. A one-element tensor id stands for its value
// (tensors hash by identity), as in the eager reference.
int64_t group_index_objects(const pybind11::list& ids, const pybind11::buffer& out, const pybind11::object& tensor_type) {
  namespace py = pybind11;
  const py::list snapshot = py::reinterpret_steal<py::list>(PyList_GetSlice(ids.ptr(), 0, PY_SSIZE_T_MAX));
  if (!snapshot) throw py::error_already_set();
  const auto n = static_cast<int64_t>(PyList_GET_SIZE(snapshot.ptr()));
  const py::buffer_info info = out.request(/*writable=*/true);
  if (info.ndim != 1 || info.itemsize != 8 || info.size != n || info.format.find_first_of("qlLQ") == std::string::npos) {
    throw py::value_error("out must be a writable int64 buffer with one element per id");
  }
  TORCH_CHECK(PyType_Check(tensor_type.ptr()), "tensor_type must be a type");
  const auto* tensor_cls = reinterpret_cast<PyTypeObject*>(tensor_type.ptr());
  std::vector<py::object> owned;  // values of tensor ids
  std::vector<PyObject*> keys(n);
  for (int64_t i = 0; i < n; ++i) {
    PyObject* o = PyList_GET_ITEM(snapshot.ptr(), i);
    if (PyObject_TypeCheck(o, const_cast<PyTypeObject*>(tensor_cls))) {
      const py::object t = py::reinterpret_borrow<py::object>(o);
      if (t.attr("numel")().cast<int64_t>() != 1) {
        throw py::value_error("a group id that is a tensor must hold one value");
      }
      owned.push_back(t.attr("item")());
      o = owned.back().ptr();
    }
    keys[i] = o;
  }
  auto key_at = [](const void* src, int64_t i) { return static_cast<PyObject* const*>(src)[i]; };
  auto hash = [](PyObject* o) {
    const Py_hash_t h = PyObject_Hash(o);
    if (h == -1) throw py::error_already_set();
    return static_cast<uint64_t>(h);
  };
  auto equal = [](PyObject* a, PyObject* b) {
    if (a == b) return true;
    const int eq = PyObject_RichCompareBool(a, b, Py_EQ);
    if (eq < 0) throw py::error_already_set();
    return eq == 1;
  };
  return assign_groups<PyObject*>(n, +key_at, keys.data(), hash, equal, static_cast<int64_t*>(info.ptr));
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
  m.def(
      "policy_loss_fwd(Tensor log_prob, Tensor old_log_prob, Tensor advantages, Tensor mask, int mode, "
      "float clip_low, float clip_high, float clip_c, float clip_cov_ratio, float clip_cov_lb, float clip_cov_ub, "
      "float kl_cov_ratio, float ppo_kl_coef, int seed, Tensor(a!) loss, Tensor(b!) dloss_dlogp, "
      "Tensor(c!) stats) -> ()");
  m.def(
      "group_advantages(Tensor scores, Tensor inverse, int groups, bool norm_by_std, float eps, Tensor(a!) mean, "
      "Tensor(b!) std, Tensor(c!) count, Tensor(d!)? advantages) -> ()");
  m.def("group_index_int(Tensor ids, Tensor(a!) inverse) -> int");
  m.def(
      "linear_logprobs_entropy_fwd(Tensor hidden, Tensor weight, Tensor labels, float temperature, "
      "Tensor(a!) logp, Tensor(b!) entropy, Tensor(c!) stats) -> ()");
  m.def(
      "linear_logprobs_entropy_bwd(Tensor hidden, Tensor weight, Tensor labels, Tensor stats, Tensor entropy, "
      "Tensor? grad_logp, Tensor? grad_entropy, float temperature, Tensor(a!) grad_hidden, "
      "Tensor(b!) grad_weight) -> ()");
}

TORCH_LIBRARY_IMPL(spear_kernels, CPU, m) {
  m.impl("logprobs_entropy_fwd", &spear_kernels::logprobs_entropy_fwd_cpu);
  m.impl("logprobs_entropy_bwd", &spear_kernels::logprobs_entropy_bwd_cpu);
  m.impl("stream_read", &spear_kernels::stream_read_cpu);
  m.impl("policy_loss_fwd", &spear_kernels::policy_loss_fwd_cpu);
  m.impl("group_advantages", &spear_kernels::group_advantages_cpu);
  m.impl("group_index_int", &spear_kernels::group_index_int_cpu);
  m.impl("linear_logprobs_entropy_fwd", &spear_kernels::linear_logprobs_entropy_fwd_cpu);
  m.impl("linear_logprobs_entropy_bwd", &spear_kernels::linear_logprobs_entropy_bwd_cpu);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "spear_kernels C++ CPU kernels (operators live in torch.ops.spear_kernels)";
  m.def("cpu_capability", [] { return std::string(spear_kernels::kernels().name); },
        "The CPU capability whose kernels this process runs (DEFAULT, AVX2 or AVX512).");
  m.def("policy_loss_modes", [] {
    using spear_kernels::PolicyLossMode;
    return std::vector<std::pair<std::string, int>>{{"vanilla", static_cast<int>(PolicyLossMode::kVanilla)},
                                                    {"clip_cov", static_cast<int>(PolicyLossMode::kClipCov)},
                                                    {"kl_cov", static_cast<int>(PolicyLossMode::kKlCov)},
                                                    {"gpg", static_cast<int>(PolicyLossMode::kGpg)}};
  }, "The C++ policy-loss mode ids by name.");
  m.def("exp_bound", &spear_kernels::exp_bound_cpu, pybind11::arg("n"),
        "Computes n of the kernels' exp2 with no memory traffic (the benchmarks' compute limit).");
  m.def("group_index", &spear_kernels::group_index_objects, pybind11::arg("ids"), pybind11::arg("out"),
        pybind11::arg("tensor_type"),
        "Number the hashables in `ids` by first appearance into the int64 buffer `out`; returns the count.");
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
