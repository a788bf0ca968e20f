// Helpers shared by the per-capability kernel files. Everything here lives in
// `spear_kernels::CPU_CAPABILITY`, so each capability's copy has its own symbols
// (the same trick ATen's DispatchStub kernels use): no ODR clash between the
// AVX-512, AVX2 and default builds of one file.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace spear_kernels {
inline namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;

// Load Vec::size() elements of T as fp32 (one vector).
template <typename T>
inline Vec load_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    Vec out;
    at::vec::load_fp32_from_bf16(p, out);
    return out;
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "fp32, bf16 or fp16 only");
    Vec out;
    at::vec::load_fp32_from_fp16(p, out);
    return out;
  }
}

// Store one fp32 vector as Vec::size() elements of T.
template <typename T>
inline void store_from_float(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, Vec::size());
  }
}

// 2^x for x in [kMinExp2Arg, ~1]. Anything below -149 gives exactly 0, which is
// what keeps -inf logits exact (after the caller's clamp, -inf never reaches here).
// AVX-512: round, a degree-5 polynomial on [-1/2, 1/2] (max rel. error 2.4e-7,
// coefficients fitted to minimise the relative error of 2^f), and vscalefps, which
// applies 2^n with correct underflow: 9 instructions instead of Sleef's ~20.
// AVX2: the same polynomial, 2^n through the exponent bits (denormal results flushed to 0). The default build
// uses ATen's exp2 (libm).
constexpr float kMinExp2Arg = -300.f;

// 2^f on [-1/2, 1/2], highest degree first (Horner).
constexpr float kExp2Poly[6] = {0.001327647129073739f, 0.009675540961325169f, 0.05550713092088699f,
                                0.24022120237350464f,  0.6931469440460205f,   1.0000001192092896f};

inline Vec exp2_clamped(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = x;
  const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(v, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int c = 1; c < 6; ++c) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[c]));
  return _mm512_scalef_ps(p, n);
#elif defined(CPU_CAPABILITY_AVX2)
  // The same polynomial; 2^n goes into the exponent field. Below -126 the result (a denormal, < 1.2e-38) is
  // flushed to 0, which the callers cannot tell from the exact value: every row holds a term 2^0 = 1.
  const __m256 v = x;
  const __m256 n = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(v, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int c = 1; c < 6; ++c) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[c]));
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256 scaled = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
  return _mm256_andnot_ps(_mm256_cmp_ps(v, _mm256_set1_ps(-126.f), _CMP_LT_OQ), scaled);
#else
  return x.exp2();
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace spear_kernels
