// Plain-data parameter blocks passed from the dispatcher (ops.cpp) to the
// per-capability kernel files. No ATen types here: each kernel file is compiled
// once per CPU capability and must not disagree with its siblings on layout.
#pragma once

#include <cstdint>

namespace spear_kernels {

// Label value whose row is skipped: logp = entropy = 0, zero gradient.
constexpr int64_t kIgnoreIndex = -100;

enum class FloatKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

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

}  // namespace spear_kernels
