// Attention of single query tokens over a KV-cache view, on CPU: a decode step's new token of each
// sequence, or (with `rows`) every real token of a prefill, each against its own sequence's cache row.
//
// torch's CPU SDPA spends ~1 ms a layer on a decode batch of 64 (192 problems of 3 queries x ~100 keys),
// about 6x the time to read the keys and values once; this kernel reads each row's K/V once, in place
// (strided views of the cache, no copy, no mask tensor), and keeps everything else in float32 registers.
//
//   q        [n, kvh, g, d]  contiguous: the g query heads that share KV head h (grouped-query attention)
//   k, v     [B, kvh, W, d]  any strides with the last dimension contiguous (a view of the cache)
//   lengths  [n] int64       query i attends to key positions 0..lengths[i] (its own token is at lengths[i])
//   rows     [n] int64 or None  query i reads k[rows[i]], v[rows[i]]; None: k[i] (then B = n)
//   returns  [n, kvh, g, d]  softmax(q k^T * scale) v, in q's dtype
//
// Each (row, KV head) is an independent task, so a row's result never depends on what else is in the
// batch (batch invariance), and the float32 accumulation order is fixed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "avx2.h"
#include "avx512.h"
#include "parallel.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <optional>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// float32 from each storage type, written so that the compiler vectorizes the loops around it
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// exp(x) for x <= 0 (scores minus their maximum): 2^(x log2 e) split into an integer power of two and a
// degree-5 polynomial for 2^f on [0, 1) (relative error < 1e-7, float32's own precision). glibc's scalar
// expf does not vectorize without -ffast-math, which would also drop the IEEE semantics of everything
// else here; a decode step needs ~2 million of these.
constexpr float EXP2_POLY[] = {1.8775767e-3f, 8.9893397e-3f, 5.5826318e-2f, 2.4015361e-1f, 6.9315308e-1f,
                               9.9999994e-1f};  // 2^f on [0, 1), highest power first
constexpr int EXP2_TERMS = sizeof(EXP2_POLY) / sizeof(float);

inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);  // below, exp underflows float32 anyway (the result is then ~1e-38, not 0)
  const float t = x * 1.44269504088896341f;
  const float whole = std::floor(t);
  const float f = t - whole;
  float p = EXP2_POLY[0];
  for (int i = 1; i < EXP2_TERMS; ++i) p = p * f + EXP2_POLY[i];
  return p * std::bit_cast<float>(static_cast<uint32_t>(static_cast<int32_t>(whole) + 127) << 23);
}

// One (row, KV head): scores of the g queries against len keys, softmax, weighted sum of the values.
// G and D: the group size and head size when known at compile time (0: take them from g and d), so that
// for the common shapes the query and the accumulators stay in registers and every loop unrolls.
template <typename T, int G, int D>
void attend_one(const T* __restrict q, const T* __restrict k, int64_t k_step, const T* __restrict v, int64_t v_step,
                int64_t len, int64_t g_, int64_t d_, float scale, float* __restrict qf, float* __restrict row,
                float* __restrict scores, float* __restrict acc, T* __restrict out) {
  const int64_t g = G ? G : g_, d = D ? D : d_;
  for (int64_t i = 0; i < g * d; ++i) qf[i] = to_float(q[i]) * scale;
  for (int64_t t = 0; t < len; ++t) {
    const T* kt = k + t * k_step;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) row[j] = to_float(kt[j]);
    for (int64_t gi = 0; gi < g; ++gi) {
      const float* qg = qf + gi * d;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < d; ++j) s += qg[j] * row[j];
      scores[gi * len + t] = s;
    }
  }
  for (int64_t gi = 0; gi < g; ++gi) {
    float* s = scores + gi * len;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t t = 0; t < len; ++t) m = std::max(m, s[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < len; ++t) {
      s[t] = exp_nonpositive(s[t] - m);
      sum += s[t];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  for (int64_t i = 0; i < g * d; ++i) acc[i] = 0.f;
  for (int64_t t = 0; t < len; ++t) {
    const T* vt = v + t * v_step;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) row[j] = to_float(vt[j]);
    for (int64_t gi = 0; gi < g; ++gi) {
      const float p = scores[gi * len + t];
      float* a = acc + gi * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) a[j] += p * row[j];
    }
  }
  for (int64_t i = 0; i < g * d; ++i) out[i] = static_cast<T>(acc[i]);
}

