// How fast one core reads the children blocks of a B = 1 beam: the ceiling behind cascade_search's prefetch
// (csrc/cpu/prefetch_stream.h, kPrefetchBytes). Standalone (no torch); build and run (x86-64 with AVX-512):
//
//   g++ -O2 -march=x86-64-v4 -o /tmp/scattered_blocks benchmarks/microbench/scattered_blocks.cpp && /tmp/scattered_blocks
//
// The 670K tree's leaf level: 670,091 rows of D = 768 under 65,536 nodes (10-11 rows a block), a beam of 400 nodes
// drawn at random, in a 2 MiB-page table. Each pass reads the 400 blocks (sum-only: 64-byte loads added into one
// register, no dot product) after a 256 MiB cache flush, as
//   none      no software prefetch (the hardware prefetchers only)
//   blocks    each block's lines prefetched (T1) two blocks ahead, all at once when its turn comes
//   stream    the lines `window` bytes ahead prefetched (T1) one row at a time, across block ends (the kernel's way)
//   contig    the same number of bytes read from one contiguous range (what the copy bandwidth measures)
// and prints the best of 30 passes in GB/s of bytes read.
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

namespace {

constexpr long kRows = 670091, kNodes = 65536;
constexpr int kDim = 768, kBeam = 400, kPasses = 30;

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void prefetch_lines(const char* p, long bytes) {
  for (long off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
}

__m512i sum_lines(const char* p, long bytes, __m512i acc) {
  for (long off = 0; off < bytes; off += 64) acc = _mm512_add_epi32(acc, _mm512_loadu_si512(p + off));
  return acc;
}

// The blocks of one beam, read in beam order.
struct Beam {
  std::vector<const char*> start;
  std::vector<long> bytes;
  long total = 0;
};

enum Mode { kNone, kBlocks, kStream, kContig, kModes };
const char* const kModeNames[kModes] = {"none", "blocks", "stream", "contig"};

__m512i read_beam(const Beam& beam, Mode mode, long row_bytes, long window, const char* contig) {
  __m512i acc = _mm512_setzero_si512();
  if (mode == kContig) return sum_lines(contig, beam.total, acc);
  int ahead_block = 0;  // the stream's cursor: block and offset of the next line to prefetch
  long ahead_offset = 0;
  auto advance = [&](long n) {
    while (n > 0 && ahead_block < kBeam) {
      const long take = std::min(n, beam.bytes[ahead_block] - ahead_offset);
      prefetch_lines(beam.start[ahead_block] + ahead_offset, take);
      ahead_offset += take;
      n -= take;
      if (ahead_offset >= beam.bytes[ahead_block]) ++ahead_block, ahead_offset = 0;
    }
  };
  if (mode == kStream) advance(window);
  if (mode == kBlocks)
    for (int j = 0; j < 2; ++j) prefetch_lines(beam.start[j], beam.bytes[j]);
  for (int j = 0; j < kBeam; ++j) {
    if (mode == kBlocks && j + 2 < kBeam) prefetch_lines(beam.start[j + 2], beam.bytes[j + 2]);
    for (long r = 0; r < beam.bytes[j]; r += row_bytes) {
      if (mode == kStream) advance(row_bytes);
      acc = sum_lines(beam.start[j] + r, row_bytes, acc);
    }
  }
  return acc;
}

}  // namespace

int main(int argc, char** argv) {
  const long window = argc > 1 ? std::atol(argv[1]) : 65536;
  const size_t huge = size_t(2) << 20;
  std::vector<char> flush(256 << 20, 1);
  std::mt19937_64 rng(1);
  std::printf("row bytes  beam KiB  GB/s: none  blocks  stream(%ld KiB)  contig\n", window >> 10);
  for (const long element_bytes : {4, 2, 1}) {  // fp32, bf16, int8 rows
    const long row_bytes = kDim * element_bytes;
    const size_t table_bytes = (kRows * row_bytes + huge - 1) / huge * huge;
    char* table = static_cast<char*>(std::aligned_alloc(huge, table_bytes));
    madvise(table, table_bytes, MADV_HUGEPAGE);
    std::memset(table, 1, table_bytes);
    double best[kModes];
    std::fill(best, best + kModes, 1e9);
    long total = 0;
    long long sink = 0;
    std::vector<long> nodes(kNodes);
    for (int pass = 0; pass < kPasses; ++pass) {
      std::iota(nodes.begin(), nodes.end(), 0L);
      std::shuffle(nodes.begin(), nodes.end(), rng);
      Beam beam;
      for (int j = 0; j < kBeam; ++j) {
        const long first = nodes[j] * kRows / kNodes, last = (nodes[j] + 1) * kRows / kNodes;
        beam.start.push_back(table + first * row_bytes);
        beam.bytes.push_back((last - first) * row_bytes);
        beam.total += (last - first) * row_bytes;
      }
      total = beam.total;
      const char* contig = table + (table_bytes / 2 / 4096) * 4096;
      for (int mode = 0; mode < kModes; ++mode) {
        for (size_t i = 0; i < flush.size(); i += 64) sink += flush[i];
        const double t0 = seconds();
        const __m512i acc = read_beam(beam, Mode(mode), row_bytes, window, contig);
        best[mode] = std::min(best[mode], seconds() - t0);
        sink += _mm512_reduce_add_epi32(acc);
      }
    }
    std::printf("%9ld  %8ld  %10.1f  %6.1f  %15.1f  %6.1f\n", row_bytes, total >> 10, total / best[kNone] / 1e9,
                total / best[kBlocks] / 1e9, total / best[kStream] / 1e9, total / best[kContig] / 1e9);
    std::free(table);
    if (sink == 42) std::printf(" ");  // keeps the reads
  }
  return 0;
}
