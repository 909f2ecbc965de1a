// What the kernels' AVX-512 paths share. PROMPTSERVE_AVX512 is defined where the compiler targets a CPU with
// AVX-512 F, BW, DQ and VL (x86-64-v4: Intel Skylake-SP and later, AMD Zen 4 and later); elsewhere the kernels
// use their portable code (or report themselves unsupported). Their bfloat16 dot products take `vdpbf16ps` where
// the CPU also has AVX-512 BF16 (Intel Cooper Lake, Sapphire Rapids and later, AMD Zen 4) and the same
// arithmetic in float32 FMAs where it has not (Skylake-SP, Cascade Lake, Ice Lake): the weights and the KV cache
// stay bfloat16 in memory either way, which is what a decode step's time goes to.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#include <immintrin.h>
#define PROMPTSERVE_AVX512 1

namespace promptserve {

// v[0..15] -> one vector whose lane i is the sum of v[i]'s 16 lanes: a transposing add tree, 45 adds and
// shuffles for 16 dot products instead of 16 full horizontal reductions. The order of the additions is
// fixed, so a dot product's result does not depend on what else is reduced with it.
inline __m512 sum16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of 4 consecutive vectors, in order
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // across the four 128-bit lanes: first pairs of lanes, then the pairs' sums
  const __m512 lo = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 hi = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)));
}

// lane i of acc plus a[2i+1] * b[2i+1] plus a[2i] * b[2i], a and b 32 bfloat16 each: vdpbf16ps. Without
// AVX-512 BF16 the same in two FMAs: a product of two bfloat16 is exact in float32, so each FMA rounds once, as
// each of vdpbf16ps' two additions does (it also flushes subnormal inputs to zero; the FMAs keep them).
inline __m512 dot_bf16_pairs(__m512 acc, __m512i a, __m512i b) {
#ifdef __AVX512BF16__
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));  // a bf16 in the top half is its float32
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, high)), _mm512_castsi512_ps(_mm512_and_si512(b, high)),
                        acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)),
                         acc);
#endif
}

// 16 float32 -> 16 bfloat16, rounded to nearest even (as a bf16 matmul's output and static_cast<BFloat16> are)
inline __m256i to_bf16(__m512 v) {
#ifdef __AVX512BF16__
  return (__m256i)_mm512_cvtneps_pbh(v);
#else  // c10's round_to_nearest_even: add 0x7FFF plus the kept part's lowest bit, keep the top half; NaN -> 0x7FC0
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i top = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  top = _mm512_mask_mov_epi32(top, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(top);
#endif
}

inline __mmask16 tail_mask(int64_t left) {  // the first min(left, 16) lanes
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

}  // namespace promptserve
#endif
