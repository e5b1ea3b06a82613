// The fp32 AdamW step of one element, its per-step constants and the row prefetch, shared by the CPU optimizers
// (optim.cpp: fp32 / bf16 moments, adamw8bit.cpp: 8-bit moments), so that both round exactly alike.
//
// Every multiply and add is rounded on its own, never fused into an FMA: the reference (ops/reference.py) and the
// Triton kernels round that way, and the tests compare bits. An includer must therefore compile without FMA
// contraction: it includes cpu/no_fp_contract.h before anything else, which this header checks.
#pragma once

#ifndef CXF_NO_FP_CONTRACT
#error "adamw_math.h: include cpu/no_fp_contract.h first in the including file (see above)"
#endif

#include <cmath>
#include <cstdint>

#include "cpu/isa.h"
#include "cpu/vec.h"

namespace cxf {

// The constants of AdamW step `step` (1-based): decoupled decay (1 - lr wd), step size lr / (1 - beta1^step) and
// 1 / sqrt(1 - beta2^step), computed in double and rounded once.
struct AdamWStep {
  float beta1, beta2, eps, decay, step_size, inv_sqrt_bc2;
};

inline AdamWStep adamw_step_constants(int64_t step, double lr, double beta1, double beta2, double eps,
                                      double weight_decay) {
  return {float(beta1),
          float(beta2),
          float(eps),
          float(1.0 - lr * weight_decay),
          float(lr / (1.0 - std::pow(beta1, double(step)))),
          float(1.0 / std::sqrt(1.0 - std::pow(beta2, double(step))))};
}

// One element: p, m, v in fp32, updated in place with gradient g.
CXF_KERNEL void adamw_element(float& p, float& m, float& v, float g, const AdamWStep& h) {
  p *= h.decay;
  m = h.beta1 * m + (1.f - h.beta1) * g;
  v = h.beta2 * v + (1.f - h.beta2) * g * g;
  p -= h.step_size * m / (std::sqrt(v) * h.inv_sqrt_bc2 + h.eps);
}

// Rows updated this many positions ahead are prefetched: the parameter row and both moment rows, three random rows.
constexpr int64_t kAdamWRowsAhead = 2;

inline void prefetch_adamw_rows(const void* param_row, int64_t param_bytes, const void* m_row, const void* v_row,
                                int64_t state_bytes) {
  prefetch_row(param_row, param_bytes);
  prefetch_row(m_row, state_bytes);
  prefetch_row(v_row, state_bytes);
}

}  // namespace cxf
