// CPU kernels of the inference ops: topk, block_score and the whole cascade_search.
#include "cpu/search.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu/checks.h"
#include "cpu/prefetch_stream.h"
#include "cpu/query.h"
#include "cpu/shortlist_score.h"
#include "cpu/topk.h"
#include "cpu/vec.h"

namespace cxf {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_offsets(const at::Tensor& offsets, const char* name) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, name, " must be 1-D with at least one entry, got shape ",
              offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, name, " must be int64, got ", offsets.scalar_type());
}

// ids [B, C * width] of the children blocks of clusters [B, C]; -1 for pads and past a block's end.
template <class I>
at::Tensor block_ids(const at::Tensor& clusters, const at::Tensor& offsets, int64_t width) {
  const int64_t B = clusters.size(0), C = clusters.size(1), num_clusters = offsets.size(0) - 1;
  auto ids = at::empty({B, C * width}, clusters.options().dtype(at::kLong));
  const I* cl = clusters.data_ptr<I>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  int64_t* out = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * C; ++i) {
    const int64_t c = cl[i];
    // The Python check's ValueError, word for word (ops/search.py leaves CPU clusters to this one).
    TORCH_CHECK_VALUE(c >= -1 && c < num_clusters, "clusters[", i / C, ", ", i % C, "] = ", c,
                      " is out of range [-1, ", num_clusters, ") (-1 is the pad id)");
    const int64_t start = c < 0 ? 0 : off[c], size = c < 0 ? 0 : off[c + 1] - start;
    TORCH_CHECK(size >= 0 && size <= width, "cluster ", c, " has ", size, " children but max_children is ", width);
    for (int64_t j = 0; j < width; ++j) out[i * width + j] = j < size ? start + j : -1;
  }
  return ids;
}

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// A level's bias read in its stored dtype: converting a bf16 bias of 670K labels to fp32 on every call cost
// ~10% of a B = 1 search (the search reads a few thousand of its entries).
struct BiasView {
  enum Kind : int { kNone, kF32, kBF16, kF16 } kind = kNone;
  const void* data = nullptr;

  BiasView() = default;
  explicit BiasView(const at::Tensor& bias) {
    if (!bias.defined()) return;
    data = bias.data_ptr();
    switch (bias.scalar_type()) {
      case at::kFloat: kind = kF32; break;
      case at::kBFloat16: kind = kBF16; break;
      case at::kHalf: kind = kF16; break;
      default: TORCH_CHECK(false, "BiasView: unexpected bias dtype ", bias.scalar_type());
    }
  }
  float operator()(int64_t r) const {
    switch (kind) {
      case kF32: return static_cast<const float*>(data)[r];
      case kBF16: return BF16::load(static_cast<const uint16_t*>(data), r);
      case kF16: return F16::load(static_cast<const uint16_t*>(data), r);
      default: return 0.f;
    }
  }
};

// out[r] = <x, W[first + r]> (times the row's scale for an int8 table, scale != nullptr, as shortlist_score) for
// r < n <= kDotRows consecutive rows (rows_per_dot), the next n rows of the prefetch stream.
template <class L>
inline void rows_score(const Query<float>& x, const typename L::T* W, int64_t D, int64_t first, int n,
                       const float* scale, float* out, PrefetchStream* ahead) {
  const typename L::T* rows[kDotRows];
  for (int r = 0; r < n; ++r) {
    if (ahead) ahead->advance(D * int64_t(sizeof(typename L::T)));
    rows[r] = W + (first + r) * D;
  }
  dot_rows<L>(x, rows, n, D, out);
  if (scale)
    for (int r = 0; r < n; ++r) out[r] *= scale[first + r];
}

// scores[j] = <x, W[start + j]> (* scale) (+ bias) for j < n: one contiguous block of rows.
template <class L>
CXF_KERNEL void score_block_kernel(const Query<float>& x, const typename L::T* W, int64_t D, int64_t start, int64_t n,
                                   BiasView bias, const float* scale, float* out, PrefetchStream* ahead) {
  const int step = rows_per_dot(x);
  for (int64_t j = 0; j < n; j += step) {
    const int rows = int(std::min<int64_t>(step, n - j));
    rows_score<L>(x, W, D, start + j, rows, scale, out + j, ahead);
    for (int r = 0; r < rows; ++r) out[j + r] += bias(start + j + r);
  }
}

