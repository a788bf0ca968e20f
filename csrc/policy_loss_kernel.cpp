// Per-token policy losses (vanilla PPO with clip-higher and dual clip, clip-cov, kl-cov, GPG),
// compiled once per CPU capability like logprobs_entropy_kernel.cpp.
//
// One vectorised pass computes every token's loss, its derivative w.r.t. log_prob (so the
// backward is a single multiply) and the masked sums behind the stats and the covariance
// means. clip_cov and kl_cov then select tokens:
//   clip_cov: a second vectorised pass finds the candidates (valid, not clipped by PPO,
//             lb < cov < ub); k of them are drawn uniformly (partial Fisher-Yates, seeded);
//   kl_cov:   a second pass keeps the k largest covariances among valid tokens: in small per-thread heaps
//             when k is small (the presets' 2e-4 of the tokens), else above a threshold read off a sample,
//             followed by an exact selection.
// Gradients follow torch's autograd conventions exactly, so this matches the eager reference:
// clamp passes the gradient on [min, max] inclusive, max/min split it in half on ties.
#include "kernels.h"
#include "vec_utils.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <array>
#include <functional>
#include <utility>
#include <vector>

namespace spear_kernels {
inline namespace CPU_CAPABILITY {
namespace {

constexpr float kLogRatioClamp = 20.f;

// Masked sums gathered by the first pass. "m" sums are weighted by the mask value, as verl's
// masked_mean; "valid" sums are plain sums over tokens with mask > 0, as verl's kl_cov means.
enum Sum : int {
  kMask = 0,       // sum m
  kNegKl,          // sum m * -clamp(log_prob - old)
  kClipped,        // sum m * [pg2 > pg1]
  kLower,          // sum m * [A < 0 and clipped > pg3]
  kAdvM,           // sum m * A
  kLogpM,          // sum m * log_prob
  kAbsKl,          // sum m * |log_prob - old|
  kValid,          // count of mask > 0
  kAdvValid,       // sum over valid of A
  kLogpValid,      // sum over valid of log_prob
  kNumSums
};

using Sums = std::array<double, kNumSums>;
using VecSums = std::array<Vec, kNumSums>;
constexpr int64_t kVecsPerFlush = 64;  // lane sums go to double every 64 vectors (1024 fp32 tokens)

// Lanes where `cond` is set take `a`, the others `b`.
inline Vec select(const Vec& cond, const Vec& a, const Vec& b) {
  return Vec::blendv(b, a, cond);
}

struct TokenMath {
  Vec loss, grad, pg1, pg2, raw, d, adv, logp, m;
};

// Everything per token that does not depend on a selection. `params` fixes the mode.
inline TokenMath token_math(const PolicyLossParams& p, int64_t i, int64_t count, VecSums* sums) {
  const Vec zero(0.f), one(1.f), half(0.5f);
  TokenMath t;
  t.logp = Vec::loadu(p.log_prob + i, count);
  t.adv = Vec::loadu(p.advantages + i, count);
  t.m = Vec::loadu(p.mask + i, count);  // tail lanes load as 0: they drop out of every sum
  t.raw = t.logp - Vec::loadu(p.old_log_prob + i, count);
  t.d = at::vec::clamp(t.raw, Vec(-kLogRatioClamp), Vec(kLogRatioClamp));
  const Vec in_clamp = (t.raw >= Vec(-kLogRatioClamp)) & (t.raw <= Vec(kLogRatioClamp));
  const Vec ratio = t.d.exp();
  const Vec neg_adv = zero - t.adv;
  t.pg1 = neg_adv * ratio;
  const Vec g1 = select(in_clamp, neg_adv * ratio, zero);  // d pg1 / d log_prob
  const Vec lo(1.f - p.clip_low), hi(1.f + p.clip_high);
  t.pg2 = neg_adv * at::vec::clamp(ratio, lo, hi);
  const Vec g2 = select((ratio >= lo) & (ratio <= hi), g1, zero);
  const Vec clipped = at::vec::maximum(t.pg1, t.pg2);
  const Vec g_clipped = select(t.pg1 > t.pg2, g1, select(t.pg1 < t.pg2, g2, (g1 + g2) * half));
  const Vec valid = t.m != zero;
  Vec lower_flag = zero;

  switch (p.mode) {
    case PolicyLossMode::kGpg:
      t.loss = zero - t.logp * t.adv;
      t.grad = neg_adv;
      break;
    case PolicyLossMode::kKlCov:
      t.loss = t.pg1;
      t.grad = g1;
      break;
    case PolicyLossMode::kClipCov:
      t.loss = clipped;
      t.grad = g_clipped;
      break;
    case PolicyLossMode::kVanilla: {
      const Vec pg3 = neg_adv * Vec(p.clip_c);
      const Vec dual = at::vec::minimum(pg3, clipped);
      const Vec g_dual = select(clipped < pg3, g_clipped, select(clipped > pg3, zero, g_clipped * half));
      const Vec negative = t.adv < zero;
      t.loss = select(negative, dual, clipped);
      t.grad = select(negative, g_dual, g_clipped);
      lower_flag = (clipped > pg3) & negative & one;
      break;
    }
  }
  if (sums != nullptr) {
    auto add = [&](Sum s, const Vec& v) { (*sums)[s] = (*sums)[s] + v; };
    auto masked = [&](const Vec& v) { return select(valid, v * t.m, zero); };
    add(kMask, t.m);
    add(kNegKl, masked(zero - t.d));
    add(kClipped, masked((t.pg2 > t.pg1) & one));
    add(kLower, masked(lower_flag));
    add(kAdvM, masked(t.adv));
    add(kLogpM, masked(t.logp));
    add(kAbsKl, masked(t.raw.abs()));
    const Vec positive = t.m > zero;
    add(kValid, positive & one);
    add(kAdvValid, select(positive, t.adv, zero));
    add(kLogpValid, select(positive, t.logp, zero));
  }
  return t;
}

// splitmix64: a small, well-mixed generator for the seeded choice among candidates.
struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t bound) {  // unbiased integer in [0, bound)
    const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
    uint64_t x;
    do x = next();
    while (x >= limit);
    return x % bound;
  }
};

template <typename PerChunk>
void for_chunks(int64_t n, PerChunk&& fn) {
  constexpr int64_t W = Vec::size();
  const int64_t nvec = (n + W - 1) / W;
  at::parallel_for(0, nvec, 2048, [&](int64_t begin, int64_t end) { fn(begin * W, std::min(end * W, n)); });
}

inline bool any_lane(const Vec& mask) {
  // A comparison sets every bit of a lane, so (mask & 1.0) is 1.0 in set lanes and 0 elsewhere.
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); },
                                        mask & Vec(1.f)) != 0.f;
}

