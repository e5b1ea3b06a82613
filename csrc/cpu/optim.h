#pragma once

#include <ATen/ATen.h>

namespace cxf {

void sparse_adamw_step_cpu(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                           const at::Tensor& rows, const at::Tensor& grad, int64_t step, double lr, double beta1,
                           double beta2, double eps, double weight_decay, const c10::optional<at::Tensor>& last_step,
                           const c10::optional<at::Tensor>& lr_history);

}  // namespace cxf