using BlockScorer = void (*)(const Query<float>&, const void*, int64_t, int64_t, int64_t, BiasView, const float*,
                             float*, PrefetchStream*);

template <class L>
void score_block_erased(const Query<float>& x, const void* W, int64_t D, int64_t start, int64_t n, BiasView bias,
                        const float* scale, float* out, PrefetchStream* ahead) {
  const auto* w = static_cast<const typename L::T*>(W);
  with_isa([&] { score_block_kernel<L>(x, w, D, start, n, bias, scale, out, ahead); });
}

// One block of rows scored for m documents: out[out_base[i] + j] = <X[doc[i]], W[start + j]> (+ bias). The rows
// (rows_per_dot at a time) are the outer loop, so each row is read from memory once and reused from L1 by every
// document.
template <class L>
CXF_KERNEL void score_block_docs_kernel(const Query<float>* X, int64_t D, const int64_t* doc, const int64_t* out_base,
                                        int64_t m, const typename L::T* W, int64_t start, int64_t n,
                                        BiasView bias, const float* scale, float* out, PrefetchStream* ahead) {
  const int step = m > 0 ? rows_per_dot(X[doc[0]]) : 1;
  for (int64_t j = 0; j < n; j += step) {
    const int rows = int(std::min<int64_t>(step, n - j));
    float b[kDotRows], v[kDotRows];
    for (int r = 0; r < rows; ++r) b[r] = bias(start + j + r);
    for (int64_t i = 0; i < m; ++i) {
      rows_score<L>(X[doc[i]], W, D, start + j, rows, scale, v, i == 0 ? ahead : nullptr);
      for (int r = 0; r < rows; ++r) out[out_base[i] + j + r] = v[r] + b[r];
    }
  }
}

using GroupScorer = void (*)(const Query<float>*, int64_t, const int64_t*, const int64_t*, int64_t, const void*,
                             int64_t, int64_t, BiasView, const float*, float*, PrefetchStream*);

template <class L>
void score_block_docs_erased(const Query<float>* X, int64_t D, const int64_t* doc, const int64_t* out_base, int64_t m,
                             const void* W, int64_t start, int64_t n, BiasView bias, const float* scale,
                             float* out, PrefetchStream* ahead) {
  const auto* w = static_cast<const typename L::T*>(W);
  with_isa([&] { score_block_docs_kernel<L>(X, D, doc, out_base, m, w, start, n, bias, scale, out, ahead); });
}

// One level's inputs, prepared once per call: fp32 features (and their parts for the table's dot, query.h), the
// table and the bias in their own dtypes (and the per-row fp32 scales of an int8 table).
struct Level {
  at::Tensor x, W, bias, offsets, scale;
  Queries<float> queries;
  Parts parts = Parts::kNone;
  BiasView bias_view;
  BlockScorer scorer = nullptr;
  GroupScorer group_scorer = nullptr;
  int64_t D = 0;
};

void set_scorers(Level& level) {
  switch (level.W.scalar_type()) {
    case at::kFloat:
      level.scorer = &score_block_erased<F32>;
      level.group_scorer = &score_block_docs_erased<F32>;
      level.parts = parts_for_rows<F32>();
      break;
    case at::kBFloat16:
      level.scorer = &score_block_erased<BF16>;
      level.group_scorer = &score_block_docs_erased<BF16>;
      level.parts = parts_for_rows<BF16>();
      break;
    case at::kHalf:
      level.scorer = &score_block_erased<F16>;
      level.group_scorer = &score_block_docs_erased<F16>;
      level.parts = parts_for_rows<F16>();
      break;
    case at::kChar:
      level.scorer = &score_block_erased<I8>;
      level.group_scorer = &score_block_docs_erased<I8>;
      level.parts = parts_for_rows<I8>();
      break;
    default: TORCH_CHECK(false, "cascade_search: unsupported table dtype ", level.W.scalar_type());
  }
}

