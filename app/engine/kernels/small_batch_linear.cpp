// y = x W^T for a few rows of x (decode at batch 1-4), bfloat16, on CPUs with AVX-512 or AVX2; and, on CPUs
// without AVX-512 BF16, for any number of rows (bf16_linear).
//
// At batch 1 a projection is a matrix-vector product: its time is reading W once. oneDNN's packed
// bf16 matmul reads SmolLM2's layer weights at ~16 GB/s on this 2-core EPYC (15 ms of a 22 ms step); this
// streams each weight row once with `vdpbf16ps` (bf16 pairs multiplied exactly, float32 accumulation)
// and reduces 16 rows' dot products together, at close to the machine's read bandwidth.
//
//   x  [m, k] bfloat16, contiguous, m <= 4
//   w  [n, k] bfloat16, contiguous (the plain weight, out_features x in_features), k a multiple of 32
//   returns [m, n] bfloat16 (float32 sums rounded to nearest even, as a bf16 matmul's output is)
//
// The sum over k is in a fixed order that does not depend on m or on the thread split.
//
// On AVX-512 CPUs without BF16 (Intel Skylake-SP to Ice Lake) oneDNN's bf16 matmul is emulated: 59 GFLOP/s on
// a 2-core Ice Lake, against ~140 for its float32 one, so a bf16 model's batch-64 step took 375 ms there against
// float32's 228. `bf16_linear` computes any number of rows in float32 FMAs straight from the bf16 weights: x's
// bf16 pairs are split into float32 halves once per call, and each weight row is split in registers and used
// for 4 rows of x at a time (4 weight rows x 4 rows of x per pass). The arithmetic is dot_bf16_pairs' to the
// bit, in the same order, so a row's result is the same at any batch size, and the same as small_batch_linear's.
// AVX2 CPUs (AMD Zen 2-3, Intel Haswell to Alder Lake's cores) run the same kernel 8 lanes wide, which has 16
// registers: 2 weight rows x 4 rows of x per pass (4 x 1 for a single row), blocks of 8 columns; oneDNN's bf16
// there is reference code (~1 GFLOP/s on a Zen 3 EPYC) and it packs no bf16 weights at all.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "avx2.h"
#include "avx512.h"
#include "parallel.h"

namespace {

#ifdef PROMPTSERVE_AVX512
using promptserve::dot_bf16_pairs;
using promptserve::sum16;
using promptserve::to_bf16;
using promptserve::tail_mask;

constexpr int PREFETCH_ROWS = 8;  // how far ahead the weight stream is fetched (2, 4 and 8 measured alike)

// 16 output columns [n0, n0 + 16) of M rows; rows past n are zero-padded and not stored
template <int M>
void block16(const c10::BFloat16* __restrict x, const c10::BFloat16* __restrict w, int64_t n, int64_t k,
             int64_t n0, c10::BFloat16* __restrict y) {
  __m512 partial[M][16];
  const int live = static_cast<int>(std::min<int64_t>(16, n - n0));
  for (int r = 0; r < 16; ++r) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    if (r < live) {
      const c10::BFloat16* wr = w + (n0 + r) * k;
      const char* ahead = reinterpret_cast<const char*>(wr + PREFETCH_ROWS * k);
      for (int64_t c = 0; c < k; c += 32) {
        _mm_prefetch(ahead + c * 2, _MM_HINT_T0);
        const __m512i wv = _mm512_loadu_si512(wr + c);
        for (int m = 0; m < M; ++m) acc[m] = dot_bf16_pairs(acc[m], _mm512_loadu_si512(x + m * k + c), wv);
      }
    }
    for (int m = 0; m < M; ++m) partial[m][r] = acc[m];
  }
  for (int m = 0; m < M; ++m)
    _mm256_mask_storeu_epi16(y + m * n + n0, tail_mask(live), to_bf16(sum16(partial[m])));
}

