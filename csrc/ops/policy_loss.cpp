// policy_loss: the per-token PPO-family loss and its gradient (kernels: policy_loss_kernel.cpp).
#include "dispatch.h"

#include <torch/library.h>

#include <cmath>
#include <utility>

namespace spear_kernels {
namespace {

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

}  // namespace
}  // namespace spear_kernels

TORCH_LIBRARY_FRAGMENT(spear_kernels, m) {
  m.def(
      "policy_loss_fwd(Tensor log_prob, Tensor old_log_prob, Tensor advantages, Tensor mask, int mode, "
      "float clip_low, float clip_high, float clip_c, float clip_cov_ratio, float clip_cov_lb, float clip_cov_ub, "
      "float kl_cov_ratio, float ppo_kl_coef, int seed, Tensor(a!) loss, Tensor(b!) dloss_dlogp, "
      "Tensor(c!) stats) -> ()");
}

TORCH_LIBRARY_IMPL(spear_kernels, CPU, m) {
  m.impl("policy_loss_fwd", &spear_kernels::policy_loss_fwd_cpu);
}
