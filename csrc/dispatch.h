// The registration side of spear_kernels._C, compiled with no ISA flags: the kernel table of the CPU capability this
// process runs (ATen's DispatchStub rule: the best capability that both this build and this CPU have, as ATen
// reports it; ATEN_CPU_CAPABILITY lowers it), and the checks every registered op makes before a kernel reads
// through a pointer (registered ops are public). Each op's file under ops/ includes this and registers itself.
#pragma once

#include "kernels.h"

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <optional>

namespace spear_kernels {

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

// The table of this process's capability (chosen once).
const KernelTable& kernels();

FloatKind float_kind(const at::Tensor& t);

// The gradient is a fresh [N, V] buffer, so first-touch page faults are a large part
// of the backward (measured here: 5x the compute at T=2048, V=32000). Asking for
// transparent huge pages on its 2 MB-aligned interior turns 512 faults into one.
// Advisory only: where THP is off, nothing changes.
void advise_huge_pages(void* ptr, size_t bytes);

// Every label is -100 (ignored) or in [0, vocab).
void check_labels_in_range(const at::Tensor& labels, int64_t vocab);
// Finite and >= spear_kernels._validation.MIN_TEMPERATURE.
void check_temperature(double temperature);
// nullptr for an absent tensor; else a contiguous fp32 tensor of n elements.
const float* optional_f32(const std::optional<at::Tensor>& t, int64_t n, const char* name);
// An output buffer of exactly this shape and dtype, contiguous on the CPU.
void check_out(const at::Tensor& out, at::IntArrayRef shape, at::ScalarType dtype, const char* name);
void check_f32_tensor(const at::Tensor& t, int64_t n, const char* name);

}  // namespace spear_kernels
