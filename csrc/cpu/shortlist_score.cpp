// CPU kernels of cascadexml_fast::shortlist_score and its gradients.
//
//   forward      s[b,k]  = <x[b], W[idx[b,k]]> + bias[idx[b,k]]           (-inf where idx == -1)
//   grad_input   dx[b]   = sum_k g[b,k] W[idx[b,k]]
//   int8 tables  W[r] = scale[r] * q[r]: s = scale[id] * <x, q[id]> + bias (the fp32 sum of x * q, scaled once),
//                dx[b] = sum_k (g[b,k] scale[id]) q[id]; no weight gradient (inference-only)
//   grad_weight  dW[r]   = sum_{(b,k): idx[b,k] == r} g[b,k] x[b],  dbias[r] = sum g[b,k]
//
// Everything accumulates in fp32 (float64 when an input is float64, for gradcheck) in a fixed order, so
// results are bit-identical run to run and for any thread count. The weight gradient sorts (row, position) pairs once (stable LSD radix sort) and reduces each
// row's segment in position order: no atomics, no dense buffer in the row-sparse variant.
#include "cpu/shortlist_score.h"

#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <type_traits>
#include <limits>
#include <vector>

#include "cpu/checks.h"
#include "cpu/hugepage_alloc.h"
#include "cpu/prefetch_stream.h"
#include "cpu/query.h"
#include "cpu/vec.h"

namespace cxf {
namespace {

constexpr int64_t kIdsPerTask = 64;   // shortlist entries per forward work item
constexpr int64_t kDimsPerTask = 256;  // feature columns per grad_input work item
// Rows prefetched ahead in a shortlist: enough rows in flight to cover DRAM latency (random fp32 rows reach the
// read bandwidth at 4-8 ahead with T1 prefetches; int8/bf16 rows are bound by the rate of random row accesses).
constexpr int64_t kPrefetchAhead = 6;

// ---------------------------------------------------------------------------------------------------------
// forward

// Row `id` of a table of row_bytes rows and the id's entries of the side arrays.
CXF_PREFETCH_INLINE void prefetch_id(const void* W, int64_t row_bytes, const RowArray (&sides)[2], int64_t id) {
  prefetch_row(static_cast<const char*>(W) + id * row_bytes, row_bytes);
  sides[0].prefetch(id, 1);
  sides[1].prefetch(id, 1);
}

// Scores ids[0:n]; ids[n:readable] are the entries that follow (the next work item of the same document), whose
// rows are prefetched too so that the next item starts with its first rows in flight.
// scale: per-row scales of an int8 table (the dot is multiplied by scale[id]), or nullptr. sides: the arrays read
// per id after the kernel (the bias) or in it (the scales), prefetched with the rows.
template <class L, class I>
CXF_KERNEL void score_ids_kernel(const Query<typename L::A>& xb, const typename L::T* W, int64_t D, const I* ids,
                                 int64_t n, int64_t readable, const float* scale, const RowArray (&sides)[2],
                                 typename L::A* out) {
  using A = typename L::A;
  const int64_t row_bytes = D * int64_t(sizeof(typename L::T));
  const int64_t ahead = std::min(kPrefetchAhead, readable);
  for (int64_t k = 0; k < ahead; ++k)
    if (ids[k] >= 0) prefetch_id(W, row_bytes, sides, int64_t(ids[k]));
  // Rows are scored rows_per_dot at a time (vec.h dot_rows: the same bits as one at a time); pads get -inf.
  const int step = rows_per_dot(xb);
  const typename L::T* rows[kDotRows];
  int64_t slot[kDotRows];
  A v[kDotRows];
  int pending = 0;
  for (int64_t k = 0; k < n; ++k) {
    if (k + kPrefetchAhead < readable && ids[k + kPrefetchAhead] >= 0)
      prefetch_id(W, row_bytes, sides, int64_t(ids[k + kPrefetchAhead]));
    const int64_t id = ids[k];
    if (id < 0) {
      out[k] = -std::numeric_limits<A>::infinity();
    } else {
      rows[pending] = W + id * D;
      slot[pending++] = k;
    }
    if (pending == step || (k + 1 == n && pending > 0)) {
      dot_rows<L>(xb, rows, pending, D, v);
      for (int r = 0; r < pending; ++r) out[slot[r]] = scale ? v[r] * A(scale[ids[slot[r]]]) : v[r];
      pending = 0;
    }
  }
}

// out[i] += bias[ids[i]] for i in [begin, end), ids[i] >= 0.
template <class A, class I>
void add_bias_range(const at::Tensor& bias, const I* ids, A* out, int64_t begin, int64_t end) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bias.scalar_type(), "shortlist_score_bias", [&] {
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    for (int64_t i = begin; i < end; ++i)
      if (ids[i] >= 0) out[i] += static_cast<A>(bp[ids[i]]);
  });
}