// The covariance clip_cov and kl_cov rank tokens by: (A - mean A)(log_prob - mean log_prob).
inline Vec token_cov(const PolicyLossParams& p, int64_t i, int64_t count, float mean_adv, float mean_logp) {
  return (Vec::loadu(p.advantages + i, count) - Vec(mean_adv)) * (Vec::loadu(p.log_prob + i, count) - Vec(mean_logp));
}

// Per-chunk outputs of a parallel pass, concatenated in chunk order: the result does not depend on how the
// chunks were scheduled, and indices come out increasing without a sort.
template <typename T, typename PerChunk>
std::vector<T> gather_chunks(int64_t n, PerChunk&& fn) {
  std::vector<std::vector<std::pair<int64_t, std::vector<T>>>> per_thread(at::get_num_threads());
  for_chunks(n, [&](int64_t begin, int64_t end) {
    auto& chunks = per_thread[at::get_thread_num()];
    chunks.emplace_back(begin, std::vector<T>{});
    fn(begin, end, chunks.back().second);
  });
  std::vector<std::pair<int64_t, std::vector<T>>*> order;
  for (auto& chunks : per_thread)
    for (auto& c : chunks) order.push_back(&c);
  std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) { return a->first < b->first; });
  std::vector<T> all;
  for (const auto* c : order) all.insert(all.end(), c->second.begin(), c->second.end());
  return all;
}

// Flat indices of the clip_cov candidates (valid, not clipped by PPO, lb < cov < ub), in increasing order.
// The covariance window is tested first from three of the four inputs; the PPO clip (an exp) is computed only
// for vectors with a lane inside the window.
std::vector<int64_t> clip_cov_candidates(const PolicyLossParams& p, float mean_adv, float mean_logp) {
  constexpr int64_t W = Vec::size();
  return gather_chunks<int64_t>(p.n, [&](int64_t begin, int64_t end, std::vector<int64_t>& out) {
    for (int64_t i = begin; i < end; i += W) {
      const int64_t count = std::min(W, end - i);
      const Vec cov = token_cov(p, i, count, mean_adv, mean_logp);
      const Vec window = (Vec::loadu(p.mask + i, count) > Vec(0.f)) & (cov > Vec(p.clip_cov_lb)) &
                         (cov < Vec(p.clip_cov_ub));
      if (!any_lane(window)) continue;
      const TokenMath t = token_math(p, i, count, nullptr);
      const Vec cand = window & (t.pg2 <= t.pg1);
      if (!any_lane(cand)) continue;
      alignas(64) float flags[W];
      cand.store(flags);
      for (int64_t l = 0; l < count; ++l) {
        if (flags[l] != 0.f) out.push_back(i + l);  // non-zero bit pattern: the lane is set
      }
    }
  });
}

