#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace cxf {

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& scores, int64_t k, const c10::optional<at::Tensor>& mask);

std::tuple<at::Tensor, at::Tensor> block_score_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias, const at::Tensor& clusters,
                                                   const at::Tensor& offsets, int64_t max_children,
                                                   const c10::optional<at::Tensor>& weight_scale);

std::tuple<at::Tensor, at::Tensor> cascade_search_cpu(at::TensorList features, at::TensorList weights,
                                                      const c10::List<c10::optional<at::Tensor>>& biases,
                                                      at::TensorList offsets, at::IntArrayRef beams,
                                                      at::IntArrayRef max_children, int64_t k,
                                                      c10::string_view combine,
                                                      const c10::optional<c10::List<c10::optional<at::Tensor>>>&
                                                          weight_scales);

}  // namespace cxf
