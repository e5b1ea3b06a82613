// Rows a kernel will read next, prefetched a fixed number of bytes ahead of the row being scored. Used where the rows
// come as runs of consecutive rows at scattered places (a beam's children blocks, the clusters shared by a batch).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "cpu/vec.h"

namespace cxf {

// How far ahead of the row being scored the kernels prefetch their next rows. Measured on the 2-core EPYC
// (670K tree, B = 1, one thread, cold caches): 64 KiB streamed row by row took fp32 / bf16 / int8 from 1.78 / 1.38 /
// 1.02 ms (two whole blocks prefetched at once per block scored) to 1.35 / 0.73 / 0.59 ms; 32 and 96-128 KiB were
// no better, and issuing a block's ~500 prefetches at once stalled the core on full miss buffers.
constexpr int64_t kPrefetchBytes = 64 << 10;

// An array with one entry per table row that a kernel reads beside the rows: a bias, an int8 table's scales.
// Unprefetched, its entries are misses the core waits on after each row or block. Prefetched with the rows
// (measured on the 2-core EPYC, one thread, cold caches, in-process A/B): the 670K cascade at B = 1 fp32 / bf16 /
// int8 -8 / -10 / -20%, a shortlist of 2048 scattered int8 rows -16% (B = 1) and -21% (B = 32).
struct RowArray {
  const char* data = nullptr;  // nullptr: no such array
  int64_t entry_bytes = 0;

  RowArray() = default;
  RowArray(const void* p, int64_t bytes) : data(static_cast<const char*>(p)), entry_bytes(bytes) {}
  explicit RowArray(const at::Tensor& t)  // undefined: none
      : data(t.defined() ? static_cast<const char*>(t.data_ptr()) : nullptr),
        entry_bytes(t.defined() ? int64_t(t.element_size()) : 0) {}

  // Every line of entries [row, row + rows): a run of entries that starts inside a line and crosses into the next
  // one (a 10-row block of a fp32 bias does so 60% of the time) needs the line of its start counted in.
  CXF_PREFETCH_INLINE void prefetch(int64_t row, int64_t rows) const {
    if (data == nullptr) return;
    const uintptr_t first = reinterpret_cast<uintptr_t>(data + row * entry_bytes);
    const int64_t skew = int64_t(first & 63);
    prefetch_row(reinterpret_cast<const void*>(first - skew), rows * entry_bytes + skew);
  }
};

// The runs a kernel will read, in order: advance(bytes) is called once per row scored, so the prefetches are spread
// between the dots instead of issued a block at a time (which stalls the core once the miss buffers are full).
struct PrefetchStream {
  const char* const* starts = nullptr;  // block j's first byte; its size is bytes[j] (0: nothing to read)
  const int64_t* bytes = nullptr;
  int64_t block = 0, end = 0, offset = 0;
  // With a table (rows of row_bytes from `table`): the sides' entries of a block's rows are prefetched when the
  // stream reaches the block.
  const char* table = nullptr;
  int64_t row_bytes = 0;
  RowArray sides[2];

  void advance(int64_t n) {
    while (n > 0 && block < end) {
      if (offset == 0) prefetch_sides();
      const int64_t take = std::min(n, bytes[block] - offset);
      prefetch_row(starts[block] + offset, take);
      offset += take;
      n -= take;
      if (offset >= bytes[block]) {
        ++block;
        offset = 0;
      }
    }
  }

 private:
  CXF_PREFETCH_INLINE void prefetch_sides() const {
    if (table == nullptr || bytes[block] <= 0) return;
    const int64_t row = (starts[block] - table) / row_bytes, rows = bytes[block] / row_bytes;
    for (const RowArray& side : sides) side.prefetch(row, rows);
  }
};

}  // namespace cxf
