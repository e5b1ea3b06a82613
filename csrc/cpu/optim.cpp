// Fused row-sparse AdamW on the CPU: reads and writes only the touched rows of a table and its two moments.
//
// Lazy mode updates the listed rows with the global step's bias correction. Exact mode (a per-row `last_step`)
// first replays the steps a row missed as AdamW steps with a zero gradient, so the row ends where dense AdamW
// over the whole table would have put it (up to fp32 rounding). The replay stops early once the momentum's
// contribution is far below an ulp of the parameter (or zero: a row never touched has m = v = 0), and applies the
// remaining weight decay as one product, so catching up costs O(steps with visible momentum), not O(steps).

// Every multiply and add of an update is rounded on its own, never fused into an FMA: the reference
// (ops/reference.py) and the Triton kernel round the same way, so all backends give the same bits (tested with
// stochastic rounding). The header is first, so that everything this file instantiates takes it.
#include "cpu/no_fp_contract.h"

#include "cpu/optim.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "cpu/adamw_math.h"
#include "cpu/checks.h"
#include "cpu/sr.h"
#include "cpu/vec.h"

namespace cxf {
namespace {

// Per-step constants for steps [first, step): decay (1 - lr wd), step size lr / (1 - b1^j), 1 / sqrt(1 - b2^j),
// and the product of the decays from j to step - 1 (double, so that long products do not drift).
struct Schedule {
  int64_t first = 0;
  std::vector<float> decay, step_size, inv_sqrt_bc2;
  std::vector<double> tail_decay;  // tail_decay[j - first] = prod_{i = j}^{step - 1} decay_i; one extra entry = 1
  std::vector<float> beta1_pow, beta2_pow;  // beta^k for k missed steps, k in [0, step - first]: no powf per element
};

Schedule make_schedule(int64_t first, int64_t step, const double* lr_history, double beta1, double beta2,
                       double weight_decay) {
  Schedule s;
  s.first = first;
  const int64_t n = std::max<int64_t>(step - first, 0);
  s.decay.resize(n);
  s.step_size.resize(n);
  s.inv_sqrt_bc2.resize(n);
  s.tail_decay.assign(n + 1, 1.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = first + i;
    const double lr = lr_history[j - 1];
    s.decay[i] = float(1.0 - lr * weight_decay);
    s.step_size[i] = float(lr / (1.0 - std::pow(beta1, double(j))));
    s.inv_sqrt_bc2[i] = float(1.0 / std::sqrt(1.0 - std::pow(beta2, double(j))));
  }
  for (int64_t i = n - 1; i >= 0; --i) s.tail_decay[i] = s.tail_decay[i + 1] * (1.0 - lr_history[first + i - 1] * weight_decay);
  s.beta1_pow.resize(n + 1);
  s.beta2_pow.resize(n + 1);
  for (int64_t k = 0; k <= n; ++k) {
    s.beta1_pow[k] = std::pow(float(beta1), float(k));
    s.beta2_pow[k] = std::pow(float(beta2), float(k));
  }
  return s;
}

// A row with no missed steps to replay (every row in lazy mode; in exact mode, a row also updated at the previous
// step): a straight loop over the row that vectorises, compiled for the active path (isa.h).
template <class P, class S>
CXF_KERNEL void adamw_row_kernel(P* __restrict p_row, S* __restrict m_row, S* __restrict v_row,
                                 const float* __restrict g_row, int64_t D, const AdamWStep& h, bool sr, uint32_t row_key) {
  for (int64_t d = 0; d < D; ++d) {
    float p = float(p_row[d]), m = float(m_row[d]), v = float(v_row[d]);
    adamw_element(p, m, v, g_row[d], h);
    p_row[d] = round_to<P>(p, sr, row_key, d);
    m_row[d] = S(m);
    v_row[d] = S(v);
  }
}

// Per-element state of a row while it replays missed steps (exact mode).
struct ReplayScratch {
  std::vector<float> p, m, v;
  std::vector<int32_t> stop;  // the step at which the element stopped replaying; -1 while it still replays
  void resize(int64_t D) {
    p.resize(D);
    m.resize(D);
    v.resize(D);
    stop.resize(D);
  }
};

// A row that missed steps (exact mode): it first replays them as zero-gradient AdamW steps, each element while its
// momentum still moves p by more than ~2^-30 of |p| (and is not zero); the rest of its missed steps is pure decay
// of p, m and v; then this step's update. The elements run in lock-step, one missed step at a time over the whole
// row (a loop that vectorises, masked by whether each element still replays), until none does: the same operations
// on each element as a per-element loop, so the same bits.
template <class P, class S>
CXF_KERNEL void adamw_replay_row_kernel(P* __restrict p_row, S* __restrict m_row, S* __restrict v_row,
                                        const float* __restrict g_row, int64_t D, int64_t first, int64_t step,
                                        const AdamWStep& h, const Schedule& sc, bool sr, uint32_t row_key,
                                        ReplayScratch& scratch) {
  float* __restrict pb = scratch.p.data();
  float* __restrict mb = scratch.m.data();
  float* __restrict vb = scratch.v.data();
  int32_t* __restrict stop = scratch.stop.data();
  for (int64_t d = 0; d < D; ++d) {
    pb[d] = float(p_row[d]);
    mb[d] = float(m_row[d]);
    vb[d] = float(v_row[d]);
    stop[d] = -1;
  }
  for (int64_t j = first; j < step; ++j) {
    const int64_t i = j - sc.first;
    const float decay = sc.decay[i], step_size = sc.step_size[i], inv_sqrt_bc2 = sc.inv_sqrt_bc2[i];
    const int32_t here = int32_t(j), next = int32_t(j + 1);
    int32_t replaying = 0;
    for (int64_t d = 0; d < D; ++d) {
      const bool live = stop[d] < 0;
      const float m0 = mb[d];
      const float p = pb[d] * decay, m = m0 * h.beta1, v = vb[d] * h.beta2;
      const float delta = step_size * m / (std::sqrt(v) * inv_sqrt_bc2 + h.eps);
      const float p1 = p - delta;
      const bool moves = live & (m0 != 0.f);
      pb[d] = moves ? p1 : pb[d];
      mb[d] = moves ? m : m0;
      vb[d] = moves ? v : vb[d];
      const bool settled = std::fabs(delta) <= 0x1.0p-30f * std::fabs(p1);
      stop[d] = !live ? stop[d] : (m0 == 0.f ? here : (settled ? next : -1));
      replaying |= int32_t(stop[d] < 0);
    }
    if (!replaying) break;
  }
  const int32_t end = int32_t(step);
  for (int64_t d = 0; d < D; ++d) {
    const int32_t j = stop[d] < 0 ? end : stop[d];
    float p = pb[d], m = mb[d], v = vb[d];
    if (j < end) {  // the rest is pure decay of p, m and v
      p = float(double(p) * sc.tail_decay[j - sc.first]);
      m *= sc.beta1_pow[end - j];
      v *= sc.beta2_pow[end - j];
    }
    adamw_element(p, m, v, g_row[d], h);
    p_row[d] = round_to<P>(p, sr, row_key, d);
    m_row[d] = S(m);
    v_row[d] = S(v);
  }
}

template <class P, class S>
void update_rows(P* param, S* m_state, S* v_state, const int64_t* rows, const float* grad, int64_t U, int64_t D,
                 int64_t step, const AdamWStep& h, const int64_t* last_step, const Schedule* sched, bool sr,
                 uint32_t key) {
  at::parallel_for(0, U, 16, [&](int64_t begin, int64_t end) {
    ReplayScratch scratch;
    if (last_step) scratch.resize(D);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t row = rows[u];
      if (u + kAdamWRowsAhead < end) {
        const int64_t next = rows[u + kAdamWRowsAhead];
        prefetch_adamw_rows(param + next * D, D * int64_t(sizeof(P)), m_state + next * D, v_state + next * D,
                            D * int64_t(sizeof(S)));
      }
      P* p_row = param + row * D;
      S* m_row = m_state + row * D;
      S* v_row = v_state + row * D;
      const float* g_row = grad + u * D;
      const int64_t first = last_step ? last_step[row] + 1 : step;
      const uint32_t row_key = sr ? sr_row_key(key, row) : 0u;
      if (first >= step) {
        with_isa([&] { adamw_row_kernel<P, S>(p_row, m_row, v_row, g_row, D, h, sr, row_key); });
        continue;
      }
      with_isa([&] {
        adamw_replay_row_kernel<P, S>(p_row, m_row, v_row, g_row, D, first, step, h, *sched, sr, row_key, scratch);
      });
    }
  });
}

}  // namespace

