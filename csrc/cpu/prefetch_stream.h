// Rows a kernel will read next, prefetched a fixed number of bytes ahead of the row being scored. Used where the rows
// come as runs of consecutive rows at scattered places (a beam's children blocks, the clusters shared by a batch).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/vec.h"

namespace cxf {

// How far ahead of the row being scored the kernels prefetch their next rows. Measured on the 2-core EPYC
// (670K tree, B = 1, one thread, cold caches): 64 KiB streamed row by row took fp32 / bf16 / int8 from 1.78 / 1.38 /
// 1.02 ms (two whole blocks prefetched at once per block scored) to 1.35 / 0.73 / 0.59 ms; 32 and 96-128 KiB were
// no better, and issuing a block's ~500 prefetches at once stalled the core on full miss buffers.
constexpr int64_t kPrefetchBytes = 64 << 10;

// The runs a kernel will read, in order: advance(bytes) is called once per row scored, so the prefetches are spread
// between the dots instead of issued a block at a time (which stalls the core once the miss buffers are full).
struct PrefetchStream {
  const char* const* starts = nullptr;  // block j's first byte; its size is bytes[j] (0: nothing to read)
  const int64_t* bytes = nullptr;
  int64_t block = 0, end = 0, offset = 0;

  void advance(int64_t n) {
    while (n > 0 && block < end) {
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
};

}  // namespace cxf