using CovEntry = std::pair<float, int64_t>;  // (cov, -index): larger is better, ties to the lower index
inline bool better(const CovEntry& a, const CovEntry& b) {
  return a.first > b.first || (a.first == b.first && a.second > b.second);
}

// Small k (the presets' 2e-4 of the tokens): each thread keeps a k-heap and skips, a vector at a time, every
// token that cannot enter it, so nearly all.
std::vector<CovEntry> kl_cov_heaps(const PolicyLossParams& p, int64_t k, float mean_adv, float mean_logp) {
  constexpr int64_t W = Vec::size();
  std::vector<std::vector<CovEntry>> heaps(at::get_num_threads());
  for_chunks(p.n, [&](int64_t begin, int64_t end) {
    auto& heap = heaps[at::get_thread_num()];  // min-heap under `better`: front is the worst kept
    for (int64_t i = begin; i < end; i += W) {
      const int64_t count = std::min(W, end - i);
      const Vec cov = token_cov(p, i, count, mean_adv, mean_logp);
      Vec eligible = Vec::loadu(p.mask + i, count) > Vec(0.f);
      if (static_cast<int64_t>(heap.size()) == k) eligible = eligible & (cov >= Vec(heap.front().first));
      if (!any_lane(eligible)) continue;
      alignas(64) float covs[W], flags[W];
      cov.store(covs);
      eligible.store(flags);
      for (int64_t l = 0; l < count; ++l) {
        if (flags[l] == 0.f) continue;
        const CovEntry e{covs[l], -(i + l)};
        if (static_cast<int64_t>(heap.size()) < k) {
          heap.push_back(e);
          std::push_heap(heap.begin(), heap.end(), better);
        } else if (better(e, heap.front())) {
          std::pop_heap(heap.begin(), heap.end(), better);
          heap.back() = e;
          std::push_heap(heap.begin(), heap.end(), better);
        }
      }
    }
  });
  std::vector<CovEntry> all;
  for (auto& h : heaps) all.insert(all.end(), h.begin(), h.end());
  return all;
}

// Every valid token whose covariance is >= `threshold`, as entries.
std::vector<CovEntry> kl_cov_at_least(const PolicyLossParams& p, float threshold, float mean_adv, float mean_logp) {
  constexpr int64_t W = Vec::size();
  return gather_chunks<CovEntry>(p.n, [&](int64_t begin, int64_t end, std::vector<CovEntry>& out) {
    for (int64_t i = begin; i < end; i += W) {
      const int64_t count = std::min(W, end - i);
      const Vec cov = token_cov(p, i, count, mean_adv, mean_logp);
      const Vec eligible = (Vec::loadu(p.mask + i, count) > Vec(0.f)) & (cov >= Vec(threshold));
      if (!any_lane(eligible)) continue;
      alignas(64) float covs[W], flags[W];
      cov.store(covs);
      eligible.store(flags);
      for (int64_t l = 0; l < count; ++l) {
        if (flags[l] != 0.f) out.emplace_back(covs[l], -(i + l));
      }
    }
  });
}

// The k valid tokens with the largest covariance (ties: lower index first), in no particular order.
// Larger k (ratios of 1e-2 and up): a threshold that about 1.25 k tokens pass is read off a strided sample,
// one vectorised pass keeps the tokens above it, and an exact selection runs on those. The selection is exact
// whatever the sample: when fewer than k tokens pass, every valid token is kept instead.
std::vector<int64_t> kl_cov_top_k(const PolicyLossParams& p, int64_t k, int64_t n_valid, float mean_adv,
                                  float mean_logp) {
  constexpr int64_t kSample = 16384;
  const int64_t stride = std::max<int64_t>(1, p.n / kSample);
  std::vector<CovEntry> all;
  const double expected_rank = static_cast<double>(k) / static_cast<double>(n_valid) * (p.n / stride);
  if (expected_rank < 64) {
    all = kl_cov_heaps(p, k, mean_adv, mean_logp);
  } else {
    std::vector<float> sample;
    for (int64_t i = 0; i < p.n; i += stride) {
      if (p.mask[i] > 0.f) sample.push_back((p.advantages[i] - mean_adv) * (p.log_prob[i] - mean_logp));
    }
    const auto rank = static_cast<int64_t>(1.25 * expected_rank + 4.0 * std::sqrt(expected_rank));
    float threshold = -INFINITY;
    if (rank < static_cast<int64_t>(sample.size())) {
      std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<float>());
      threshold = sample[rank];
    }
    all = kl_cov_at_least(p, threshold, mean_adv, mean_logp);
    if (static_cast<int64_t>(all.size()) < k) all = kl_cov_at_least(p, -INFINITY, mean_adv, mean_logp);
  }
  const int64_t keep = std::min<int64_t>(k, all.size());
  if (keep < static_cast<int64_t>(all.size())) std::nth_element(all.begin(), all.begin() + keep, all.end(), better);
  std::vector<int64_t> idx(keep);
  for (int64_t j = 0; j < keep; ++j) idx[j] = -all[j].second;
  return idx;
}

}  // namespace

