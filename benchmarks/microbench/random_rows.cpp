// Reading random table rows on one core: what the prefetch hint, the prefetch distance and the page size are worth.
// Standalone (no torch): the numbers behind the prefetch settings of csrc/cpu (benchmarks/README.md, "Huge pages
// and prefetch"). Build and run (x86-64 with AVX-512):
//
//   g++ -O2 -march=x86-64-v4 -o /tmp/random_rows benchmarks/microbench/random_rows.cpp && /tmp/random_rows
//
// For each table dtype (fp32 / bf16 / int8 rows of D = 768), pages (4 KiB / 2 MiB transparent huge pages), prefetch
// hint (T0 = into L1, T1 = into L2) and distance (rows ahead): the best of 15 passes over K = 2,048 random rows
// of a 670,091-row table, each pass after a 64 MiB cache flush; GB/s counts the row bytes read.
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

constexpr long kRows = 670091;
constexpr int kDim = 768, kShortlist = 2048, kPasses = 15;

float dot_f32(const float* x, const void* row) {
  const float* w = static_cast<const float*>(row);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int i = 0; i < kDim; i += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(w + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(w + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), _mm512_loadu_ps(w + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), _mm512_loadu_ps(w + i + 48), a3);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

__m512 widen_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

__m512 widen_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// <x, row> for a row of T widened to fp32 16 at a time by Widen.
template <class T, __m512 (*Widen)(const T*)>
float dot_widened(const float* x, const void* row) {
  const T* w = static_cast<const T*>(row);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  for (int i = 0; i < kDim; i += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), Widen(w + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), Widen(w + i + 16), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

template <int Hint>
void prefetch(const char* p, long bytes) {
  for (long off = 0; off < bytes; off += 64) _mm_prefetch(p + off, static_cast<_mm_hint>(Hint));
}

}  // namespace

int main() {
  struct Dtype {
    const char* name;
    long bytes;
    float (*dot)(const float*, const void*);
  };
  const Dtype dtypes[] = {{"fp32", 4, dot_f32}, {"bf16", 2, dot_widened<uint16_t, widen_bf16>},
                           {"int8", 1, dot_widened<int8_t, widen_i8>}};
  const size_t huge = size_t(2) << 20;
  std::vector<float> x(kDim, 0.5f), out(kShortlist);
  std::vector<char> flush(64 << 20);
  std::mt19937_64 rng(1);
  std::uniform_int_distribution<long> pick(0, kRows - 1);
  std::printf("dtype pages  hint ahead      ms   GB/s\n");
  for (const Dtype& dt : dtypes) {
    const long row_bytes = kDim * dt.bytes;
    const size_t table_bytes = (kRows * row_bytes + huge - 1) / huge * huge;
    for (int huge_pages = 0; huge_pages < 2; ++huge_pages) {
      char* table = static_cast<char*>(std::aligned_alloc(huge, table_bytes));
      madvise(table, table_bytes, huge_pages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
      std::memset(table, 1, table_bytes);
      for (int hint = 0; hint < 2; ++hint) {
        for (int ahead : {0, 1, 2, 4, 6, 8, 16}) {
          double best = 1e9;
          for (int pass = 0; pass < kPasses; ++pass) {
            std::vector<long> ids(kShortlist);
            for (long& id : ids) id = pick(rng);
            std::memset(flush.data(), pass, flush.size());
            const auto t0 = std::chrono::steady_clock::now();
            for (int k = 0; k < kShortlist; ++k) {
              if (ahead && k + ahead < kShortlist) {
                const char* next = table + ids[k + ahead] * row_bytes;
                if (hint == 0)
                  prefetch<_MM_HINT_T0>(next, row_bytes);
                else
                  prefetch<_MM_HINT_T1>(next, row_bytes);
              }
              out[k] = dt.dot(x.data(), table + ids[k] * row_bytes);
            }
            best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
          }
          std::printf("%-5s %-6s %-4s %5d %7.3f %6.2f\n", dt.name, huge_pages ? "2MiB" : "4KiB", hint ? "T1" : "T0",
                      ahead, best * 1e3, kShortlist * row_bytes / best / 1e9);
        }
      }
      std::free(table);
    }
  }
  return 0;
}