#if defined(PROMPTSERVE_AVX512) || defined(PROMPTSERVE_AVX2)
// A key or value row's cache lines (D bfloat16). At batch 64 a step's keys and values are far larger than the
// caches (~240 MB for SmolLM2 at 160 positions), so both bf16 paths fetch a task's values while its scores
// are computed and the next task's keys while its values are summed.
template <int D>
inline void prefetch_row(const c10::BFloat16* p) {
  for (int i = 0; i < D * 2; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + i, _MM_HINT_T0);
}
#endif

#ifdef PROMPTSERVE_AVX512
using promptserve::dot_bf16_pairs;
using promptserve::sum16;
using promptserve::to_bf16;
using promptserve::tail_mask;

// The bfloat16 path on CPUs with AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake and later): the same
// computation as attend_one, about 3x faster, because the compiled generic loop spends most of its time
// converting keys to float32 and reducing each 64-wide dot product to a scalar, key by key.
// - q.k: `vdpbf16ps` multiplies bfloat16 pairs exactly into float32 and accumulates in float32, so keys are
//   never converted; the 16-lane partial sums of 16 keys are reduced together (sum16), not one at a time.
//   The scale is applied to the finished dot product (q is not pre-scaled: bfloat16 q times a float32
//   scale would need a float32 q, which vdpbf16ps cannot take; for head size 64 the scale is 1/8, exact).
// - softmax with the same exp polynomial, 16 keys at a time; p.v in float32 FMAs with each value row
//   converted once for all G queries, and the softmax's 1/sum applied once to the result.
// The summation order is fixed by the code, not by the batch: batch invariance holds as before.

// exp_nonpositive on 16 lanes: the same range reduction and polynomial
inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, whole);
  __m512 p = _mm512_set1_ps(EXP2_POLY[0]);
  for (int i = 1; i < EXP2_TERMS; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[i]));
  const __m512i two_to_whole =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(whole), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(two_to_whole));
}

inline __m512 bf16_to_f32(const c10::BFloat16* p) {  // 16 bfloat16 -> 16 float32 (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <int G, int D>
void attend_one_bf16(const c10::BFloat16* __restrict q, const c10::BFloat16* __restrict k, int64_t k_step,
                     const c10::BFloat16* __restrict v, int64_t v_step, int64_t len, float scale,
                     float* __restrict scores, c10::BFloat16* __restrict out, const c10::BFloat16* next_k,
                     int64_t next_len) {
  static_assert(D % 32 == 0, "a key row is whole 32-lane bfloat16 vectors");
  constexpr int KW = D / 32, VW = D / 16;
  const int64_t padded = (len + 15) / 16 * 16;  // scores rows are padded to whole blocks of 16 keys
  __m512i qv[G][KW];
  for (int gi = 0; gi < G; ++gi)
    for (int c = 0; c < KW; ++c) qv[gi][c] = _mm512_loadu_si512(q + gi * D + c * 32);
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 partial[G][16];
  for (int64_t block = 0; block < len; block += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - block));
    for (int t = 0; t < 16; ++t) {
      if (t < n) {
        const c10::BFloat16* kt = k + (block + t) * k_step;
        prefetch_row<D>(v + (block + t) * v_step);  // the values are read next: from memory now, not then
        __m512i kv[KW];
        for (int c = 0; c < KW; ++c) kv[c] = _mm512_loadu_si512(kt + c * 32);
        for (int gi = 0; gi < G; ++gi) {
          __m512 s = dot_bf16_pairs(_mm512_setzero_ps(), qv[gi][0], kv[0]);
          for (int c = 1; c < KW; ++c) s = dot_bf16_pairs(s, qv[gi][c], kv[c]);
          partial[gi][t] = s;
        }
      } else {
        for (int gi = 0; gi < G; ++gi) partial[gi][t] = _mm512_setzero_ps();
      }
    }
    for (int gi = 0; gi < G; ++gi)
      _mm512_storeu_ps(scores + gi * padded + block, _mm512_mul_ps(sum16(partial[gi]), sc));
  }
  // softmax numerators in place, 16 keys at a time (the tail masked); the 1/sum is applied to the output
  float inv[G];
  for (int gi = 0; gi < G; ++gi) {
    float* s = scores + gi * padded;
    __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < len; t += 16) m = _mm512_max_ps(m, _mm512_maskz_loadu_ps(tail_mask(len - t), s + t));
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t += 16) {
      const __mmask16 live = tail_mask(len - t);
      const __m512 e = _mm512_maskz_mov_ps(live, exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(s + t), top)));
      _mm512_storeu_ps(s + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[gi] = 1.f / _mm512_reduce_add_ps(sum);
  }
  __m512 acc[G][VW];
  for (int gi = 0; gi < G; ++gi)
    for (int c = 0; c < VW; ++c) acc[gi][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const c10::BFloat16* vt = v + t * v_step;
    if (t < next_len) prefetch_row<D>(next_k + t * k_step);  // the next task's keys, same stride
    __m512 row[VW];
    for (int c = 0; c < VW; ++c) row[c] = bf16_to_f32(vt + c * 16);
    for (int gi = 0; gi < G; ++gi) {
      const __m512 p = _mm512_set1_ps(scores[gi * padded + t]);
      for (int c = 0; c < VW; ++c) acc[gi][c] = _mm512_fmadd_ps(p, row[c], acc[gi][c]);
    }
  }
  for (int gi = 0; gi < G; ++gi) {  // normalized, rounded to nearest even as static_cast<BFloat16> does
    const __m512 scale_out = _mm512_set1_ps(inv[gi]);
    for (int c = 0; c < VW; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + gi * D + c * 16),
                          to_bf16(_mm512_mul_ps(acc[gi][c], scale_out)));
  }
}
#endif

