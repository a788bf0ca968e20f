// group_advantages: per-group statistics and GRPO advantages, and integer ids numbered into groups.
#include "dispatch.h"

#include <torch/library.h>
#include "group_index.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace spear_kernels {
namespace {

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

}  // namespace
}  // namespace spear_kernels

TORCH_LIBRARY_FRAGMENT(spear_kernels, m) {
  m.def(
      "group_advantages(Tensor scores, Tensor inverse, int groups, bool norm_by_std, float eps, Tensor(a!) mean, "
      "Tensor(b!) std, Tensor(c!) count, Tensor(d!)? advantages) -> ()");
  m.def("group_index_int(Tensor ids, Tensor(a!) inverse) -> int");
}

TORCH_LIBRARY_IMPL(spear_kernels, CPU, m) {
  m.impl("group_advantages", &spear_kernels::group_advantages_cpu);
  m.impl("group_index_int", &spear_kernels::group_index_int_cpu);
}
