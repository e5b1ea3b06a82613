// How fast one core reads and scores bench_cpu's int8 B = 32 shortlist: the ceiling behind that row of the target
// table. Standalone (no torch); build and run (x86-64 with AVX-512 VNNI):
//
//   g++ -O2 -march=x86-64-v4 -mavx512vnni -o /tmp/cluster_rows benchmarks/microbench/cluster_rows.cpp && /tmp/cluster_rows
//
// A 670,091 x 768 int8 table in 2 MiB pages; 32 documents x 16 clusters of 128 consecutive rows at random aligned
// places (65,536 rows, 50 MB), read in document order after a 256 MiB cache flush, as
//   sum     each row's 64-byte lines added into one register (no dot product): the read ceiling
//   dot     four rows at a time against a document's features in two int16 parts, vpdpwssd, the library's
//           avx512_vnni dot (csrc/cpu/row_dot.cpp) without the op around it
// each with the rows' lines prefetched (T1) `ahead` rows ahead (0: the hardware prefetchers only; the library: 6),
// and `dot` on 16 cached rows (the compute alone). Prints the best of 5 passes, in ms and GB/s of row bytes.
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

constexpr long kRows = 670091;
constexpr int kDim = 768, kDocs = 32, kClusters = 16, kClusterRows = 128, kPasses = 5;

double milliseconds() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void prefetch_row(const int8_t* row) {
  for (int off = 0; off < kDim; off += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + off, _MM_HINT_T1);
}

void dot4(const int16_t* hi, const int16_t* lo, const int8_t* const* rows, int64_t* out) {
  __m512i h[4], l[4];
  for (int r = 0; r < 4; ++r) h[r] = l[r] = _mm512_setzero_si512();
  for (int i = 0; i < kDim; i += 32) {
    const __m512i xh = _mm512_loadu_si512(hi + i), xl = _mm512_loadu_si512(lo + i);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + i)));
      h[r] = _mm512_dpwssd_epi32(h[r], w, xh);
      l[r] = _mm512_dpwssd_epi32(l[r], w, xl);
    }
  }
  for (int r = 0; r < 4; ++r) out[r] += _mm512_reduce_add_epi32(h[r]) * 32768LL + _mm512_reduce_add_epi32(l[r]);
}

void sum4(const int8_t* const* rows, int64_t* out) {
  __m512i s = _mm512_setzero_si512();
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < kDim; i += 64) s = _mm512_add_epi8(s, _mm512_loadu_si512(rows[r] + i));
  out[0] += _mm512_reduce_add_epi32(s);
}

// One pass over ids (a multiple of 4) of table W; returns a checksum so that nothing is optimised away.
int64_t pass(const int8_t* W, const std::vector<long>& ids, bool dot, int ahead, const int16_t* hi,
             const int16_t* lo) {
  int64_t out[4] = {0, 0, 0, 0};
  const size_t n = ids.size();
  for (size_t k = 0; k < size_t(ahead) && k < n; ++k) prefetch_row(W + ids[k] * kDim);
  const int8_t* rows[4];
  for (size_t k = 0; k < n; k += 4) {
    for (int r = 0; r < 4; ++r) {
      if (ahead > 0 && k + r + ahead < n) prefetch_row(W + ids[k + r + ahead] * kDim);
      rows[r] = W + ids[k + r] * kDim;
    }
    if (dot)
      dot4(hi, lo, rows, out);
    else
      sum4(rows, out);
  }
  return out[0] + out[1] + out[2] + out[3];
}

}  // namespace

int main() {
  const size_t bytes = size_t(kRows) * kDim, page = size_t(2) << 20, alloc = (bytes + page - 1) / page * page;
  auto* W = static_cast<int8_t*>(std::aligned_alloc(page, alloc));
  madvise(W, alloc, MADV_HUGEPAGE);
  for (size_t i = 0; i < bytes; ++i) W[i] = int8_t((i * 2654435761u) >> 24);
  std::vector<int16_t> hi(kDim), lo(kDim);
  std::mt19937 gen(1);
  for (int i = 0; i < kDim; ++i) {
    hi[i] = int16_t(int(gen() % 32769) - 16384);
    lo[i] = int16_t(int(gen() % 32769) - 16384);
  }
  std::vector<long> ids;
  for (int d = 0; d < kDocs; ++d)
    for (int c = 0; c < kClusters; ++c) {
      const long start = long(gen() % (kRows / kClusterRows)) * kClusterRows;
      for (int j = 0; j < kClusterRows; ++j) ids.push_back(start + j);
    }
  std::vector<long> hot(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) hot[i] = ids[i] % 16;
  std::vector<char> flush(256 << 20, 1);
  const double row_gb = double(ids.size()) * kDim / 1e9;
  int64_t sink = 0;
  auto best_of = [&](const std::vector<long>& rows, bool dot, int ahead, bool cold) {
    double best = 1e30;
    for (int p = 0; p < kPasses; ++p) {
      if (cold)
        for (size_t i = 0; i < flush.size(); i += 64) flush[i] = char(flush[i] + 1);
      const double t0 = milliseconds();
      sink += pass(W, rows, dot, ahead, hi.data(), lo.data());
      best = std::min(best, milliseconds() - t0);
    }
    return best;
  };
  std::printf("# %d documents x %d clusters of %d int8 rows (D = %d) of a %ld-row table: %.1f MB a pass\n", kDocs,
              kClusters, kClusterRows, kDim, kRows, row_gb * 1e3);
  std::printf("%-6s %6s %10s %8s\n", "mode", "ahead", "ms", "GB/s");
  for (int ahead : {0, 6, 16, 64})
    for (bool dot : {false, true}) {
      const double ms = best_of(ids, dot, ahead, true);
      std::printf("%-6s %6d %10.3f %8.1f\n", dot ? "dot" : "sum", ahead, ms, row_gb / ms * 1e3);
    }
  const double ms = best_of(hot, true, 0, false);
  std::printf("%-6s %6s %10.3f %8.1f   (16 cached rows: the compute alone)\n", "dot", "hot", ms, row_gb / ms * 1e3);
  std::printf("# checksum %lld\n", static_cast<long long>(sink & 0xff));
  std::free(W);
  return 0;
}