template <int M>
void linear_rows(const c10::BFloat16* x, const c10::BFloat16* w, int64_t n, int64_t k, c10::BFloat16* y) {
  // blocks of 16 outputs; chunks of 8 blocks (~100 KB of weights) keep the threads' streams long
  promptserve::parallel_chunks((n + 15) / 16, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) block16<M>(x, w, n, k, b * 16, y);
  });
}
#endif

// The wide kernel: on AVX-512 CPUs without BF16, and (8 lanes instead of 16) on AVX2 CPUs
#if (defined(PROMPTSERVE_AVX512) && !defined(__AVX512BF16__)) || defined(PROMPTSERVE_AVX2)
#define PROMPTSERVE_WIDE 1

// Rows of x as float32 halves of its bf16 pairs, [m][k / 2] each: `odd` holds elements 2i + 1, `even` 2i (what
// dot_bf16_pairs splits a vector into)
struct SplitRows {
  const float* odd;
  const float* even;
  int64_t pairs;  // k / 2
};

// The vector operations the wide kernel needs, per instruction set: W lanes of float32, and the weight rows a
// pass reads together (rows_at_once: as many as the register file holds accumulators for)
#ifdef PROMPTSERVE_AVX512
struct Lanes {
  using F = __m512;
  using I = __m512i;
  static constexpr int W = 16;
  static constexpr int rows_at_once(int) { return 4; }
  static F zero() { return _mm512_setzero_ps(); }
  static I load_pairs(const c10::BFloat16* p) { return _mm512_loadu_si512(p); }  // W bf16 pairs
  static F odd(I v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u)))); }
  static F even(I v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  // lane i of sums[i]'s lanes summed, rounded to bf16, the first `live` stored
  static void store(c10::BFloat16* y, const F* sums, int live) {
    _mm256_mask_storeu_epi16(y, tail_mask(live), to_bf16(sum16(sums)));
  }
};
#else  // AVX2
struct Lanes {
  using F = __m256;
  using I = __m256i;
  static constexpr int W = 8;
  // one row of x: 4 weight rows (4 accumulators + 8 weight halves + 2 of x = 14 registers), so that 4 chains
  // of dependent FMAs hide their latency (a decode step's projections 12.5 ms against 13.6 with 2, Zen 3 EPYC);
  // more rows of x: 2 (8 accumulators + 4 + 2)
  static constexpr int rows_at_once(int m) { return m == 1 ? 4 : 2; }
  static F zero() { return _mm256_setzero_ps(); }
  static I load_pairs(const c10::BFloat16* p) { return promptserve::avx2::load_pairs(p); }
  static F odd(I v) { return promptserve::avx2::odd(v); }
  static F even(I v) { return promptserve::avx2::even(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }

  static void store(c10::BFloat16* y, const F* sums, int live) {
    const __m128i out = promptserve::avx2::to_bf16(promptserve::avx2::sum8(sums));
    if (live == W) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y), out);
    } else {  // the block's tail: the live columns only
      alignas(16) uint16_t lanes[W];
      _mm_store_si128(reinterpret_cast<__m128i*>(lanes), out);
      std::memcpy(y, lanes, live * sizeof(uint16_t));
    }
  }
};
#endif
constexpr int64_t X_SPAN_BYTES = 20 << 10;  // of L1 (32 KB on Zen 2-4, 48 KB on Ice Lake)
constexpr int BLOCK_COLS = Lanes::W;  // output columns a block computes: one vector of sums a row of x