inline const float* level_scale(const Level& level) {
  return level.scale.defined() ? level.scale.data_ptr<float>() : nullptr;
}

// A level's rows streamed with their bias and int8 scales (PrefetchStream::sides).
inline void stream_sides(PrefetchStream& ahead, const Level& level) {
  ahead.table = static_cast<const char*>(level.W.data_ptr());
  ahead.row_bytes = level.D * level.W.element_size();
  ahead.sides[0] = RowArray(level.bias);
  ahead.sides[1] = RowArray(level.scale);
}

// The children block [start, start + size) of `node` (level `level`) must lie in the next level's `rows` and hold at
// most `width` nodes: both searches check each block they read, just before reading it (a call reads a few hundred
// blocks per document, not the 75K of a 670K-label tree, so this is cheaper than checking the whole tree).
inline void check_block(int64_t level, int64_t node, int64_t start, int64_t size, int64_t width, int64_t rows) {
  TORCH_CHECK(start >= 0 && size >= 0 && size <= width && start + size <= rows, "level ", level, ": node ", node,
              " has children [", start, ", ", start + size, ") (offsets must be non-decreasing, blocks <= ",
              "max_children = ", width, ", within the next level's ", rows, " rows)");
}

// The bytes of node's children block for the prefetch stream: where it starts in `table` and how long it is; a
// malformed block (check_block reports it when it is read) and node -1 prefetch nothing.
inline void block_extent(const int64_t* off, int64_t node, int64_t next_rows, const char* table, int64_t row_bytes,
                         const char*& first, int64_t& bytes) {
  const int64_t start = node < 0 ? 0 : off[node], stop = node < 0 ? 0 : std::min(off[node + 1], next_rows);
  const bool readable = start >= 0 && stop > start;
  first = readable ? table + start * row_bytes : table;
  bytes = readable ? (stop - start) * row_bytes : 0;
}

// Batches of at least this many documents run level by level with the blocks grouped across documents.
constexpr int64_t kGroupedMinDocs = 8;

