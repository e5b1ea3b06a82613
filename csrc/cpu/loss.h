#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace cxf {

std::tuple<at::Tensor, at::Tensor, at::Tensor> shortlist_bce_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                 const c10::optional<at::Tensor>& bias,
                                                                 const at::Tensor& idx, const at::Tensor& pos_offsets,
                                                                 const at::Tensor& pos_ids, double level_weight,
                                                                 bool sparse_grad, bool deterministic);

}  // namespace cxf