// BLOCK_COLS output columns from n0 of M <= 4 rows (y's rows ldy apart); weight rows past n are read as row
// n - 1 and not stored (the sums keep each lane's apart, so they do not reach the stored lanes)
template <int M>
void wide_block(SplitRows x, const c10::BFloat16* __restrict w, int64_t n, int64_t k, int64_t n0,
                c10::BFloat16* __restrict y, int64_t ldy) {
  using F = Lanes::F;
  constexpr int W = Lanes::W, R = Lanes::rows_at_once(M);
  const int live = static_cast<int>(std::min<int64_t>(W, n - n0));
  F partial[M][W];
  for (int m = 0; m < M; ++m)  // the lanes of columns past n: summed, never stored
    for (int r = live; r < W; ++r) partial[m][r] = Lanes::zero();
  // k in spans whose M rows of x (float32 halves, 8 bytes an element) stay in L1 while the block's W / R passes
  // read them: at 4 rows of k = 1536 they would not (down_proj 129 -> 136 GFLOP/s at 64 rows, 99 -> 118 at 4, best
  // of 31 interleaved, Zen 3 EPYC); a lane's FMAs are the same, in the same order, whatever the spans
  const int64_t steps = k / (2 * W), most = std::max<int64_t>(1, X_SPAN_BYTES / (8 * M) / (2 * W));
  const int64_t spans = (steps + most - 1) / most, span = (steps + spans - 1) / spans * (2 * W);
  for (int64_t c0 = 0; c0 < k; c0 += span) {
    const int64_t c1 = std::min(k, c0 + span);
    for (int r = 0; r < live; r += R) {
      F acc[M][R];  // a lane's sums go on from the last span's: the same FMAs, in the same order, as one pass
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < R; ++j) acc[m][j] = c0 == 0 ? Lanes::zero() : partial[m][r + j];
      const c10::BFloat16* wr[R];
      for (int j = 0; j < R; ++j) wr[j] = w + std::min<int64_t>(n0 + r + j, n - 1) * k;
      for (int64_t c = c0; c < c1; c += 2 * W) {
        F odd_w[R], even_w[R];
        for (int j = 0; j < R; ++j) {
          _mm_prefetch(reinterpret_cast<const char*>(wr[j] + R * k + c), _MM_HINT_T0);  // the next pass's row
          const Lanes::I v = Lanes::load_pairs(wr[j] + c);
          odd_w[j] = Lanes::odd(v);
          even_w[j] = Lanes::even(v);
        }
        for (int m = 0; m < M; ++m) {
          F xo = Lanes::load(x.odd + m * x.pairs + c / 2), xe = Lanes::load(x.even + m * x.pairs + c / 2);
          // held in registers: a compiler tuning for a generic x86-64-v3 (the image's prebuilt level) folded each
          // load into every FMA that uses it, reading x R times: 131-144 against 150-162 GFLOP/s at 64 rows
          asm("" : "+v"(xo), "+v"(xe));
          for (int j = 0; j < R; ++j)  // dot_bf16_pairs' order: the odd elements' product first
            acc[m][j] = Lanes::fma(xe, even_w[j], Lanes::fma(xo, odd_w[j], acc[m][j]));
        }
      }
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < R; ++j) partial[m][r + j] = acc[m][j];
    }
  }
  for (int m = 0; m < M; ++m) Lanes::store(y + m * ldy + n0, partial[m], live);
}

constexpr int64_t ROWS_PER_PASS = 64;  // rows of x a pass over the weights takes: their halves stay in L2

