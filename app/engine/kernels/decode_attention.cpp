// Decode attention for one new token per sequence, over a KV-cache view, on CPU.
//
// torch's CPU SDPA spends ~1 ms a layer on a decode batch of 64 (192 problems of 3 queries x ~100 keys),
// about 6x the time to read the keys and values once; this kernel reads each row's K/V once, in place
// (strided views of the cache, no copy, no mask tensor), and keeps everything else in float32 registers.
//
//   q        [n, kvh, g, d]  contiguous: the g query heads that share KV head h (grouped-query attention)
//   k, v     [n, kvh, W, d]  any strides with the last dimension contiguous (a view of the cache)
//   lengths  [n] int64       row b attends to key positions 0..lengths[b] (its new token is at lengths[b])
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

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <limits>
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
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);  // below, exp underflows float32 anyway (the result is then ~1e-38, not 0)
  const float t = x * 1.44269504088896341f;
  const float whole = std::floor(t);
  const float f = t - whole;
  float p = 1.8775767e-3f;
  p = p * f + 8.9893397e-3f;
  p = p * f + 5.5826318e-2f;
  p = p * f + 2.4015361e-1f;
  p = p * f + 6.9315308e-1f;
  p = p * f + 9.9999994e-1f;
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

template <typename T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& lengths, double scale, at::Tensor& out) {
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
  at::parallel_for(0, n * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(g * d), row(d), acc(g * d), scores(g * width);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kvh, h = task % kvh;
      const int64_t len = std::min<int64_t>(std::max<int64_t>(lp[b] + 1, 1), width);
      attend(qp + task * g * d, kp + b * ks0 + h * ks1, ks2, vp + b * vs0 + h * vs1, vs2, len, g, d, sc,
                    qf.data(), row.data(), scores.data(), acc.data(), op + task * g * d);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-d");
  TORCH_CHECK(q.is_contiguous(), "q must be contiguous");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k and v need a contiguous last dimension");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v differ in shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "q and k differ");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "dtypes differ");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.is_contiguous() && lengths.numel() == q.size(0),
              "lengths must be n contiguous int64");
  at::Tensor out = at::empty(q.sizes(), q.options());
  switch (q.scalar_type()) {
    case at::kFloat: decode_attention_impl<float>(q, k, v, lengths, scale, out); break;
    case at::kBFloat16: decode_attention_impl<c10::BFloat16>(q, k, v, lengths, scale, out); break;
    case at::kHalf: decode_attention_impl<c10::Half>(q, k, v, lengths, scale, out); break;
    default: TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(promptserve, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(promptserve, CPU, m) { m.impl("decode_attention", &decode_attention); }