#ifdef PROMPTSERVE_AVX2
namespace avx2 = promptserve::avx2;

// The bfloat16 path on AVX2 CPUs (AMD Zen 2-3, Intel Haswell to Alder Lake's cores): attend_one_bf16 above,
// 8 lanes wide, with its 16 registers in mind. q.k as bf16 pairs split into float32 halves (the two-FMA form of
// dot_bf16_pairs), 8 keys' partial sums reduced together (sum8); softmax 8 keys at a time, the tail masked;
// p.v over blocks of value columns so that the accumulators of all G queries fit the registers.
inline __m256 exp_nonpositive8(__m256 x) {  // exp_nonpositive on 8 lanes: the same reduction and polynomial
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 whole = _mm256_round_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, whole);
  __m256 p = _mm256_set1_ps(EXP2_POLY[0]);
  for (int i = 1; i < EXP2_TERMS; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[i]));
  const __m256i two_to_whole =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(whole), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_to_whole));
}

inline float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float add8(__m256 v) {  // a fixed order: halves, then pairs, then the last two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int G, int D>
void attend_one_bf16(const c10::BFloat16* __restrict q, const c10::BFloat16* __restrict k, int64_t k_step,
                     const c10::BFloat16* __restrict v, int64_t v_step, int64_t len, float scale,
                     float* __restrict scores, c10::BFloat16* __restrict out, const c10::BFloat16* next_k,
                     int64_t next_len) {
  static_assert(D % 32 == 0, "a key row is whole 16-lane bfloat16 vectors, value blocks whole 32 columns");
  constexpr int KW = D / 16;                 // 256-bit vectors of bf16 pairs in a key row
  constexpr int VB = G <= 3 ? 4 : 2;         // value vectors (8 columns each) a p.v pass accumulates
  const int64_t padded = (len + 7) / 8 * 8;  // scores rows are padded to whole blocks of 8 keys
  alignas(32) float q_odd[G][KW * 8], q_even[G][KW * 8];  // q split once, read from L1 for every key
  for (int gi = 0; gi < G; ++gi)
    for (int c = 0; c < KW; ++c) {
      const __m256i pairs = avx2::load_pairs(q + gi * D + c * 16);
      _mm256_store_ps(q_odd[gi] + c * 8, avx2::odd(pairs));
      _mm256_store_ps(q_even[gi] + c * 8, avx2::even(pairs));
    }
  const __m256 sc = _mm256_set1_ps(scale);
  __m256 partial[G][8];
  for (int64_t block = 0; block < len; block += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, len - block));
    for (int t = 0; t < 8; ++t) {
      if (t < n) {
        const c10::BFloat16* kt = k + (block + t) * k_step;
        prefetch_row<D>(v + (block + t) * v_step);  // the values are read next: from memory now, not then
        __m256 k_odd[KW], k_even[KW];
        for (int c = 0; c < KW; ++c) {
          const __m256i pairs = avx2::load_pairs(kt + c * 16);
          k_odd[c] = avx2::odd(pairs);
          k_even[c] = avx2::even(pairs);
        }
        for (int gi = 0; gi < G; ++gi) {  // dot_bf16_pairs' order: the odd elements' product first
          __m256 s = _mm256_setzero_ps();
          for (int c = 0; c < KW; ++c)
            s = _mm256_fmadd_ps(_mm256_load_ps(q_even[gi] + c * 8), k_even[c],
                                _mm256_fmadd_ps(_mm256_load_ps(q_odd[gi] + c * 8), k_odd[c], s));
          partial[gi][t] = s;
        }
      } else {
        for (int gi = 0; gi < G; ++gi) partial[gi][t] = _mm256_setzero_ps();
      }
    }
    for (int gi = 0; gi < G; ++gi)
      _mm256_storeu_ps(scores + gi * padded + block, _mm256_mul_ps(avx2::sum8(partial[gi]), sc));
  }
  float inv[G];  // softmax numerators in place, 8 keys at a time (the tail zeroed); 1/sum applied at the end
  for (int gi = 0; gi < G; ++gi) {
    float* s = scores + gi * padded;
    __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < len; t += 8)
      m = _mm256_max_ps(m, _mm256_blendv_ps(m, _mm256_loadu_ps(s + t), avx2::tail_mask(len - t)));
    const __m256 top = _mm256_set1_ps(max8(m));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; t += 8) {
      const __m256 e =
          _mm256_and_ps(avx2::tail_mask(len - t), exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + t), top)));
      _mm256_storeu_ps(s + t, e);
      sum = _mm256_add_ps(sum, e);
    }
    inv[gi] = 1.f / add8(sum);
  }
  for (int c0 = 0; c0 < D / 8; c0 += VB) {  // VB value vectors of every query per pass over the values
    __m256 acc[G][VB];
    for (int gi = 0; gi < G; ++gi)
      for (int c = 0; c < VB; ++c) acc[gi][c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
      const c10::BFloat16* vt = v + t * v_step + c0 * 8;
      if (c0 == 0 && t < next_len) prefetch_row<D>(next_k + t * k_step);  // the next task's keys, same stride
      __m256 row[VB];
      for (int c = 0; c < VB; ++c) row[c] = avx2::bf16_to_f32(vt + c * 8);
      for (int gi = 0; gi < G; ++gi) {
        const __m256 p = _mm256_broadcast_ss(scores + gi * padded + t);
        for (int c = 0; c < VB; ++c) acc[gi][c] = _mm256_fmadd_ps(p, row[c], acc[gi][c]);
      }
    }
    for (int gi = 0; gi < G; ++gi) {  // normalized, rounded to nearest even as static_cast<BFloat16> does
      const __m256 scale_out = _mm256_set1_ps(inv[gi]);
      for (int c = 0; c < VB; ++c)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + gi * D + (c0 + c) * 8),
                         avx2::to_bf16(_mm256_mul_ps(acc[gi][c], scale_out)));
    }
  }
}
#endif

