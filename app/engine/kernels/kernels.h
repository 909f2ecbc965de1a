// The kernels' entry points, for kernels that call others directly (decode_layers.cpp) rather than through
// torch's dispatcher from Python. Each is defined in its own source and registered as torch.ops.promptserve.*.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace promptserve {

bool small_batch_linear_supported();
at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& w);
bool bf16_linear_supported();
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                                                double eps);
at::Tensor rotary_cache_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                              at::Tensor v_cache, const at::Tensor& rows, const at::Tensor& at_, int64_t h, int64_t kvh);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                            double scale, const std::optional<at::Tensor>& rows);

}  // namespace promptserve
