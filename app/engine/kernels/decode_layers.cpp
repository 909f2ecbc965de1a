// All decoder layers of a decode step of 1-4 tokens (Llama's layer: RMSNorm, fused q/k/v, rotary, attention
// over the cache, o, SiLU-gated MLP), bfloat16, as one op.
//
// At batch 1 a step's arithmetic is reading the weights (~10 ms for SmolLM2 on 2 cores); what surrounds it
// was hundreds of operations dispatched from Python (projections, norms, rotary, attention, the MLP's
// product), each costing microseconds of interpreter and dispatcher time: running them from here made the
// step 12.2 instead of 13.9 ms (AMD EPYC, benchmarks/step_profile.py prints both).
// This runs the same kernels in the same order from C++ (the projections, the fused residual add + norm,
// rotary + cache write and attention are this library's; SiLU and the product are ATen's own ops, as the
// model's modules call them), so its output is bit-identical to the layer-by-layer path.
//
//   x, h        [.., hidden] the residual stream and the first layer's normalized input
//   weights     4 per layer: q/k/v side by side, o, gate/up side by side, down (plain [out, in] bf16)
//   norms, eps  2 per layer: the norm after attention, then the next layer's input norm (the last: the
//               model's final norm)
//   cos, sin    [n, d] the tokens' rotary tables; k_cache, v_cache [layers, rows, kvh, positions, d]
//   rows, at    [n] each token's cache row and position; the attention reads rows [start, start + count),
//               positions [0, width)
//   in_batch    [n] or None: token i's row within [start, start + count) (None: row start + i); several
//               tokens of one row at consecutive positions are a speculative step's check of proposed tokens,
//               each attending up to its own position (speculation.py)
//   returns (x, h): the residual stream and the final norm's output
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "kernels.h"

namespace promptserve {

namespace {

at::Tensor projection(const at::Tensor& x, const at::Tensor& w) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return small_batch_linear(x.reshape({-1, x.size(-1)}).contiguous(), w).view(sizes);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_layers(at::Tensor x, at::Tensor h, at::TensorList weights,
                                                 at::TensorList norms, at::ArrayRef<double> eps, const at::Tensor& cos,
                                                 const at::Tensor& sin, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache, const at::Tensor& rows,
                                                 const at::Tensor& at_, int64_t start, int64_t count, int64_t width,
                                                 int64_t heads, int64_t kv_heads, double scale,
                                                 const std::optional<at::Tensor>& in_batch) {
  const int64_t layers = static_cast<int64_t>(weights.size()) / 4;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 4 * layers && static_cast<int64_t>(norms.size()) == 2 * layers &&
                  eps.size() == norms.size() && k_cache.size(0) == layers,
              "4 weights and 2 norms a layer, one cache layer each");
  TORCH_CHECK(heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  const int64_t d = k_cache.size(-1), group = heads / kv_heads;
  std::vector<int64_t> lead = x.sizes().vec();
  lead.back() = -1;
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor qkv = projection(h, weights[4 * i]);
    const at::Tensor q = rotary_cache_write(qkv.reshape({-1, qkv.size(-1)}), cos, sin, k_cache[i], v_cache[i], rows,
                                            at_, heads, kv_heads);
    const at::Tensor keys = k_cache[i].slice(0, start, start + count).slice(2, 0, width);
    const at::Tensor values = v_cache[i].slice(0, start, start + count).slice(2, 0, width);
    const at::Tensor o =
        decode_attention(q.view({-1, kv_heads, group, d}), keys, values, at_, scale, in_batch).view({q.size(0), -1});
    std::tie(x, h) = add_rms_norm(x.contiguous(), projection(o.view(lead), weights[4 * i + 1]).contiguous(),
                                  norms[2 * i], eps[2 * i]);
    const std::vector<at::Tensor> gate_up = projection(h, weights[4 * i + 2]).chunk(2, -1);
    const at::Tensor mlp = projection(at::silu(gate_up[0]) * gate_up[1], weights[4 * i + 3]);
    std::tie(x, h) = add_rms_norm(x.contiguous(), mlp.contiguous(), norms[2 * i + 1], eps[2 * i + 1]);
  }
  return {x, h};
}

}  // namespace promptserve

TORCH_LIBRARY_FRAGMENT(promptserve, m) {
  m.def("decode_layers(Tensor x, Tensor h, Tensor[] weights, Tensor[] norms, float[] eps, Tensor cos, Tensor sin, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, Tensor at, int start, int count, int width, int heads, "
        "int kv_heads, float scale, Tensor? in_batch=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(promptserve, CPU, m) { m.impl("decode_layers", &promptserve::decode_layers); }