template <typename T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& lengths, const int64_t* rows, double scale, at::Tensor& out) {
  const int64_t n = q.size(0), kvh = q.size(1), g = q.size(2), d = q.size(3), width = k.size(2);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const int64_t* lp = lengths.const_data_ptr<int64_t>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float sc = static_cast<float>(scale);

  auto attend = attend_one<T, 0, 0>;
  if (g == 3 && d == 64) attend = attend_one<T, 3, 64>;  // SmolLM2 (9 heads, 3 KV heads)
  else if (g == 4 && d == 128) attend = attend_one<T, 4, 128>;  // Llama-3-8B (32 heads, 8 KV heads)
  else if (g == 1 && d == 64) attend = attend_one<T, 1, 64>;
  else if (g == 1 && d == 128) attend = attend_one<T, 1, 128>;
#if defined(PROMPTSERVE_AVX512) || defined(PROMPTSERVE_AVX2)
  void (*attend_bf16)(const c10::BFloat16*, const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, int64_t,
                      float, float*, c10::BFloat16*, const c10::BFloat16*, int64_t) = nullptr;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (g == 3 && d == 64) attend_bf16 = attend_one_bf16<3, 64>;
    else if (g == 4 && d == 128) attend_bf16 = attend_one_bf16<4, 128>;
    else if (g == 1 && d == 64) attend_bf16 = attend_one_bf16<1, 64>;
    else if (g == 1 && d == 128) attend_bf16 = attend_one_bf16<1, 128>;
    else if (g == 2 && d == 64) attend_bf16 = attend_one_bf16<2, 64>;
    else if (g == 2 && d == 128) attend_bf16 = attend_one_bf16<2, 128>;
  }
