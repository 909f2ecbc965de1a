// Rotary embedding and KV-cache write of n tokens, in one pass over a layer's q/k/v projection: a decode
// step's new token of each sequence, or a prefill's real (unpadded) prompt tokens.
//
//   qkv      [n, (h + 2 kvh) d]  per token: q heads, then k heads, then v heads (the joined projection's
//                                 output), last dimension contiguous
//   cos, sin [n, d]              the rotary tables at each token's position, in qkv's dtype
//   k_cache, v_cache [R, kvh, L, d]  one layer of the cache (last dimension contiguous)
//   rows, at [n] int64           each token's cache row and the position it goes to
//   returns  q [n, h, d]         rotated, contiguous (the decode-attention kernel reads it as [n, kvh, g, d])
//
// The rotation is transformers' apply_rotary_pos_emb, operation for operation: out = x*cos +
// rotate_half(x)*sin with each product and the sum rounded to the storage type, as torch's elementwise
// ops do (the kernels are compiled with -ffp-contract=off, so no fused multiply-add merges them): the
// result is bit-identical to torch's in float32 and bfloat16. In torch this is ~12 operations a layer
// (views, the rotation, two indexed cache writes), 2.5-5 ms of a 74 ms batch-64 decode step on this CPU.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "parallel.h"

#include <cstdint>

namespace {

template <typename T>
inline T product(T a, T b) { return static_cast<T>(static_cast<float>(a) * static_cast<float>(b)); }
template <>
inline float product(float a, float b) { return a * b; }
template <typename T>
inline T plus(T a, T b) { return static_cast<T>(static_cast<float>(a) + static_cast<float>(b)); }
template <>
inline float plus(float a, float b) { return a + b; }

// out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[half:], x[:half]]
template <typename T>
void rotate(const T* __restrict x, const T* __restrict c, const T* __restrict s, int64_t d, T* __restrict out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = plus(product(x[i], c[i]), product(static_cast<T>(-x[i + half]), s[i]));
  for (int64_t i = half; i < d; ++i) out[i] = plus(product(x[i], c[i]), product(x[i - half], s[i]));
}

template <typename T>
void rotary_cache_write_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                      at::Tensor& v_cache, const at::Tensor& rows, const at::Tensor& at_, int64_t h, int64_t kvh,
                      at::Tensor& q) {
  const int64_t n = qkv.size(0), d = cos.size(1);
  const T* src = qkv.const_data_ptr<T>();
  const T* cp = cos.const_data_ptr<T>();
  const T* sp = sin.const_data_ptr<T>();
  T* kp = k_cache.mutable_data_ptr<T>();
  T* vp = v_cache.mutable_data_ptr<T>();
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  const int64_t* ap = at_.const_data_ptr<int64_t>();
  T* qp = q.mutable_data_ptr<T>();
  const int64_t s0 = qkv.stride(0), cs = cos.stride(0), ss = sin.stride(0);
  const int64_t k0 = k_cache.stride(0), k1 = k_cache.stride(1), k2 = k_cache.stride(2);
  const int64_t v0 = v_cache.stride(0), v1 = v_cache.stride(1), v2 = v_cache.stride(2);
  promptserve::parallel_chunks(n, 16, [&](int64_t begin, int64_t end) {  // rows of 16, claimed as threads go
    for (int64_t b = begin; b < end; ++b) {
      const T* x = src + b * s0;
      const T* c = cp + b * cs;
      const T* s = sp + b * ss;
      for (int64_t head = 0; head < h; ++head) rotate(x + head * d, c, s, d, qp + (b * h + head) * d);
      T* krow = kp + rp[b] * k0 + ap[b] * k2;
      T* vrow = vp + rp[b] * v0 + ap[b] * v2;
      for (int64_t head = 0; head < kvh; ++head) {
        rotate(x + (h + head) * d, c, s, d, krow + head * k1);
        const T* v = x + (h + kvh + head) * d;
        for (int64_t i = 0; i < d; ++i) vrow[head * v1 + i] = v[i];
      }
    }
  });
}

}  // namespace

// the entry points, declared in kernels.h: decode_layers.cpp calls them directly
namespace promptserve {

at::Tensor rotary_cache_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                       at::Tensor v_cache, const at::Tensor& rows, const at::Tensor& at_, int64_t h, int64_t kvh) {
  TORCH_CHECK(qkv.dim() == 2 && cos.dim() == 2 && sin.dim() == 2, "qkv [n, (h + 2 kvh) d], cos and sin [n, d]");
  const int64_t n = qkv.size(0), d = cos.size(1);
  TORCH_CHECK(d % 2 == 0 && qkv.size(1) == (h + 2 * kvh) * d && cos.size(0) == n && sin.sizes() == cos.sizes(),
              "qkv [n, (h + 2 kvh) d], cos and sin [n, d]");
  TORCH_CHECK(qkv.stride(1) == 1 && cos.stride(1) == 1 && sin.stride(1) == 1, "contiguous last dimensions");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == kvh &&
              k_cache.size(3) == d && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "k_cache and v_cache [R, kvh, L, d] with a contiguous last dimension");
  TORCH_CHECK(qkv.scalar_type() == cos.scalar_type() && cos.scalar_type() == sin.scalar_type() &&
              qkv.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "dtypes differ");
  TORCH_CHECK(rows.scalar_type() == at::kLong && at_.scalar_type() == at::kLong && rows.is_contiguous() &&
              at_.is_contiguous() && rows.numel() == n && at_.numel() == n, "rows and at: n contiguous int64");
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  const int64_t* ap = at_.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < n; ++b)  // a write outside the cache would corrupt memory: refuse it instead
    TORCH_CHECK(rp[b] >= 0 && rp[b] < k_cache.size(0) && ap[b] >= 0 && ap[b] < k_cache.size(2),
                "row or position outside the cache");
  at::Tensor q = at::empty({n, h, d}, qkv.options());
  switch (qkv.scalar_type()) {
    case at::kFloat: rotary_cache_write_impl<float>(qkv, cos, sin, k_cache, v_cache, rows, at_, h, kvh, q); break;
    case at::kBFloat16:
      rotary_cache_write_impl<c10::BFloat16>(qkv, cos, sin, k_cache, v_cache, rows, at_, h, kvh, q);
      break;
    case at::kHalf: rotary_cache_write_impl<c10::Half>(qkv, cos, sin, k_cache, v_cache, rows, at_, h, kvh, q); break;
    default: TORCH_CHECK(false, "unsupported dtype ", qkv.scalar_type());
  }
  return q;
}

}  // namespace promptserve

TORCH_LIBRARY_FRAGMENT(promptserve, m) {
  m.def("rotary_cache_write(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, "
        "Tensor at, int h, int kvh) -> Tensor");
}

TORCH_LIBRARY_IMPL(promptserve, CPU, m) { m.impl("rotary_cache_write", &promptserve::rotary_cache_write); }
