// What the kernels' AVX2 paths share: CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 2-3, Intel Haswell to
// Alder Lake's cores), 16 registers of 8 float32 lanes. PROMPTSERVE_AVX2 is defined where the compiler targets
// such a CPU and not an AVX-512 one (whose kernels use avx512.h). The bfloat16 arithmetic is avx512.h's without
// AVX-512 BF16, 8 lanes wide: a bf16 product is exact in float32, so each FMA rounds once.
#pragma once

#include "avx512.h"

#if !defined(PROMPTSERVE_AVX512) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <cstdint>
#define PROMPTSERVE_AVX2 1

namespace promptserve::avx2 {

// bf16 pairs (16 bfloat16 in 256 bits) as float32: the odd elements (2i + 1: the top half of each 32-bit
// word) and the even ones (2i, shifted up)
inline __m256 odd(__m256i v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u)))); }
inline __m256 even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256i load_pairs(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// 8 bfloat16 -> 8 float32 (exact)
inline __m256 bf16_to_f32(const void* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// v[0..7] -> one vector whose lane i is the sum of v[i]'s 8 lanes, in a fixed order (avx512.h's sum16, 8 wide)
inline __m256 sum8(const __m256* v) {
  __m256 pairs[4];
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    pairs[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m256 quads[2];
  for (int i = 0; i < 2; ++i) {  // per 128-bit lane: each of 4 consecutive vectors' sum over that lane
    const __m256d a = _mm256_castps_pd(pairs[2 * i]), b = _mm256_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(quads[0], quads[1], 0x20),   // the low 128-bit lanes' sums
                       _mm256_permute2f128_ps(quads[0], quads[1], 0x31));  // plus the high ones'
}

// 8 float32 -> 8 bfloat16, rounded to nearest even (avx512.h's to_bf16 without AVX-512 BF16); NaN -> 0x7FC0
inline __m128i to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i low_bit = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(low_bit, _mm256_set1_epi32(0x7FFF))), 16);
  top = _mm256_blendv_epi8(top, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));  // each fits 16 bits
}

// the first min(left, 8) lanes all ones, the others zero
inline __m256 tail_mask(int64_t left) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left < 8 ? left : 8)), lanes));
}

}  // namespace promptserve::avx2
#endif