#endif
  // keys query i attends to: positions 0..lengths[i], at least one, at most the view's width
  auto length_of = [&](int64_t i) { return std::min<int64_t>(std::max<int64_t>(lp[i] + 1, 1), width); };
  // a row's heads a chunk (the next head's keys are prefetched within it), claimed as the threads go
  promptserve::parallel_chunks(n * kvh, kvh, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(g * d), row(d), acc(g * d), scores(g * ((width + 15) / 16 * 16));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / kvh, h = task % kvh, b = rows ? rows[i] : i;
      const int64_t len = length_of(i);
#if defined(PROMPTSERVE_AVX512) || defined(PROMPTSERVE_AVX2)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (attend_bf16 != nullptr) {
          // the next task's keys (same row's next head, or the next row) are prefetched during this one's
          // values; its length bounds the prefetch
          const int64_t ni = (task + 1) / kvh, nh = (task + 1) % kvh;
          const bool more = task + 1 < end;
          const int64_t nb = more ? (rows ? rows[ni] : ni) : 0;
          attend_bf16(qp + task * g * d, kp + b * ks0 + h * ks1, ks2, vp + b * vs0 + h * vs1, vs2, len, sc,
                      scores.data(), op + task * g * d, more ? kp + nb * ks0 + nh * ks1 : nullptr,
                      more ? length_of(ni) : 0);
          continue;
        }
      }
#endif
      attend(qp + task * g * d, kp + b * ks0 + h * ks1, ks2, vp + b * vs0 + h * vs1, vs2, len, g, d, sc,
                    qf.data(), row.data(), scores.data(), acc.data(), op + task * g * d);
    }
  });
}

}  // namespace

// the entry points, declared in kernels.h: decode_layers.cpp calls them directly
namespace promptserve {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& lengths, double scale, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-d");
  TORCH_CHECK(q.is_contiguous(), "q must be contiguous");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k and v need a contiguous last dimension");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v differ in shape");
  TORCH_CHECK((rows.has_value() || k.size(0) == q.size(0)) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "q and k differ");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "dtypes differ");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.is_contiguous() && lengths.numel() == q.size(0),
              "lengths must be n contiguous int64");
  const int64_t* rp = nullptr;
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->is_contiguous() && rows->numel() == q.size(0),
                "rows must be n contiguous int64");
    rp = rows->const_data_ptr<int64_t>();
    for (int64_t i = 0; i < q.size(0); ++i)  // a read outside k would be a wild read: refuse it
      TORCH_CHECK(rp[i] >= 0 && rp[i] < k.size(0), "rows outside k");
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  switch (q.scalar_type()) {
    case at::kFloat: decode_attention_impl<float>(q, k, v, lengths, rp, scale, out); break;
    case at::kBFloat16: decode_attention_impl<c10::BFloat16>(q, k, v, lengths, rp, scale, out); break;
    case at::kHalf: decode_attention_impl<c10::Half>(q, k, v, lengths, rp, scale, out); break;
    default: TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace promptserve

TORCH_LIBRARY(promptserve, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale, Tensor? rows=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(promptserve, CPU, m) { m.impl("decode_attention", &promptserve::decode_attention); }
