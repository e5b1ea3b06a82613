// Large temporaries of the CPU kernels in transparent huge pages.
//
// The row-sparse weight gradient of a training step is a fresh [U, D] buffer every step (670 MB at 670K labels,
// B = 64): from malloc it is a new mmap whose 4 KiB pages each fault and get zeroed on first touch, ~8% of the step
// in the profile. A 2 MiB-aligned block advised for huge pages faults 512x less often. Small sizes, non-Linux and
// any failure fall back to at::empty. (Python tables use cascadexml_fast/hugepages.py, the same idea.)
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace cxf {

inline at::Tensor hugepage_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = size_t(numel) * options.dtype().itemsize();
  if (nbytes >= kHuge && options.device().is_cpu()) {
    void* ptr = nullptr;
    const size_t rounded = (nbytes + kHuge - 1) / kHuge * kHuge;
    if (posix_memalign(&ptr, kHuge, rounded) == 0) {
      madvise(ptr, rounded, MADV_HUGEPAGE);  // advice only: without THP the block is ordinary memory
      return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace cxf