void wide_rows(const c10::BFloat16* x, const c10::BFloat16* w, int64_t m, int64_t n, int64_t k, c10::BFloat16* y) {
  const int64_t pairs = k / 2;
  // written in full below: not zeroed first (a memset of 8 bytes an element of x, 1.7 MB a batch-64 layer)
  const auto odd = std::make_unique_for_overwrite<float[]>(m * pairs);
  const auto even = std::make_unique_for_overwrite<float[]>(m * pairs);
  const auto* bits = reinterpret_cast<const uint32_t*>(x);  // a bf16 pair as one 32-bit word, element 2i low
  at::parallel_for(0, m * pairs, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t odd_bits = bits[i] & 0xFFFF0000u, even_bits = bits[i] << 16;
      std::memcpy(&odd[i], &odd_bits, 4);
      std::memcpy(&even[i], &even_bits, 4);
    }
  });
  for (int64_t m0 = 0; m0 < m; m0 += ROWS_PER_PASS) {
    const int64_t rows = std::min(ROWS_PER_PASS, m - m0);
    // a block is BLOCK_COLS / rows_at_once passes of the FMA loop per 4 rows: small chunks at many rows
    promptserve::parallel_chunks((n + BLOCK_COLS - 1) / BLOCK_COLS, rows <= 4 ? 128 / BLOCK_COLS : 1,
                                 [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int64_t r = m0; r < m0 + rows; r += 4) {
          const SplitRows part{odd.get() + r * pairs, even.get() + r * pairs, pairs};
          c10::BFloat16* out = y + r * n;
          switch (std::min<int64_t>(4, m0 + rows - r)) {
            case 1: wide_block<1>(part, w, n, k, b * BLOCK_COLS, out, n); break;
            case 2: wide_block<2>(part, w, n, k, b * BLOCK_COLS, out, n); break;
            case 3: wide_block<3>(part, w, n, k, b * BLOCK_COLS, out, n); break;
            default: wide_block<4>(part, w, n, k, b * BLOCK_COLS, out, n); break;
          }
        }
    });
  }
}
#endif  // the wide kernel

}  // namespace

// the entry points, declared in kernels.h: decode_layers.cpp calls them directly
namespace promptserve {

bool small_batch_linear_supported() {
#if defined(PROMPTSERVE_AVX512) || defined(PROMPTSERVE_WIDE)
  return true;
#else
  return false;
#endif
}

bool bf16_linear_supported() {
#ifdef PROMPTSERVE_WIDE
  return true;
#else
  return false;
#endif
}

namespace {

void check_operands(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "x [m, k], w [n, k], contiguous");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bfloat16 only");
  TORCH_CHECK(w.size(1) == x.size(1) && x.size(1) % 32 == 0, "k must match and be a multiple of 32");
}

}  // namespace

at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(small_batch_linear_supported(), "built without AVX-512 or AVX2");
  check_operands(x, w);
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(m >= 1 && m <= 4, "1 to 4 rows");
  at::Tensor y = at::empty({m, n}, x.options());
  const auto* xp = x.const_data_ptr<c10::BFloat16>();
  const auto* wp = w.const_data_ptr<c10::BFloat16>();
  auto* yp = y.mutable_data_ptr<c10::BFloat16>();
#if defined(PROMPTSERVE_WIDE)  // the same kernel as bf16_linear: a row's result is the same at any batch size
  wide_rows(xp, wp, m, n, k, yp);
#elif defined(PROMPTSERVE_AVX512)
  switch (m) {
    case 1: linear_rows<1>(xp, wp, n, k, yp); break;
    case 2: linear_rows<2>(xp, wp, n, k, yp); break;
    case 3: linear_rows<3>(xp, wp, n, k, yp); break;
    default: linear_rows<4>(xp, wp, n, k, yp); break;
  }
#endif
  return y;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(bf16_linear_supported(), "only built for CPUs without AVX-512 BF16 that have AVX-512 or AVX2");
  check_operands(x, w);
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
#ifdef PROMPTSERVE_WIDE
  if (m > 0)
    wide_rows(x.const_data_ptr<c10::BFloat16>(), w.const_data_ptr<c10::BFloat16>(), m, n, k,
              y.mutable_data_ptr<c10::BFloat16>());
#endif
  return y;
}

}  // namespace promptserve

TORCH_LIBRARY_FRAGMENT(promptserve, m) {
  m.def("small_batch_linear_supported() -> bool", [] { return promptserve::small_batch_linear_supported(); });
  m.def("small_batch_linear(Tensor x, Tensor w) -> Tensor");
  m.def("bf16_linear_supported() -> bool", [] { return promptserve::bf16_linear_supported(); });
  m.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(promptserve, CPU, m) {
  m.impl("small_batch_linear", &promptserve::small_batch_linear);
  m.impl("bf16_linear", &promptserve::bf16_linear);
}