// The per-document forward, kIdsPerTask ids a work item; each item adds its bias right after its dots (the bias
// entries were prefetched with the rows; a separate pass over the whole output read them again from memory).
template <class L, class I>
void forward_impl(const at::Tensor& xf, const at::Tensor& W, const at::Tensor& idx, const float* scale,
                  const at::Tensor& bias, at::Tensor& out) {
  const int64_t B = idx.size(0), K = idx.size(1), D = W.size(1);
  using A = typename L::A;
  const auto queries = queries_for<L>(xf.data_ptr<A>(), B, D);
  const auto* w = reinterpret_cast<const typename L::T*>(W.data_ptr());
  const I* ids = idx.data_ptr<I>();
  A* o = out.data_ptr<A>();
  const RowArray sides[2] = {RowArray(bias), RowArray(scale, int64_t(sizeof(float)))};
  const int64_t blocks = (K + kIdsPerTask - 1) / kIdsPerTask;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks, k0 = (t % blocks) * kIdsPerTask, n = std::min(kIdsPerTask, K - k0);
      const int64_t first = b * K + k0;
      with_isa([&] { score_ids_kernel<L, I>(queries[b], w, D, ids + first, n, K - k0, scale, sides, o + first); });
      if (bias.defined()) add_bias_range<A, I>(bias, ids, o, first, first + n);
    }
  });
}

// Forward grouped by runs. A run is a stretch of a document's shortlist holding consecutive rows, ids[doc, k0 + j] =
// start + j for j < len (a cluster's labels, a children block). Documents whose shortlists hold the same run are
// scored together, row by row, so that each of its rows is read from memory once per batch instead of once per
// document; the runs are visited in row order, their rows prefetched kPrefetchBytes ahead. The same dot product
// per (document, row) as forward_impl, so the same bits.
struct Run {
  int64_t start, k0;
  int64_t len, doc;
};

// Batches of at least this many documents whose runs average at least kMinRunLength rows take the grouped path
// (measured on the 2-core EPYC, K = 16 clusters x 128 of 670K rows: B = 256 one thread fp32 / bf16 / int8 81 / 38 /
// 24 -> 60-65 / 30-32 / 19-20 ms, two threads fp32 / bf16 55 / 28 -> 39-41 / 21-22 ms; B = 64 within noise)
constexpr int64_t kGroupedMinDocs = 128;
constexpr int64_t kMinRunLength = 8;
constexpr int64_t kRunPieceBytes = 48 << 10;  // runs are cut into pieces of about this many bytes of rows

