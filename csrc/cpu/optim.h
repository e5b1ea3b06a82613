#pragma once

#include <ATen/ATen.h>

namespace cxf {

void sparse_adamw_step_cpu(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                           const at::Tensor& rows, const at::Tensor& grad, int64_t step, double lr, double beta1,
                           double beta2, double eps, double weight_decay, const c10::optional<at::Tensor>& last_step,
                           const c10::optional<at::Tensor>& lr_history, bool stochastic_rounding, int64_t seed);

// Row-wise AdaGrad (FBGEMM's EXACT_ROWWISE_ADAGRAD), csrc/cpu/rowwise.cpp.
void sparse_rowwise_adagrad_step_cpu(const at::Tensor& param, const at::Tensor& state_sum, const at::Tensor& rows,
                                     const at::Tensor& grad, double lr, double eps, double weight_decay,
                                     int64_t step, bool stochastic_rounding, int64_t seed);

// AdamW with 8-bit block-quantised moments (lazy semantics), csrc/cpu/adamw8bit.cpp.
void sparse_adamw8bit_step_cpu(const at::Tensor& param, const at::Tensor& exp_avg_codes,
                               const at::Tensor& exp_avg_scales, const at::Tensor& exp_avg_sq_codes,
                               const at::Tensor& exp_avg_sq_scales, const at::Tensor& rows, const at::Tensor& grad,
                               int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                               bool stochastic_rounding, int64_t seed);

}  // namespace cxf
