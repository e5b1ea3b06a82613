#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace cxf {

at::Tensor shortlist_score_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& idx, bool sparse_grad, bool deterministic,
                               const c10::optional<at::Tensor>& weight_scale);

at::Tensor shortlist_score_grad_input_cpu(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& idx,
                                          const c10::optional<at::Tensor>& weight_scale);

std::tuple<at::Tensor, at::Tensor> shortlist_score_grad_weight_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& idx, int64_t num_rows,
                                                                   bool deterministic,
                                                                   c10::optional<at::ScalarType> dtype);

std::tuple<at::Tensor, at::Tensor, at::Tensor> shortlist_score_grad_weight_rows_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& idx, c10::optional<at::ScalarType> dtype);

}  // namespace cxf