// The runs of every document (pads get -inf in out), or nothing when they would be shorter than kMinRunLength on
// average (scattered ids: grouping would cost more than it saves).
template <class I, class A>
std::vector<Run> find_runs(const I* ids, int64_t B, int64_t K, int64_t piece, A* out) {
  std::vector<Run> runs;
  int64_t valid = 0, natural = 0;  // entries that are not pads, maximal runs
  for (int64_t b = 0; b < B; ++b) {
    const I* row = ids + b * K;
    for (int64_t k = 0; k < K;) {
      if (row[k] < 0) {
        out[b * K + k++] = -std::numeric_limits<A>::infinity();
        continue;
      }
      int64_t len = 1;
      while (k + len < K && int64_t(row[k + len]) == int64_t(row[k]) + len) ++len;
      // Cut at multiples of `piece` rows: overlapping runs of different documents share their whole pieces, and a
      // long run (a level scored in full) is spread over the threads.
      for (int64_t first = int64_t(row[k]), end = first + len; first < end;) {
        const int64_t stop = std::min(end, (first / piece + 1) * piece);
        runs.push_back({first, k + (first - int64_t(row[k])), stop - first, b});
        first = stop;
      }
      ++natural;
      valid += len;
      k += len;
      if (natural * kMinRunLength > B * K) return {};  // already too many runs for the entries
    }
  }
  if (natural * kMinRunLength > valid) return {};
  return runs;
}

// Groups [g0, g1): rows [start, start + len) of W scored for the documents of each group (runs with that start and
// length, runs[group_begin[g] .. group_begin[g + 1])).
template <class L>
CXF_KERNEL void score_run_groups_kernel(const Queries<typename L::A>& x, const typename L::T* W, int64_t D,
                                        const Run* runs, const int64_t* group_begin, int64_t g0, int64_t g1,
                                        const float* scale, int64_t K, typename L::A* out, PrefetchStream& ahead) {
  using A = typename L::A;
  const int64_t row_bytes = D * int64_t(sizeof(typename L::T));
  for (int64_t g = g0; g < g1; ++g) {
    const Run* group = runs + group_begin[g];
    const int64_t m = group_begin[g + 1] - group_begin[g], start = group[0].start, len = group[0].len;
    const typename L::T* row = W + start * D;
    const int step = rows_per_dot(x[group[0].doc]);
    for (int64_t j = 0; j < len; j += step) {  // `step` rows at a time for every document
      const int n = int(std::min<int64_t>(step, len - j));
      const typename L::T* rows[kDotRows];
      for (int r = 0; r < n; ++r) {
        ahead.advance(row_bytes);
        rows[r] = row + (j + r) * D;
      }
      A v[kDotRows];
      for (int64_t i = 0; i < m; ++i) {
        dot_rows<L>(x[group[i].doc], rows, n, D, v);
        A* o = out + group[i].doc * K + group[i].k0 + j;
        for (int r = 0; r < n; ++r) o[r] = scale ? v[r] * A(scale[start + j + r]) : v[r];
      }
    }
  }
}

// The grouped forward; false (nothing written but pads) when the ids are too scattered for it.
template <class L, class I>
bool forward_grouped_impl(const at::Tensor& xf, const at::Tensor& W, const at::Tensor& idx, const float* scale,
                          at::Tensor& out) {
  using A = typename L::A;
  const int64_t B = idx.size(0), K = idx.size(1), D = W.size(1);
  A* o = out.data_ptr<A>();
  const int64_t piece = std::max<int64_t>(16, kRunPieceBytes / (D * int64_t(sizeof(typename L::T))));
  std::vector<Run> runs = find_runs<I, A>(idx.data_ptr<I>(), B, K, piece, o);
  if (runs.empty()) return false;
  std::sort(runs.begin(), runs.end(), [](const Run& a, const Run& b) {
    return a.start != b.start ? a.start < b.start : a.len != b.len ? a.len < b.len : a.doc < b.doc;
  });
  std::vector<int64_t> group_begin;  // groups: runs [group_begin[g], group_begin[g + 1]) share start and length
  for (int64_t r = 0; r < int64_t(runs.size()); ++r)
    if (r == 0 || runs[r].start != runs[r - 1].start || runs[r].len != runs[r - 1].len) group_begin.push_back(r);
  const int64_t groups = int64_t(group_begin.size());
  group_begin.push_back(int64_t(runs.size()));
  const auto* w = reinterpret_cast<const typename L::T*>(W.data_ptr());
  const int64_t row_bytes = D * int64_t(sizeof(typename L::T));
  std::vector<const char*> starts(groups);
  std::vector<int64_t> bytes(groups);
  for (int64_t g = 0; g < groups; ++g) {
    const Run& first = runs[group_begin[g]];
    starts[g] = reinterpret_cast<const char*>(w + first.start * D);
    bytes[g] = first.len * row_bytes;
  }
  const auto x = queries_for<L>(xf.data_ptr<A>(), B, D);
  at::parallel_for(0, groups, 8, [&](int64_t begin, int64_t end) {
    PrefetchStream ahead{starts.data(), bytes.data(), begin, end, 0};
    ahead.advance(kPrefetchBytes);
    with_isa([&] {
      score_run_groups_kernel<L>(x, w, D, runs.data(), group_begin.data(), begin, end, scale, K, o, ahead);
    });
  });
  return true;
}

