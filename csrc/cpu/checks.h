// Argument checks of the CPU ops. The Python layer validates with friendlier messages first (and can be
// switched off); these stay on because they are cheap next to the kernels and keep bad ids from ever reading
// outside a table.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>

namespace cxf {

// float64 is accepted too: it computes in float64 throughout (for gradcheck).
inline bool is_float_storage(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_ids(const at::Tensor& idx) {
  TORCH_CHECK(idx.dim() == 2, "idx must be 2-D [B, K], got shape ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, "idx must be int32 or int64, got ",
              idx.scalar_type());
}

// Every id must lie in [-1, num_rows); a ValueError names the first offending value and its position, in the words
// of the Python check (ops/_validate.py), which leaves CPU ids to this one: its four torch calls cost 0.1-0.18 ms
// of a cold B = 1 call, this pass a microsecond. A branch-free pass (vectorised, threads for large batches) only
// says whether all ids are good; the loop that finds the first bad one runs only then. The branchy loop alone was
// ~1.3% of a B = 256 shortlist forward, all of it on one thread while the others waited.
inline void check_ids_in_range(const at::Tensor& idx, int64_t num_rows) {
  const auto ids = idx.contiguous();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "check_ids_in_range", [&] {
    const index_t* p = ids.data_ptr<index_t>();
    const int64_t n = ids.numel(), K = ids.size(1);
    std::atomic<bool> all_good{true};
    at::parallel_for(0, n, int64_t(1) << 18, [&](int64_t begin, int64_t end) {
      bool good = true;
      for (int64_t i = begin; i < end; ++i) good &= (int64_t(p[i]) >= -1) & (int64_t(p[i]) < num_rows);
      if (!good) all_good = false;
    });
    if (all_good) return;
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK_VALUE(p[i] >= -1 && p[i] < num_rows, "idx[", i / K, ", ", i % K, "] = ", int64_t(p[i]),
                        " is out of range [-1, ", num_rows, ") (-1 is the pad id)");
  });
}

inline bool has_tensor(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The touched rows of a sparse optimizer step: rows 1-D int64, unique, ascending and in [0, N) (a coalesced
// gradient), grad [U, D] with one row per id, step >= min_step (AdamW's bias correction counts from 1; row-wise
// AdaGrad only seeds its rounding with it). Returns rows made contiguous (its data is read by the caller).
inline at::Tensor check_sparse_rows(const at::Tensor& rows, const at::Tensor& grad, int64_t N, int64_t D,
                                    int64_t step, int64_t min_step = 1) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "rows must be a 1-D int64 tensor");
  const int64_t U = rows.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == U && grad.size(1) == D, "grad must have shape [", U, ", ", D,
              "] (one row per id in rows), got ", grad.sizes());
  TORCH_CHECK(step >= min_step, "step must be >= ", min_step, min_step == 1 ? " (1-based)" : "", ", got ", step);
  auto ids = rows.contiguous();
  const int64_t* r = ids.data_ptr<int64_t>();
  for (int64_t u = 0; u < U; ++u) {
    TORCH_CHECK_INDEX(r[u] >= 0 && r[u] < N, "rows[", u, "] = ", r[u], " is out of range [0, ", N, ")");
    TORCH_CHECK(u == 0 || r[u] > r[u - 1], "rows must be unique and ascending (a coalesced gradient); rows[", u,
                "] = ", r[u], " follows ", r[u - 1]);
  }
  return ids;
}

// An int8 table (inference) comes with its per-row fp32 scales [N]; a float table takes none.
inline void check_weight_scale(const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                               const char* weight_name = "weight", const char* scale_name = "weight_scale") {
  if (weight.scalar_type() != at::kChar) {
    TORCH_CHECK(!has_tensor(scale), scale_name, " is given but ", weight_name, " is ", weight.scalar_type(),
                ": a scale goes only with an int8 table");
    return;
  }
  TORCH_CHECK(has_tensor(scale), weight_name, " is int8 but ", scale_name,
              " is missing: an int8 table needs its per-row fp32 scales [N]");
  TORCH_CHECK(scale->dim() == 1 && scale->size(0) == weight.size(0), scale_name, " must have shape [",
              weight.size(0), "], got ", scale->sizes());
  TORCH_CHECK(scale->scalar_type() == at::kFloat, scale_name, " must be float32, got ", scale->scalar_type());
  TORCH_CHECK(scale->device() == weight.device(), scale_name, " must be on the device of ", weight_name);
}

inline void check_shortlist_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& idx,
                                 const c10::optional<at::Tensor>& weight_scale = c10::nullopt) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [B, D], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [N, D], got shape ", weight.sizes());
  check_ids(idx);
  TORCH_CHECK(is_float_storage(x.scalar_type()), "x must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  TORCH_CHECK(is_float_storage(weight.scalar_type()) || weight.scalar_type() == at::kChar,
              "weight must be float32, bfloat16, float16, float64 or int8 (with weight_scale), got ",
              weight.scalar_type());
  check_weight_scale(weight, weight_scale);
  TORCH_CHECK(x.size(1) == weight.size(1), "x has D = ", x.size(1), " but weight has D = ", weight.size(1));
  TORCH_CHECK(idx.size(0) == x.size(0), "idx has B = ", idx.size(0), " rows but x has B = ", x.size(0));
  TORCH_CHECK(x.device() == weight.device() && x.device() == idx.device(), "x, weight and idx must be on one device");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape [", weight.size(0),
                "], got ", bias->sizes());
    TORCH_CHECK(is_float_storage(bias->scalar_type()), "bias must be float32, bfloat16, float16 or float64, got ",
                bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "bias must be on the device of x");
  }
  check_ids_in_range(idx, weight.size(0));
}

// grad [B, K] against idx [B, K] and the other operand (`name`, [B or N, D]).
inline void check_grad_args(const at::Tensor& grad, const at::Tensor& idx, const char* name, const at::Tensor& other) {
  check_ids(idx);
  TORCH_CHECK(grad.sizes() == idx.sizes(), "grad must have the shape of idx ", idx.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(other.dim() == 2, name, " must be 2-D, got shape ", other.sizes());
  TORCH_CHECK(is_float_storage(grad.scalar_type()), "grad must be a floating tensor, got ", grad.scalar_type());
}

}  // namespace cxf
