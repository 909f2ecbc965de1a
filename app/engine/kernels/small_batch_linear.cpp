// y = x W^T for a few rows of x (decode at batch 1-4), bfloat16, on CPUs with AVX-512 BF16.
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
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "avx512_bf16.h"

namespace {

#ifdef PROMPTSERVE_AVX512_BF16
using promptserve::sum16;
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
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + c);
        for (int m = 0; m < M; ++m) acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * k + c), wv);
      }
    }
    for (int m = 0; m < M; ++m) partial[m][r] = acc[m];
  }
  for (int m = 0; m < M; ++m)
    _mm256_mask_storeu_epi16(y + m * n + n0, tail_mask(live), (__m256i)_mm512_cvtneps_pbh(sum16(partial[m])));
}

template <int M>
void linear_rows(const c10::BFloat16* x, const c10::BFloat16* w, int64_t n, int64_t k, c10::BFloat16* y) {
  // blocks of 16 outputs; a grain of 8 blocks (~100 KB of weights) keeps the threads' streams long
  at::parallel_for(0, (n + 15) / 16, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) block16<M>(x, w, n, k, b * 16, y);
  });
}
#endif

}  // namespace

// the entry points, declared in kernels.h: decode_layers.cpp calls them directly
namespace promptserve {

bool small_batch_linear_supported() {
#ifdef PROMPTSERVE_AVX512_BF16
  return true;
#else
  return false;
#endif
}

at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(small_batch_linear_supported(), "built without AVX-512 BF16");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "x [m, k], w [n, k], contiguous");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bfloat16 only");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(w.size(1) == k && k % 32 == 0, "k must match and be a multiple of 32");
  TORCH_CHECK(m >= 1 && m <= 4, "1 to 4 rows");
  at::Tensor y = at::empty({m, n}, x.options());
#ifdef PROMPTSERVE_AVX512_BF16
  const auto* xp = x.const_data_ptr<c10::BFloat16>();
  const auto* wp = w.const_data_ptr<c10::BFloat16>();
  auto* yp = y.mutable_data_ptr<c10::BFloat16>();
  switch (m) {
    case 1: linear_rows<1>(xp, wp, n, k, yp); break;
    case 2: linear_rows<2>(xp, wp, n, k, yp); break;
    case 3: linear_rows<3>(xp, wp, n, k, yp); break;
    default: linear_rows<4>(xp, wp, n, k, yp); break;
  }
#endif
  return y;
}

}  // namespace promptserve

TORCH_LIBRARY_FRAGMENT(promptserve, m) {
  m.def("small_batch_linear_supported() -> bool", [] { return promptserve::small_batch_linear_supported(); });
  m.def("small_batch_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(promptserve, CPU, m) { m.impl("small_batch_linear", &promptserve::small_batch_linear); }