// The bias of the grouped forward, a pass over the output.
template <class A, class I>
void add_bias(const at::Tensor& bias, const at::Tensor& idx, at::Tensor& out) {
  const I* ids = idx.data_ptr<I>();
  A* o = out.data_ptr<A>();
  at::parallel_for(0, idx.numel(), 4096,
                   [&](int64_t begin, int64_t end) { add_bias_range<A, I>(bias, ids, o, begin, end); });
}

// Calls fn.template operator()<Loader, Index>() for the table's storage type and the ids' integer type.
template <class Fn>
void dispatch_table_and_ids(const at::Tensor& W, const at::Tensor& idx, Fn&& fn) {
  auto with_loader = [&](auto loader_tag) {
    using L = decltype(loader_tag);
    if (idx.scalar_type() == at::kInt)
      fn.template operator()<L, int32_t>();
    else
      fn.template operator()<L, int64_t>();
  };
  switch (W.scalar_type()) {
    case at::kFloat: with_loader(F32{}); break;
    case at::kBFloat16: with_loader(BF16{}); break;
    case at::kHalf: with_loader(F16{}); break;
    case at::kDouble: with_loader(F64{}); break;
    case at::kChar: with_loader(I8{}); break;
    default: TORCH_CHECK(false, "weight: unsupported dtype ", W.scalar_type());
  }
}

// ---------------------------------------------------------------------------------------------------------
// grad_input

template <class L, class I>
CXF_KERNEL void accumulate_rows_kernel(const typename L::A* g, const typename L::T* W, int64_t D, int64_t d0,
                                       int64_t dn, const I* ids, int64_t K, const float* scale, typename L::A* dx) {
  using A = typename L::A;
  const int64_t chunk_bytes = dn * int64_t(sizeof(typename L::T));
  for (int64_t k = 0; k < K; ++k) {
    if (k + kPrefetchAhead < K && ids[k + kPrefetchAhead] >= 0)
      prefetch_row(W + int64_t(ids[k + kPrefetchAhead]) * D + d0, chunk_bytes);
    if (ids[k] >= 0) axpy<L>(scale ? g[k] * A(scale[ids[k]]) : g[k], W + int64_t(ids[k]) * D + d0, dx, dn);
  }
}

