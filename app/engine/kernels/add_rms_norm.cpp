// The decoder's residual add and the next RMSNorm as one pass over the hidden state, bfloat16, on CPU.
//
//   sum    = x + delta                            (rounded to bfloat16, as torch's bf16 add does)
//   normed = weight * bf16(sum * rsqrt(mean(sum^2) + eps))   (LlamaRMSNorm: float32 inside, back to the
//                                                             input dtype, then the bf16 weight product)
//   x, delta [n, c] bfloat16 contiguous; weight [c] bfloat16 -> (sum, normed), both [n, c] bfloat16
//
// In torch these are 5 operations, each a dispatch and (at batch 64) a thread fork; a decode step runs 61
// of them: 2 ms of a 16 ms batch-1 step on this 2-core EPYC were norms, almost all of it overhead.
// Only the mean's summation order differs from torch's (float32, fixed per row: batch-invariant).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "parallel.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

inline float f32(c10::BFloat16 x) { return std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16); }

inline uint16_t bf16_bits(float f) {  // round to nearest even (NaN kept a NaN), as c10::BFloat16 does
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if (std::isnan(f)) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float round_bf16(float f) { return std::bit_cast<float>(static_cast<uint32_t>(bf16_bits(f)) << 16); }

void add_rms_norm_row(const c10::BFloat16* __restrict x, const c10::BFloat16* __restrict delta,
                      const c10::BFloat16* __restrict weight, int64_t c, float eps, float* __restrict buf,
                      c10::BFloat16* __restrict sum, c10::BFloat16* __restrict normed) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < c; ++i) {
    const float s = round_bf16(f32(x[i]) + f32(delta[i]));
    buf[i] = s;
    squares += s * s;
  }
  const float r = 1.f / std::sqrt(squares / static_cast<float>(c) + eps);
#pragma omp simd
  for (int64_t i = 0; i < c; ++i) {
    sum[i].x = bf16_bits(buf[i]);
    normed[i].x = bf16_bits(f32(weight[i]) * round_bf16(buf[i] * r));
  }
}

}  // namespace

// the entry points, declared in kernels.h: decode_layers.cpp calls them directly
namespace promptserve {

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && delta.scalar_type() == at::kBFloat16 &&
              weight.scalar_type() == at::kBFloat16, "bfloat16 only");
  TORCH_CHECK(x.is_contiguous() && delta.is_contiguous() && weight.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(x.sizes() == delta.sizes() && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "x and delta [..., c], weight [c]");
  const int64_t c = weight.size(0), n = x.numel() / c;
  at::Tensor sum = at::empty_like(x), normed = at::empty_like(x);
  const auto* xp = x.const_data_ptr<c10::BFloat16>();
  const auto* dp = delta.const_data_ptr<c10::BFloat16>();
  const auto* wp = weight.const_data_ptr<c10::BFloat16>();
  auto* sp = sum.mutable_data_ptr<c10::BFloat16>();
  auto* np = normed.mutable_data_ptr<c10::BFloat16>();
  const float e = static_cast<float>(eps);
  // rows in chunks of 16: a decode step of a few rows stays on this thread (no fork for 2 us of work)
  promptserve::parallel_chunks(n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(c);
    for (int64_t row = begin; row < end; ++row)
      add_rms_norm_row(xp + row * c, dp + row * c, wp, c, e, buf.data(), sp + row * c, np + row * c);
  });
  return {sum, normed};
}

}  // namespace promptserve

TORCH_LIBRARY_FRAGMENT(promptserve, m) {
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(promptserve, CPU, m) { m.impl("add_rms_norm", &promptserve::add_rms_norm); }
