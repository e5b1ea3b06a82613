// Large outputs and temporaries of the CPU kernels: in transparent huge pages (hugepage_empty), or zeroed by the OS
// page by page when first touched (lazily_zeroed).
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

// A tensor of zeros that costs nothing up front: a fresh anonymous mapping, whose pages the OS zeroes when they are
// first written (and maps to its shared zero page when they are first read). For the dense [N, D] weight gradient,
// where a step writes U << N rows: at::zeros wrote all 2 GB of a 670K x 768 fp32 gradient (~0.5 s of page faults
// and memset on the 2-core EPYC) before the kernel wrote its rows. Advised against huge pages (where THP is
// "always"): the written rows are scattered, and 2 MiB pages would make the OS zero far more than the rows. Small
// sizes, non-Linux and any failure fall back to at::zeros.
inline at::Tensor lazily_zeroed(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = size_t(numel) * options.dtype().itemsize();
  if (nbytes >= (size_t(2) << 20) && options.device().is_cpu()) {
    void* ptr = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ptr != MAP_FAILED) {
#if defined(MADV_NOHUGEPAGE)
      madvise(ptr, nbytes, MADV_NOHUGEPAGE);
#endif
      return at::from_blob(ptr, sizes, [nbytes](void* p) { munmap(p, nbytes); }, options);
    }
  }
#endif
  return at::zeros(sizes, options);
}

}  // namespace cxf