template <class L, class I>
void grad_input_impl(const at::Tensor& g, const at::Tensor& W, const at::Tensor& idx, const float* scale,
                     at::Tensor& dx) {
  const int64_t B = idx.size(0), K = idx.size(1), D = W.size(1);
  using A = typename L::A;
  const A* gp = g.data_ptr<A>();
  const auto* w = reinterpret_cast<const typename L::T*>(W.data_ptr());
  const I* ids = idx.data_ptr<I>();
  A* out = dx.data_ptr<A>();
  const int64_t chunks = (D + kDimsPerTask - 1) / kDimsPerTask;
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / chunks, d0 = (t % chunks) * kDimsPerTask, dn = std::min(kDimsPerTask, D - d0);
      with_isa([&] {
        accumulate_rows_kernel<L, I>(gp + b * K, w, D, d0, dn, ids + b * K, K, scale, out + b * D + d0);
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// grad_weight: sort once, reduce per row

// Non-pad entries grouped by row id: rows[u] is the u-th distinct id (ascending); the positions (b*K + k) of
// its entries are order[starts[u] .. starts[u+1]) in ascending position order.
struct RowSegments {
  std::vector<int64_t> rows;
  std::vector<int64_t> starts;
  std::vector<int64_t> order;
};

template <class I>
RowSegments group_by_row(const I* ids, int64_t n, int64_t num_rows) {
  std::vector<int64_t> keys, pos;
  keys.reserve(n);
  pos.reserve(n);
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] >= 0) {
      keys.push_back(ids[i]);
      pos.push_back(i);
    }
  // Stable LSD radix sort on the row id, 11 bits a pass: as many passes as num_rows needs (2 up to 4M rows).
  constexpr int kBits = 11;
  constexpr int64_t kBuckets = int64_t(1) << kBits;
  int passes = 0;
  for (int64_t r = std::max<int64_t>(num_rows - 1, 1); r > 0; r >>= kBits) ++passes;
  const int64_t m = int64_t(keys.size());
  std::vector<int64_t> keys2(m), pos2(m), count(kBuckets);
  for (int p = 0; p < passes; ++p) {
    const int shift = p * kBits;
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < m; ++i) ++count[(keys[i] >> shift) & (kBuckets - 1)];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t here = c;
      c = sum;
      sum += here;
    }
    for (int64_t i = 0; i < m; ++i) {
      const int64_t dst = count[(keys[i] >> shift) & (kBuckets - 1)]++;
      keys2[dst] = keys[i];
      pos2[dst] = pos[i];
    }
    keys.swap(keys2);
    pos.swap(pos2);
  }
  RowSegments seg;
  seg.order = std::move(pos);
  for (int64_t i = 0; i < m; ++i)
    if (i == 0 || keys[i] != keys[i - 1]) {
      seg.rows.push_back(keys[i]);
      seg.starts.push_back(i);
    }
  seg.starts.push_back(m);
  return seg;
}

template <class L>
CXF_KERNEL void reduce_segment_kernel(const int64_t* order, int64_t count, const typename L::A* g,
                                      const typename L::A* x, int64_t K, int64_t D, typename L::A* dw_row,
                                      typename L::A* db) {
  // The first entry is stored, not added, so the output rows need no zero-fill (count >= 1 always).
  const int64_t first = order[0];
  typename L::A bias_sum = g[first];
  scale<L>(bias_sum, x + (first / K) * D, dw_row, D);
  for (int64_t e = 1; e < count; ++e) {
    const int64_t p = order[e];
    const auto gv = g[p];
    axpy<L>(gv, x + (p / K) * D, dw_row, D);
    bias_sum += gv;
  }
  *db = bias_sum;
}