void policy_loss_fwd(const PolicyLossParams& p) {
  constexpr int64_t W = Vec::size();
  std::vector<Sums> partial(at::get_num_threads());
  for (auto& s : partial) s.fill(0.0);
  for_chunks(p.n, [&](int64_t begin, int64_t end) {
    Sums& sums = partial[at::get_thread_num()];
    VecSums lanes;
    int64_t since_flush = 0;
    auto flush = [&] {
      for (int j = 0; j < kNumSums; ++j) {
        sums[j] += at::vec::vec_reduce_all<float>(std::plus<Vec>(), lanes[j]);
        lanes[j] = Vec(0.f);
      }
      since_flush = 0;
    };
    lanes.fill(Vec(0.f));
    for (int64_t i = begin; i < end; i += W) {
      const int64_t count = std::min(W, end - i);
      const TokenMath t = token_math(p, i, count, &lanes);
      t.loss.store(p.loss + i, count);
      t.grad.store(p.dloss_dlogp + i, count);
      if (++since_flush == kVecsPerFlush) flush();
    }
    flush();
  });
  Sums sums{};
  for (const auto& s : partial)
    for (int j = 0; j < kNumSums; ++j) sums[j] += s[j];
  const double denom = sums[kMask] + 1e-8;  // verl's masked_mean
  double clipfrac = sums[kClipped] / denom, ppo_kl = sums[kNegKl] / denom, lower = sums[kLower] / denom;

  if (p.mode == PolicyLossMode::kClipCov) {
    auto cand = clip_cov_candidates(p, static_cast<float>(sums[kAdvM] / denom),
                                          static_cast<float>(sums[kLogpM] / denom));
    const int64_t k = std::max<int64_t>(static_cast<int64_t>(p.clip_cov_ratio * sums[kMask]), 1);
    const int64_t take = std::min<int64_t>(k, cand.size());
    std::vector<int64_t> pool = std::move(cand);
    SplitMix64 rng{p.seed};
    double zeroed = 0.0;
    for (int64_t j = 0; j < take; ++j) {  // partial Fisher-Yates: pool[0..take) is a uniform draw
      std::swap(pool[j], pool[j + rng.below(pool.size() - j)]);
      const int64_t idx = pool[j];
      p.loss[idx] = 0.f;
      p.dloss_dlogp[idx] = 0.f;
      zeroed += p.mask[idx];
    }
    clipfrac = zeroed / denom;
    lower = 0.0;
  } else if (p.mode == PolicyLossMode::kKlCov) {
    const int64_t n_valid = static_cast<int64_t>(sums[kValid]);
    if (n_valid > 0) {
      const int64_t k = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(n_valid) * p.kl_cov_ratio));
      const auto top = kl_cov_top_k(p, k, n_valid, static_cast<float>(sums[kAdvValid] / n_valid),
                                    static_cast<float>(sums[kLogpValid] / n_valid));
      for (int64_t idx : top) {
        const float raw = p.log_prob[idx] - p.old_log_prob[idx];
        p.loss[idx] += p.ppo_kl_coef * std::abs(raw);
        p.dloss_dlogp[idx] += p.ppo_kl_coef * static_cast<float>((raw > 0.f) - (raw < 0.f));
      }
    }
    ppo_kl = sums[kAbsKl] / denom;
    clipfrac = lower = 0.0;
  } else if (p.mode == PolicyLossMode::kGpg) {
    clipfrac = lower = 0.0;
  }
  p.stats[0] = static_cast<float>(clipfrac);
  p.stats[1] = static_cast<float>(ppo_kl);
  p.stats[2] = static_cast<float>(lower);
}

}  // namespace CPU_CAPABILITY
}  // namespace spear_kernels