// The cascade for a batch, level by level: every document picks its beam, then the (node, document) pairs are
// grouped by node so that each children block is read from memory once and scored for all the documents that
// chose it (PECOS MSCM's idea). The same dot products as the per-document path, so the same bits.
void grouped_search(const std::vector<Level>& lv, at::IntArrayRef beams, at::IntArrayRef max_children, int64_t k,
                    bool weighted, int64_t B, int64_t* out_ids, float* out_scores) {
  const int64_t levels = int64_t(lv.size());
  const int64_t n0 = lv[0].W.size(0);
  int64_t K = n0;
  std::vector<float> scores(B * K), parent(B * K, 0.f);
  std::vector<int64_t> ids(B * K);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      lv[0].scorer(lv[0].queries[b], lv[0].W.data_ptr(), lv[0].D, 0, n0,
                   lv[0].bias_view, level_scale(lv[0]), scores.data() + b * K, nullptr);
      for (int64_t i = 0; i < n0; ++i) ids[b * K + i] = i;
    }
  });
  for (int64_t l = 1; l < levels; ++l) {
    const int64_t beam = beams[l - 1], width = max_children[l - 1], K_next = beam * width;
    // Each document's beam (by raw score) at level l - 1.
    std::vector<float> beam_values(B * beam);
    std::vector<int64_t> beam_nodes(B * beam);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> keys;
      std::vector<int64_t> pos(beam);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t* row_ids = ids.data() + b * K;
        select_topk(scores.data() + b * K, K, [&](int64_t i) { return row_ids[i] >= 0; }, beam,
                    beam_values.data() + b * beam, pos.data(), keys);
        for (int64_t j = 0; j < beam; ++j) beam_nodes[b * beam + j] = pos[j] < 0 ? -1 : row_ids[pos[j]];
      }
    });
    // Group the (node, output slot) pairs by node: counting sort, stable in (document, beam slot) order.
    const int64_t nodes = lv[l - 1].W.size(0);
    std::vector<int64_t> group_start(nodes + 1, 0);
    for (int64_t p = 0; p < B * beam; ++p)
      if (beam_nodes[p] >= 0) ++group_start[beam_nodes[p] + 1];
    for (int64_t c = 0; c < nodes; ++c) group_start[c + 1] += group_start[c];
    const int64_t pairs = group_start[nodes];
    std::vector<int64_t> fill(group_start.begin(), group_start.end() - 1), pair_doc(pairs), pair_base(pairs);
    for (int64_t p = 0; p < B * beam; ++p) {
      const int64_t node = beam_nodes[p];
      if (node < 0) continue;
      const int64_t at = fill[node]++;
      pair_doc[at] = p / beam;
      pair_base[at] = (p / beam) * K_next + (p % beam) * width;
    }
    std::vector<int64_t> chosen;
    for (int64_t c = 0; c < nodes; ++c)
      if (group_start[c + 1] > group_start[c]) chosen.push_back(c);

    std::vector<float> next_scores(B * K_next, kNegInf), next_parent(B * K_next);
    std::vector<int64_t> next_ids(B * K_next, -1);
    for (int64_t p = 0; p < B * beam; ++p)
      std::fill(next_parent.begin() + p * width, next_parent.begin() + (p + 1) * width, beam_values[p]);
    const int64_t* off = lv[l - 1].offsets.data_ptr<int64_t>();
    const int64_t next_rows = lv[l].W.size(0);
    const BiasView bias = lv[l].bias_view;
    const int64_t row_bytes = lv[l].D * lv[l].W.element_size();
    const char* table = static_cast<const char*>(lv[l].W.data_ptr());
    // The chosen blocks in the order they are scored, for the rows prefetched ahead (as the per-document path).
    const int64_t num_chosen = int64_t(chosen.size());
    std::vector<const char*> block_starts(num_chosen);
    std::vector<int64_t> block_bytes(num_chosen);
    for (int64_t g = 0; g < num_chosen; ++g)
      block_extent(off, chosen[g], next_rows, table, row_bytes, block_starts[g], block_bytes[g]);
    at::parallel_for(0, num_chosen, 4, [&](int64_t begin, int64_t end) {
      PrefetchStream ahead{block_starts.data(), block_bytes.data(), begin, end, 0};
      stream_sides(ahead, lv[l]);
      ahead.advance(kPrefetchBytes);
      for (int64_t g = begin; g < end; ++g) {
        const int64_t node = chosen[g], first = group_start[node], m = group_start[node + 1] - first;
        const int64_t start = off[node], size = off[node + 1] - start;
        check_block(l - 1, node, start, size, width, next_rows);
        lv[l].group_scorer(lv[l].queries.data(), lv[l].D, pair_doc.data() + first, pair_base.data() + first, m,
                           lv[l].W.data_ptr(), start, size, bias, level_scale(lv[l]), next_scores.data(), &ahead);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t t = 0; t < size; ++t) next_ids[pair_base[first + i] + t] = start + t;
      }
    });
    scores.swap(next_scores);
    ids.swap(next_ids);
    parent.swap(next_parent);
    K = K_next;
  }
  // Final ranking per document.
  const bool has_parent = levels > 1;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys;
    std::vector<float> final_scores(K);
    std::vector<int64_t> pos(k);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < K; ++i) {
        final_scores[i] = sigmoid(scores[b * K + i]);
        if (weighted && has_parent) final_scores[i] *= sigmoid(parent[b * K + i]);
      }
      const int64_t* row_ids = ids.data() + b * K;
      select_topk(final_scores.data(), K, [&](int64_t i) { return row_ids[i] >= 0; }, k, out_scores + b * k,
                  pos.data(), keys);
      for (int64_t j = 0; j < k; ++j) out_ids[b * k + j] = pos[j] < 0 ? -1 : row_ids[pos[j]];
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& scores, int64_t k, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(scores.dim() == 2, "scores must be 2-D [B, K], got shape ", scores.sizes());
  TORCH_CHECK(k >= 0, "k must be >= 0, got ", k);
  TORCH_CHECK(scores.size(1) < (int64_t(1) << 32), "topk supports K < 2^32 positions per row");
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask)
    TORCH_CHECK(mask->sizes() == scores.sizes() && mask->scalar_type() == at::kBool,
                "mask must be a bool tensor of the shape of scores ", scores.sizes());
  const auto s = scores.to(at::kFloat).contiguous();
  const auto msk = has_mask ? mask->contiguous() : at::Tensor();
  const int64_t B = s.size(0), K = s.size(1);
  auto values = at::empty({B, k}, s.options());
  auto positions = at::empty({B, k}, s.options().dtype(at::kLong));
  if (B == 0 || k == 0) return {values, positions};
  const float* sp = s.data_ptr<float>();
  const bool* mp = has_mask ? msk.data_ptr<bool>() : nullptr;
  float* vp = values.data_ptr<float>();
  int64_t* pp = positions.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys;
    keys.reserve(std::min<int64_t>(K, 2 * k + 64));  // select_topk's buffer never holds more
    for (int64_t b = begin; b < end; ++b) {
      const bool* row_mask = mp ? mp + b * K : nullptr;
      select_topk(sp + b * K, K, [&](int64_t i) { return row_mask == nullptr || row_mask[i]; }, k, vp + b * k,
                  pp + b * k, keys);
    }
  });
  return {values, positions};
}

