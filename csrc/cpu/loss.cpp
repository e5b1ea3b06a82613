// CPU kernel of cascadexml_fast::shortlist_bce: shortlisted scoring fused with BCE-with-logits.
//
// One pass over the scores computes every entry's loss and its gradient w.r.t. the logit (sigmoid(s) - y, scaled
// by level_weight / #valid), so backward needs only that [B, K] gradient, not the logits. Targets come from CSR
// positives per row (binary search in a sorted copy of the row's positives). Row sums are added in row order,
// so the loss is bit-identical for any thread count.
#include "cpu/loss.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/checks.h"
#include "cpu/shortlist_score.h"

namespace cxf {
namespace {

template <class A, class I, class P>
void bce_rows(const A* logits, const I* ids, const int64_t* pos_off, const P* pos, int64_t B, int64_t K, double scale,
              A* grad, double* row_loss) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> positives;
    for (int64_t b = begin; b < end; ++b) {
      positives.assign(pos + pos_off[b], pos + pos_off[b + 1]);
      std::sort(positives.begin(), positives.end());
      double sum = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = b * K + k;
        if (ids[i] < 0) {
          grad[i] = A(0);
          continue;
        }
        const A s = logits[i];
        const A y = std::binary_search(positives.begin(), positives.end(), int64_t(ids[i])) ? A(1) : A(0);
        // max(s, 0) - s y + log(1 + exp(-|s|)): no overflow for any s.
        sum += double(std::max(s, A(0)) - s * y + std::log1p(std::exp(-std::fabs(s))));
        grad[i] = A((A(1) / (A(1) + std::exp(-s)) - y) * A(scale));
      }
      row_loss[b] = sum;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> shortlist_bce_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                 const c10::optional<at::Tensor>& bias,
                                                                 const at::Tensor& idx, const at::Tensor& pos_offsets,
                                                                 const at::Tensor& pos_ids, double level_weight,
                                                                 bool /*sparse_grad*/, bool /*deterministic*/) {
  const int64_t B = idx.dim() == 2 ? idx.size(0) : -1;
  TORCH_CHECK(pos_offsets.dim() == 1 && pos_offsets.size(0) == B + 1 && pos_offsets.scalar_type() == at::kLong,
              "pos_offsets must be int64 [B + 1] = [", B + 1, "], got ", pos_offsets.sizes(), " ",
              pos_offsets.scalar_type());
  TORCH_CHECK(pos_ids.dim() == 1 && (pos_ids.scalar_type() == at::kLong || pos_ids.scalar_type() == at::kInt),
              "pos_ids must be a 1-D int32 or int64 tensor");
  auto logits = shortlist_score_cpu(x, weight, bias, idx, false, false, c10::nullopt);
  const auto off = pos_offsets.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[B] == pos_ids.size(0), "pos_offsets must start at 0 and end at len(pos_ids) = ",
              pos_ids.size(0));
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(o[b + 1] >= o[b], "pos_offsets must be non-decreasing");
  const auto ids = idx.contiguous();
  const auto pos = pos_ids.contiguous();
  const int64_t K = ids.size(1);
  int64_t valid = 0;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "count", [&] {
    const index_t* p = ids.data_ptr<index_t>();
    for (int64_t i = 0; i < ids.numel(); ++i) valid += p[i] >= 0;
  });
  const double scale = level_weight / double(std::max<int64_t>(valid, 1));
  auto grad = at::empty_like(logits);
  std::vector<double> row_loss(B, 0.0);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "shortlist_bce", [&] {
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "shortlist_bce_ids", [&] {
      using I = index_t;
      const I* idp = ids.data_ptr<I>();
      if (pos.scalar_type() == at::kLong)
        bce_rows<scalar_t, I, int64_t>(logits.data_ptr<scalar_t>(), idp, o, pos.data_ptr<int64_t>(), B, K, scale,
                                       grad.data_ptr<scalar_t>(), row_loss.data());
      else
        bce_rows<scalar_t, I, int32_t>(logits.data_ptr<scalar_t>(), idp, o, pos.data_ptr<int32_t>(), B, K, scale,
                                       grad.data_ptr<scalar_t>(), row_loss.data());
    });
  });
  double total = 0.0;
  for (double r : row_loss) total += r;
  auto loss = at::scalar_tensor(total * scale, logits.options());
  return {loss, grad, logits};
}

}  // namespace cxf
