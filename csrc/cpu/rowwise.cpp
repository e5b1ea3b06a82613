// Row-wise AdaGrad on the CPU (FBGEMM's EXACT_ROWWISE_ADAGRAD): one fp32 accumulator per row.
//   G_r += mean_d(g_rd^2)   (sum of squares in double, / D, rounded to float: backends agree on the bits)
//   p_r  = p_r * (1 - lr wd) - (lr / (sqrt(G_r) + eps)) * g_r
// Only the listed rows are read and written. bf16 / fp16 tables round to nearest or stochastically (cpu/sr.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "cpu/checks.h"
#include "cpu/optim.h"
#include "cpu/sr.h"

namespace cxf {

void sparse_rowwise_adagrad_step_cpu(const at::Tensor& param, const at::Tensor& state_sum, const at::Tensor& rows,
                                     const at::Tensor& grad, double lr, double eps, double weight_decay,
                                     int64_t step, bool stochastic_rounding, int64_t seed) {
  TORCH_CHECK(param.dim() == 2 && param.is_contiguous(), "param must be a contiguous 2-D table, got shape ",
              param.sizes());
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kBFloat16 ||
                  param.scalar_type() == at::kHalf,
              "param must be float32, bfloat16 or float16, got ", param.scalar_type());
  const int64_t N = param.size(0), D = param.size(1);
  TORCH_CHECK(state_sum.dim() == 1 && state_sum.size(0) == N && state_sum.scalar_type() == at::kFloat &&
                  state_sum.is_contiguous(),
              "state_sum must be a contiguous float32 tensor of ", N, " entries (one per row of param), got ",
              state_sum.scalar_type(), " of shape ", state_sum.sizes());
  const auto ids = check_sparse_rows(rows, grad, N, D, step, /*min_step=*/0);
  const int64_t U = ids.size(0);
  const int64_t* r = ids.data_ptr<int64_t>();
  const auto g = grad.to(at::kFloat).contiguous();
  const float* gp = g.data_ptr<float>();
  float* G = state_sum.data_ptr<float>();
  const float lr_f = float(lr), eps_f = float(eps), decay = float(1.0 - lr * weight_decay);
  const bool sr = stochastic_rounding && param.scalar_type() != at::kFloat;
  const uint32_t key = sr_key(seed, step);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sparse_rowwise_adagrad_step", [&] {
    using P = scalar_t;
    P* param_data = param.data_ptr<P>();
    at::parallel_for(0, U, 16, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t row = r[u];
        const float* g_row = gp + u * D;
        P* p_row = param_data + row * D;
        double acc = 0.0;
        for (int64_t d = 0; d < D; ++d) acc += double(g_row[d]) * double(g_row[d]);
        const float mean_sq = D > 0 ? float(acc / double(D)) : 0.f;
        const float sum = G[row] + mean_sq;
        G[row] = sum;
        const float scale = lr_f / (std::sqrt(sum) + eps_f);
        const uint32_t row_key = sr ? sr_row_key(key, row) : 0u;
        for (int64_t d = 0; d < D; ++d) {
          const float p = float(p_row[d]) * decay - scale * g_row[d];
          p_row[d] = round_to<P>(p, sr, row_key, d);
        }
      }
    });
  });
}

}  // namespace cxf
