// Row-sparse AdamW with 8-bit block-quantised moments on the CPU (lazy semantics only: untouched rows neither move
// nor decay). State: uint8 codes [N, D] per moment and fp32 scales [N, ceil(D / 256)], the absmax of each block of
// 256 consecutive elements of a row. The maps (ops/reference.py, the bit-exact reference):
//   exp_avg:    code = nearbyint((m / absmax) * 127) + 128          m = (code - 128) * absmax / 127
//   exp_avg_sq: code = nearbyint(sqrt(v / absmax) * 255)            r = code / 255, v = r * r * absmax
// (round half to even; an all-zero block has absmax 0 and codes 128 / 0). Per touched row and block: dequantise,
// one fp32 AdamW step in the order of sparse_adamw_step's kernel, then requantise with the block's fresh absmax.

// No FMA contraction (as optim.cpp): the C++ kernel equals the reference bit for bit. The header is first, so that
// the vector paths instantiated here (with_isa) take it.
#include "cpu/no_fp_contract.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu/adamw_math.h"
#include "cpu/checks.h"
#include "cpu/optim.h"
#include "cpu/sr.h"
#include "cpu/vec.h"

namespace cxf {
namespace {

constexpr int64_t kBlock = 256;

// One touched row: every block dequantised, stepped and requantised; straight loops that vectorise, compiled for
// the active path (isa.h). m_buf / v_buf: kBlock floats of scratch.
template <class P>
CXF_KERNEL void update_row_8bit_kernel(P* param, uint8_t* mc, float* ms, uint8_t* vc, float* vs, int64_t row,
                                       const float* grad, int64_t u, int64_t D, int64_t nb, const AdamWStep& h, bool sr,
                                       uint32_t row_key, float* __restrict m_buf, float* __restrict v_buf) {
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t d0 = b * kBlock, len = std::min(kBlock, D - d0);
    const int64_t off = row * D + d0;
    const float m_scale = ms[row * nb + b], v_scale = vs[row * nb + b];
    for (int64_t i = 0; i < len; ++i) {
      const int64_t d = d0 + i;
      float m = (float(mc[off + i]) - 128.f) * m_scale / 127.f;
      const float r = float(vc[off + i]) / 255.f;
      float v = r * r * v_scale;
      const float g = grad[u * D + d];
      float p = float(param[off + i]);
      adamw_element(p, m, v, g, h);
      param[off + i] = round_to<P>(p, sr, row_key, d);
      m_buf[i] = m;
      v_buf[i] = v;
    }
    // absmax as the largest bit pattern of |m| and v (>= 0): the same as a float max for the finite values that
    // reach here (non-finite gradients are refused or skipped before), and an integer max vectorises.
    uint32_t m_bits = 0, v_bits = 0;
    for (int64_t i = 0; i < len; ++i) {
      m_bits = std::max(m_bits, float_to_bits(m_buf[i]) & 0x7fffffffu);
      v_bits = std::max(v_bits, float_to_bits(v_buf[i]) & 0x7fffffffu);
    }
    const float m_max = bits_to_float(m_bits), v_max = bits_to_float(v_bits);
    ms[row * nb + b] = m_max;
    vs[row * nb + b] = v_max;
    for (int64_t i = 0; i < len; ++i) {
      const float tm = m_max > 0.f ? m_buf[i] / m_max : 0.f;
      mc[off + i] = uint8_t(int(std::nearbyint(tm * 127.f)) + 128);
      const float tv = v_max > 0.f ? v_buf[i] / v_max : 0.f;
      vc[off + i] = uint8_t(int(std::nearbyint(std::sqrt(tv) * 255.f)));
    }
  }
}

template <class P>
void update_rows_8bit(P* param, uint8_t* mc, float* ms, uint8_t* vc, float* vs, const int64_t* rows,
                      const float* grad, int64_t U, int64_t D, const AdamWStep& h, bool sr, uint32_t key) {
  const int64_t nb = (D + kBlock - 1) / kBlock;
  at::parallel_for(0, U, 16, [&](int64_t begin, int64_t end) {
    float m_buf[kBlock], v_buf[kBlock];
    for (int64_t u = begin; u < end; ++u) {
      if (u + kAdamWRowsAhead < end) {
        const int64_t next = rows[u + kAdamWRowsAhead];
        prefetch_adamw_rows(param + next * D, D * int64_t(sizeof(P)), mc + next * D, vc + next * D, D);
      }
      const int64_t row = rows[u];
      const uint32_t row_key = sr ? sr_row_key(key, row) : 0u;
      with_isa([&] {
        update_row_8bit_kernel<P>(param, mc, ms, vc, vs, row, grad, u, D, nb, h, sr, row_key, m_buf, v_buf);
      });
    }
  });
}

}  // namespace

void sparse_adamw8bit_step_cpu(const at::Tensor& param, const at::Tensor& exp_avg_codes,
                               const at::Tensor& exp_avg_scales, const at::Tensor& exp_avg_sq_codes,
                               const at::Tensor& exp_avg_sq_scales, const at::Tensor& rows, const at::Tensor& grad,
                               int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                               bool stochastic_rounding, int64_t seed) {
  TORCH_CHECK(param.dim() == 2 && param.is_contiguous(), "param must be a contiguous 2-D table, got shape ",
              param.sizes());
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kBFloat16 ||
                  param.scalar_type() == at::kHalf,
              "param must be float32, bfloat16 or float16, got ", param.scalar_type());
  const int64_t N = param.size(0), D = param.size(1), nb = (D + kBlock - 1) / kBlock;
  for (const auto* codes : {&exp_avg_codes, &exp_avg_sq_codes}) {
    TORCH_CHECK(codes->scalar_type() == at::kByte && codes->sizes() == param.sizes() && codes->is_contiguous(),
                "8-bit state codes must be contiguous uint8 tensors of the shape of param ", param.sizes(), ", got ",
                codes->scalar_type(), " ", codes->sizes());
  }
  for (const auto* scales : {&exp_avg_scales, &exp_avg_sq_scales}) {
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->dim() == 2 && scales->size(0) == N &&
                    scales->size(1) == nb && scales->is_contiguous(),
                "8-bit state scales must be contiguous float32 tensors of shape [", N, ", ", nb,
                "] (one per block of 256 elements of a row), got ", scales->scalar_type(), " ", scales->sizes());
  }
  const auto ids = check_sparse_rows(rows, grad, N, D, step);
  const int64_t U = ids.size(0);
  const int64_t* r = ids.data_ptr<int64_t>();
  const AdamWStep h = adamw_step_constants(step, lr, beta1, beta2, eps, weight_decay);
  const auto g = grad.to(at::kFloat).contiguous();
  const bool sr = stochastic_rounding && param.scalar_type() != at::kFloat;
  const uint32_t key = sr_key(seed, step);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sparse_adamw8bit_step", [&] {
    update_rows_8bit<scalar_t>(param.data_ptr<scalar_t>(), exp_avg_codes.data_ptr<uint8_t>(),
                               exp_avg_scales.data_ptr<float>(), exp_avg_sq_codes.data_ptr<uint8_t>(),
                               exp_avg_sq_scales.data_ptr<float>(), r, g.data_ptr<float>(), U, D, h, sr, key);
  });
}

}  // namespace cxf
