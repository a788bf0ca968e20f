// Plain-data parameter blocks passed from the dispatcher (csrc/ops/*.cpp) to the
// per-capability kernel files. No ATen types here: each kernel file is compiled
// once per CPU capability and must not disagree with its siblings on layout.
#pragma once

#include <cstdint>

namespace spear_kernels {

// Label value whose row is skipped: logp = entropy = 0, zero gradient.
constexpr int64_t kIgnoreIndex = -100;

enum class FloatKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Running softmax statistics of one row, merged block by block (see softmax_rows.h).
struct SoftmaxRowState {
  float max_z = -__builtin_inff();  // running max logit
  double s = 0.0;                   // sum 2^{(z - max_z) log2(e) / T}
  double d = 0.0;                   // sum of exponent * 2^{exponent}
};

struct LogprobsEntropyFwdParams {
  const void* logits;      // [N, V] rows `row_stride` elements apart, unit stride inside a row
  int64_t row_stride;
  FloatKind kind;
  const int64_t* labels;   // [N]
  int64_t rows;            // N
  int64_t vocab;           // V
  float inv_temperature;
  float* logp;             // [N] out
  float* entropy;          // [N] out
  float* stats;            // [N, 2] out, saved for the backward: (max logit, log2 sum 2^{(z - max) log2(e) / T});
                           // logsumexp(z / T) = max / T + ln2 * stats[:, 1]
};

struct LogprobsEntropyBwdParams {
  const void* logits;      // as in the forward
  int64_t row_stride;
  FloatKind kind;
  const int64_t* labels;
  int64_t rows;
  int64_t vocab;
  float inv_temperature;
  const float* stats;      // [N, 2] from the forward
  const float* entropy;    // [N] from the forward
  const float* grad_logp;  // [N] or nullptr (no gradient reached logp)
  const float* grad_entropy;  // [N] or nullptr
  void* grad_logits;       // [N, V] contiguous, same dtype as logits; every element is written
};

using LogprobsEntropyFwdFn = void (*)(const LogprobsEntropyFwdParams&);
using LogprobsEntropyBwdFn = void (*)(const LogprobsEntropyBwdParams&);
using StreamReadFn = double (*)(const float* data, int64_t n);
using ExpBoundFn = double (*)(int64_t n);

}  // namespace spear_kernels

namespace spear_kernels {

// The ids are the positions in spear_kernels._validation.POLICY_LOSS_MODES (a test pins them through
// spear_kernels._C.policy_loss_modes()).
enum class PolicyLossMode : int { kVanilla = 0, kClipCov = 1, kKlCov = 2, kGpg = 3 };
constexpr int kNumPolicyLossModes = 4;

// Per-token policy loss over B*L tokens (all arrays contiguous fp32, [B, L] flattened).
struct PolicyLossParams {
  const float* log_prob;
  const float* old_log_prob;
  const float* advantages;
  const float* mask;
  int64_t n;                 // B * L
  PolicyLossMode mode;
  float clip_low, clip_high, clip_c;  // ratio bounds 1 - clip_low, 1 + clip_high; dual-clip bound
  double clip_cov_ratio;  // double: k = int(ratio * count) as Python computes it (0.02f * 40000 is 799.99998)
  float clip_cov_lb, clip_cov_ub;
  double kl_cov_ratio;
  float ppo_kl_coef;
  uint64_t seed;             // clip_cov's random choice among candidates
  float* loss;               // [n] out: per-token loss
  float* dloss_dlogp;        // [n] out: d loss / d log_prob (the backward multiplies by the upstream grad)
  float* stats;              // [3] out: pg_clipfrac, ppo_kl, pg_clipfrac_lower
};

using PolicyLossFn = void (*)(const PolicyLossParams&);

}  // namespace spear_kernels

namespace spear_kernels {

// One [rows, cols] chunk of logits z = hidden[t0:t0+rows] @ weight[col0:col0+cols]^T, produced by a
// GEMM into a contiguous workspace, handed to the epilogue (see linear_logprobs_entropy in ops/linear_logprobs_entropy.cpp).
struct LinearChunkFwdParams {
  const void* z;             // [rows, cols] contiguous
  FloatKind kind;
  int64_t rows, cols, col0;
  const int64_t* labels;     // [rows]
  float inv_temperature;
  SoftmaxRowState* states;   // [rows], merged with this chunk
  float* label_logit;        // [rows], set when the label falls in this chunk
  bool last;                 // final vocabulary chunk: also write the outputs below
  float* logp;               // [rows]
  float* entropy;            // [rows]
  float* stats;              // [rows, 2] (max logit, log2 S), as logprobs_entropy saves
};

struct LinearChunkBwdParams {
  void* z;                   // [rows, cols] contiguous logits, overwritten with d loss / d z
  FloatKind kind;
  int64_t rows, cols, col0;
  const int64_t* labels;
  float inv_temperature;
  const float* stats;        // [rows, 2]
  const float* entropy;      // [rows]
  const float* grad_logp;    // [rows] or nullptr
  const float* grad_entropy; // [rows] or nullptr
};

using LinearChunkFwdFn = void (*)(const LinearChunkFwdParams&);
using LinearChunkBwdFn = void (*)(const LinearChunkBwdParams&);

}  // namespace spear_kernels