std::tuple<at::Tensor, at::Tensor> block_score_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias, const at::Tensor& clusters,
                                                   const at::Tensor& offsets, int64_t max_children,
                                                   const c10::optional<at::Tensor>& weight_scale) {
  check_ids(clusters);
  check_offsets(offsets, "offsets");
  TORCH_CHECK(max_children >= 0, "max_children must be >= 0, got ", max_children);
  TORCH_CHECK(clusters.size(0) == x.size(0), "clusters has B = ", clusters.size(0), " rows but x has B = ", x.size(0));
  const auto cl = clusters.contiguous();
  const auto off = offsets.contiguous();
  at::Tensor ids;
  AT_DISPATCH_INDEX_TYPES(cl.scalar_type(), "block_score", [&] { ids = block_ids<index_t>(cl, off, max_children); });
  // The blocks are contiguous rows, so the shortlist kernel reads them sequentially (prefetch-friendly).
  return {shortlist_score_cpu(x, weight, bias, ids, false, false, weight_scale), ids};
}

std::tuple<at::Tensor, at::Tensor> cascade_search_cpu(at::TensorList features, at::TensorList weights,
                                                      const c10::List<c10::optional<at::Tensor>>& biases,
                                                      at::TensorList offsets, at::IntArrayRef beams,
                                                      at::IntArrayRef max_children, int64_t k,
                                                      c10::string_view combine,
                                                      const c10::optional<c10::List<c10::optional<at::Tensor>>>&
                                                          weight_scales) {
  const int64_t levels = int64_t(weights.size());
  TORCH_CHECK(levels >= 1, "cascade_search needs at least one level");
  TORCH_CHECK(int64_t(features.size()) == levels && int64_t(biases.size()) == levels,
              "features, weights and biases need one entry per level (", levels, ")");
  TORCH_CHECK(int64_t(offsets.size()) == levels - 1 && int64_t(beams.size()) == levels - 1 &&
                  int64_t(max_children.size()) == levels - 1,
              "offsets, beams and max_children need one entry per level but the last (", levels - 1, ")");
  TORCH_CHECK(combine == "leaf" || combine == "leaf_x_parent", "combine must be 'leaf' or 'leaf_x_parent'");
  TORCH_CHECK(k >= 0, "k must be >= 0, got ", k);
  const bool weighted = combine == "leaf_x_parent";
  const int64_t B = features[0].size(0);
  TORCH_CHECK(!weight_scales.has_value() || int64_t(weight_scales->size()) == levels,
              "weight_scales needs one entry per level (", levels, "), got ", weight_scales->size());

  std::vector<Level> lv(levels);
  for (int64_t l = 0; l < levels; ++l) {
    const auto& W = weights[l];
    TORCH_CHECK(W.dim() == 2 && features[l].dim() == 2 && features[l].size(0) == B && features[l].size(1) == W.size(1),
                "level ", l, ": features must be [B, D] and weights [N, D] with one D, got ", features[l].sizes(),
                " and ", W.sizes());
    lv[l].x = features[l].to(at::kFloat).contiguous();
    lv[l].W = (W.scalar_type() == at::kDouble ? W.to(at::kFloat) : W).contiguous();
    const c10::optional<at::Tensor> scale =
        weight_scales.has_value() ? weight_scales->get(l) : c10::optional<at::Tensor>();
    const std::string level_name = "weights[" + std::to_string(l) + "]";
    const std::string scale_name = "weight_scales[" + std::to_string(l) + "]";
    check_weight_scale(W, scale, level_name.c_str(), scale_name.c_str());
    if (has_tensor(scale)) lv[l].scale = scale->contiguous();
    set_scorers(lv[l]);
    lv[l].D = W.size(1);
    lv[l].queries = Queries<float>(lv[l].x.data_ptr<float>(), B, lv[l].D, lv[l].parts);
    const auto& b = biases.get(l);
    if (b.has_value() && b->defined()) {
      TORCH_CHECK(b->dim() == 1 && b->size(0) == W.size(0), "level ", l, ": bias must have shape [", W.size(0), "]");
      const auto t = b->scalar_type();
      lv[l].bias = (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf ? *b : b->to(at::kFloat)).contiguous();
      lv[l].bias_view = BiasView(lv[l].bias);
    }
    if (l + 1 < levels) {
      check_offsets(offsets[l], "offsets");
      TORCH_CHECK(offsets[l].size(0) == W.size(0) + 1, "level ", l, ": offsets must have ", W.size(0) + 1,
                  " entries (nodes + 1), got ", offsets[l].size(0));
      lv[l].offsets = offsets[l].contiguous();
      const int64_t* o = lv[l].offsets.data_ptr<int64_t>();
      TORCH_CHECK(o[0] >= 0 && o[W.size(0)] <= weights[l + 1].size(0), "level ", l,
                  ": offsets must lie in [0, rows of the next level's table]");
      // The blocks themselves are checked where they are read (check_block).
      TORCH_CHECK(beams[l] >= 0, "beams must be >= 0");
    }
  }

  auto out_ids = at::empty({B, k}, lv[0].x.options().dtype(at::kLong));
  auto out_scores = at::empty({B, k}, lv[0].x.options());
  if (B == 0) return {out_ids, out_scores};
  int64_t* oid = out_ids.data_ptr<int64_t>();
  float* osc = out_scores.data_ptr<float>();

  // Runs body(j0, j1) over [0, n): split across threads when one document has the machine to itself (B smaller
  // than the thread count: latency), inline when the threads already work on different documents (throughput).
  const bool split_documents = B < at::get_num_threads();
  auto for_range = [&](int64_t n, int64_t grain, const auto& body) {
    if (split_documents)
      at::parallel_for(0, n, grain, body);
    else
      body(0, n);
  };

  // Scratch of one document's search, reused across the documents a thread handles.
  struct Scratch {
    std::vector<uint64_t> keys;
    std::vector<float> scores, parent, final_scores, beam_values;
    std::vector<int64_t> ids, beam_pos, beam_nodes, block_bytes;
    std::vector<const char*> block_starts;
  };

  auto search_document = [&](int64_t b, Scratch& s) {
    // Level 0: every node.
    const int64_t n0 = lv[0].W.size(0);
    s.scores.assign(n0, 0.f);
    s.ids.resize(n0);
    for (int64_t i = 0; i < n0; ++i) s.ids[i] = i;
    for_range(n0, 128, [&](int64_t r0, int64_t r1) {
      const char* first = static_cast<const char*>(lv[0].W.data_ptr()) + r0 * lv[0].D * lv[0].W.element_size();
      const int64_t bytes = (r1 - r0) * lv[0].D * lv[0].W.element_size();
      PrefetchStream ahead{&first, &bytes, 0, 1, 0};
      ahead.advance(kPrefetchBytes);
      lv[0].scorer(lv[0].queries[b], lv[0].W.data_ptr(), lv[0].D, r0, r1 - r0,
                   lv[0].bias_view, level_scale(lv[0]), s.scores.data() + r0, &ahead);
    });
    s.parent.assign(n0, 0.f);
    bool has_parent = false;
    for (int64_t l = 1; l < levels; ++l) {
      // Keep the best beams[l-1] nodes of level l-1 by raw score...
      const int64_t beam = beams[l - 1], width = max_children[l - 1];
      s.beam_values.resize(beam);
      s.beam_pos.resize(beam);
      select_topk(s.scores.data(), int64_t(s.scores.size()), [&](int64_t i) { return s.ids[i] >= 0; }, beam,
                  s.beam_values.data(), s.beam_pos.data(), s.keys);
      s.beam_nodes.resize(beam);
      for (int64_t j = 0; j < beam; ++j) s.beam_nodes[j] = s.beam_pos[j] < 0 ? -1 : s.ids[s.beam_pos[j]];
      // ...and score all their children at level l, each block padded to `width` slots.
      s.scores.assign(beam * width, kNegInf);
      s.ids.assign(beam * width, -1);
      s.parent.resize(beam * width);
      const int64_t* off = lv[l - 1].offsets.data_ptr<int64_t>();
      const int64_t next_rows = lv[l].W.size(0);
      const Query<float>& xb = lv[l].queries[b];
      const BiasView bias = lv[l].bias_view;
      const int64_t row_bytes = lv[l].D * lv[l].W.element_size();
      const char* table = static_cast<const char*>(lv[l].W.data_ptr());
      // Blocks lie at random places in the table: the rows kPrefetchBytes ahead in this beam's blocks are
      // prefetched as each row is scored.
      s.block_starts.resize(beam);
      s.block_bytes.resize(beam);
      for (int64_t j = 0; j < beam; ++j)
        block_extent(off, s.beam_nodes[j], next_rows, table, row_bytes, s.block_starts[j], s.block_bytes[j]);
      for_range(beam, 16, [&](int64_t j0, int64_t j1) {
        PrefetchStream ahead{s.block_starts.data(), s.block_bytes.data(), j0, j1, 0};
        stream_sides(ahead, lv[l]);
        ahead.advance(kPrefetchBytes);
        for (int64_t j = j0; j < j1; ++j) {
          std::fill(s.parent.begin() + j * width, s.parent.begin() + (j + 1) * width, s.beam_values[j]);
          const int64_t node = s.beam_nodes[j];
          if (node < 0) continue;
          const int64_t start = off[node], size = off[node + 1] - start;
          check_block(l - 1, node, start, size, width, next_rows);
          lv[l].scorer(xb, lv[l].W.data_ptr(), lv[l].D, start, size, bias, level_scale(lv[l]),
                       s.scores.data() + j * width, &ahead);
          for (int64_t t = 0; t < size; ++t) s.ids[j * width + t] = start + t;
        }
      });
      has_parent = true;
    }
    // Final ranking of the last level's candidates.
    const int64_t n = int64_t(s.scores.size());
    s.final_scores.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      s.final_scores[i] = sigmoid(s.scores[i]);
      if (weighted && has_parent) s.final_scores[i] *= sigmoid(s.parent[i]);
    }
    s.beam_pos.resize(k);
    select_topk(s.final_scores.data(), n, [&](int64_t i) { return s.ids[i] >= 0; }, k, osc + b * k,
                s.beam_pos.data(), s.keys);
    for (int64_t j = 0; j < k; ++j) oid[b * k + j] = s.beam_pos[j] < 0 ? -1 : s.ids[s.beam_pos[j]];
  };

  if (!split_documents && B >= kGroupedMinDocs) {
    grouped_search(lv, beams, max_children, k, weighted, B, oid, osc);
    return {out_ids, out_scores};
  }
  if (split_documents) {
    Scratch scratch;
    for (int64_t b = 0; b < B; ++b) search_document(b, scratch);
  } else {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t b = begin; b < end; ++b) search_document(b, scratch);
    });
  }
  return {out_ids, out_scores};
}

}  // namespace cxf