// Reduces every segment into out_rows[slot(u)] (a [*, D] buffer of the accumulation type) and out_bias[slot(u)];
// both are overwritten, so they need no initialisation.
// Reduces every segment into out_rows[slot(u)] (a [*, D] buffer of dtype S) and out_bias[slot(u)]; both are
// overwritten, so they need no initialisation. g and xf hold L's accumulation type A. When S is narrower than A
// (bf16/fp16 tables), a row is accumulated in a per-thread A buffer and rounded once (to nearest even).
template <class L, class S, class Slot>
void reduce_segments(const RowSegments& seg, const at::Tensor& g, const at::Tensor& xf, int64_t K, S* out_rows,
                     typename L::A* out_bias, Slot slot) {
  using A = typename L::A;
  const int64_t U = int64_t(seg.rows.size()), D = xf.size(1);
  const A* gp = g.data_ptr<A>();
  const A* x = xf.data_ptr<A>();
  at::parallel_for(0, U, 16, [&](int64_t begin, int64_t end) {
    std::vector<A> scratch(std::is_same_v<S, A> ? 0 : D);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t s = slot(u);
      A* acc = nullptr;
      if constexpr (std::is_same_v<S, A>)
        acc = out_rows + s * D;
      else
        acc = scratch.data();
      const int64_t* order = seg.order.data() + seg.starts[u];
      const int64_t count = seg.starts[u + 1] - seg.starts[u];
      with_isa([&] { reduce_segment_kernel<L>(order, count, gp, x, K, D, acc, out_bias + s); });
      if constexpr (!std::is_same_v<S, A>) {
        S* out = out_rows + s * D;
        for (int64_t i = 0; i < D; ++i) out[i] = static_cast<S>(static_cast<float>(acc[i]));
      }
    }
  });
}

template <class Fn>
void dispatch_ids(const at::Tensor& idx, Fn&& fn) {
  if (idx.scalar_type() == at::kInt)
    fn.template operator()<int32_t>();
  else
    fn.template operator()<int64_t>();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// ops

// fp32 accumulation and output, or float64 for all when any floating input is float64 (gradcheck).
static at::ScalarType acc_type(std::initializer_list<at::ScalarType> types) {
  for (auto t : types)
    if (t == at::kDouble) return at::kDouble;
  return at::kFloat;
}

// Calls fn.template operator()<F32 or F64>() for an accumulation type.
template <class Fn>
static void dispatch_acc(at::ScalarType acc, Fn&& fn) {
  if (acc == at::kDouble)
    fn.template operator()<F64>();
  else
    fn.template operator()<F32>();
}

// The scales of an int8 table as a contiguous fp32 tensor (undefined for a float table).
static at::Tensor scales_of(const c10::optional<at::Tensor>& weight_scale) {
  return has_tensor(weight_scale) ? weight_scale->contiguous() : at::Tensor();
}

static const float* scale_ptr(const at::Tensor& scale) { return scale.defined() ? scale.data_ptr<float>() : nullptr; }

at::Tensor shortlist_score_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& idx, bool /*sparse_grad*/, bool /*deterministic*/,
                               const c10::optional<at::Tensor>& weight_scale) {
  check_shortlist_args(x, weight, bias, idx, weight_scale);
  const auto acc = acc_type({x.scalar_type(), weight.scalar_type()});
  const auto xa = x.to(acc).contiguous();
  // A float64 x with a low-precision table (or the reverse) computes in float64 on a float64 copy of the table.
  const auto W = (acc == at::kDouble ? weight.to(acc) : weight).contiguous();
  const auto scale = scales_of(weight_scale);
  const auto ids = idx.contiguous();
  auto out = at::empty({idx.size(0), idx.size(1)}, x.options().dtype(acc));
  if (out.numel() == 0) return out;
  const auto b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  dispatch_table_and_ids(W, ids, [&]<class L, class I>() {
    if (ids.size(0) >= kGroupedMinDocs && forward_grouped_impl<L, I>(xa, W, ids, scale_ptr(scale), out)) {
      if (b.defined()) add_bias<typename L::A, I>(b, ids, out);
    } else {
      forward_impl<L, I>(xa, W, ids, scale_ptr(scale), b, out);
    }
  });
  return out;
}

at::Tensor shortlist_score_grad_input_cpu(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& idx,
                                          const c10::optional<at::Tensor>& weight_scale) {
  check_grad_args(grad, idx, "weight", weight);
  check_weight_scale(weight, weight_scale);
  check_ids_in_range(idx, weight.size(0));
  const auto acc = acc_type({grad.scalar_type(), weight.scalar_type()});
  const auto g = grad.to(acc).contiguous();
  const auto W = (acc == at::kDouble ? weight.to(acc) : weight).contiguous();
  const auto scale = scales_of(weight_scale);
  const auto ids = idx.contiguous();
  auto dx = at::zeros({idx.size(0), weight.size(1)}, grad.options().dtype(acc));
  if (dx.numel() == 0 || idx.size(1) == 0) return dx;
  dispatch_table_and_ids(W, ids, [&]<class L, class I>() { grad_input_impl<L, I>(g, W, ids, scale_ptr(scale), dx); });
  return dx;
}