void sparse_adamw_step_cpu(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                           const at::Tensor& rows, const at::Tensor& grad, int64_t step, double lr, double beta1,
                           double beta2, double eps, double weight_decay, const c10::optional<at::Tensor>& last_step,
                           const c10::optional<at::Tensor>& lr_history, bool stochastic_rounding, int64_t seed) {
  TORCH_CHECK(param.dim() == 2 && param.is_contiguous(), "param must be a contiguous 2-D table, got shape ",
              param.sizes());
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kBFloat16 ||
                  param.scalar_type() == at::kHalf,
              "param must be float32, bfloat16 or float16, got ", param.scalar_type());
  for (const auto* state : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(state->sizes() == param.sizes() && state->is_contiguous(),
                "exp_avg and exp_avg_sq must be contiguous tensors of the shape of param");
    TORCH_CHECK(state->scalar_type() == at::kFloat || state->scalar_type() == at::kBFloat16,
                "optimizer state must be float32 or bfloat16, got ", state->scalar_type());
  }
  TORCH_CHECK(exp_avg.scalar_type() == exp_avg_sq.scalar_type(), "exp_avg and exp_avg_sq must share a dtype");
  const int64_t N = param.size(0), D = param.size(1);
  const auto ids = check_sparse_rows(rows, grad, N, D, step);
  const int64_t U = ids.size(0);
  const int64_t* r = ids.data_ptr<int64_t>();
  const bool exact = last_step.has_value() && last_step->defined();
  Schedule sched;
  const int64_t* last = nullptr;
  if (exact) {
    TORCH_CHECK(last_step->dim() == 1 && last_step->size(0) == N && last_step->scalar_type() == at::kLong &&
                    last_step->is_contiguous(),
                "last_step must be a contiguous int64 tensor of ", N, " entries");
    TORCH_CHECK(lr_history.has_value() && lr_history->defined() && lr_history->scalar_type() == at::kDouble &&
                    lr_history->dim() == 1 && lr_history->size(0) >= step - 1,
                "exact mode needs lr_history: float64 learning rates of steps 1 .. step - 1");
    last = last_step->data_ptr<int64_t>();
    int64_t first = step;
    for (int64_t u = 0; u < U; ++u) {
      TORCH_CHECK(last[r[u]] >= 0 && last[r[u]] < step, "last_step[", r[u], "] = ", last[r[u]],
                  " must be in [0, step)");
      first = std::min(first, last[r[u]] + 1);
    }
    const auto hist = lr_history->contiguous();
    sched = make_schedule(first, step, hist.data_ptr<double>(), beta1, beta2, weight_decay);
  }
  const AdamWStep h = adamw_step_constants(step, lr, beta1, beta2, eps, weight_decay);
  const auto g = grad.to(at::kFloat).contiguous();
  const bool sr = stochastic_rounding && param.scalar_type() != at::kFloat;
  const uint32_t key = sr_key(seed, step);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sparse_adamw_step", [&] {
    using P = scalar_t;
    if (exp_avg.scalar_type() == at::kFloat)
      update_rows<P, float>(param.data_ptr<P>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), r,
                            g.data_ptr<float>(), U, D, step, h, last, &sched, sr, key);
    else
      update_rows<P, at::BFloat16>(param.data_ptr<P>(), exp_avg.data_ptr<at::BFloat16>(),
                                   exp_avg_sq.data_ptr<at::BFloat16>(), r, g.data_ptr<float>(), U, D, step, h, last,
                                   &sched, sr, key);
  });
  if (exact) {
    int64_t* ls = last_step->data_ptr<int64_t>();
    for (int64_t u = 0; u < U; ++u) ls[r[u]] = step;
  }
}

}  // namespace cxf