// The dtype of dW: `dtype` if given, else the accumulation type.
static at::ScalarType grad_dtype(const c10::optional<at::ScalarType>& dtype, at::ScalarType acc) {
  const auto t = dtype.value_or(acc);
  TORCH_CHECK(is_float_storage(t), "dtype must be float32, bfloat16, float16 or float64, got ", t);
  return t;
}

std::tuple<at::Tensor, at::Tensor> shortlist_score_grad_weight_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& idx, int64_t num_rows,
                                                                   bool /*deterministic: always*/,
                                                                   c10::optional<at::ScalarType> dtype) {
  check_grad_args(grad, idx, "x", x);
  TORCH_CHECK(num_rows >= 0, "num_rows must be >= 0, got ", num_rows);
  check_ids_in_range(idx, num_rows);
  const auto acc = acc_type({grad.scalar_type(), x.scalar_type()});
  const auto g = grad.to(acc).contiguous();
  const auto xa = x.to(acc).contiguous();
  const auto ids = idx.contiguous();
  auto dw = lazily_zeroed({num_rows, x.size(1)}, x.options().dtype(grad_dtype(dtype, acc)));  // U rows written
  auto db = at::zeros({num_rows}, x.options().dtype(acc));
  if (ids.numel() == 0) return {dw, db};
  dispatch_ids(ids, [&]<class I>() {
    const auto seg = group_by_row<I>(ids.data_ptr<I>(), ids.numel(), num_rows);
    dispatch_acc(acc, [&]<class L>() {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dw.scalar_type(), "grad_weight", [&] {
        reduce_segments<L>(seg, g, xa, ids.size(1), dw.data_ptr<scalar_t>(), db.data_ptr<typename L::A>(),
                           [&](int64_t u) { return seg.rows[u]; });
      });
    });
  });
  return {dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shortlist_score_grad_weight_rows_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& idx, c10::optional<at::ScalarType> dtype) {
  check_grad_args(grad, idx, "x", x);
  check_ids_in_range(idx, std::numeric_limits<int64_t>::max());
  const auto acc = acc_type({grad.scalar_type(), x.scalar_type()});
  const auto g = grad.to(acc).contiguous();
  const auto xa = x.to(acc).contiguous();
  const auto ids = idx.contiguous();
  const auto options = x.options().dtype(acc);
  at::Tensor rows, dw, db;
  dispatch_ids(ids, [&]<class I>() {
    const I* p = ids.data_ptr<I>();
    int64_t max_id = -1;
    for (int64_t i = 0; i < ids.numel(); ++i) max_id = std::max<int64_t>(max_id, p[i]);
    const auto seg = group_by_row<I>(p, ids.numel(), max_id + 1);
    const int64_t U = int64_t(seg.rows.size());
    rows = at::empty({U}, options.dtype(at::kLong));
    std::copy(seg.rows.begin(), seg.rows.end(), rows.data_ptr<int64_t>());
    dw = hugepage_empty({U, x.size(1)}, options.dtype(grad_dtype(dtype, acc)));  // a fresh [U, D] every step
    db = at::empty({U}, options);
    dispatch_acc(acc, [&]<class L>() {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dw.scalar_type(), "grad_weight_rows", [&] {
        reduce_segments<L>(seg, g, xa, ids.size(1), dw.data_ptr<scalar_t>(), db.data_ptr<typename L::A>(),
                           [](int64_t u) { return u; });
      });
    });
  });
  return {rows, dw, db};
}

}  // namespace cxf
