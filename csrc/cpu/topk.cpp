// Which of up to 64 scores beat the bar of select_topk (topk.h): the only per-element work once a row's top k
// has been seen, written per vector path like the row dots (row_dot.cpp) and chosen by the active path.
#include "cpu/topk.h"

#include "cpu/isa.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define CXF_X86_TOPK 1
#endif

namespace cxf {
namespace {

uint64_t above_scalar(const float* scores, int64_t n, uint32_t bar) {
  uint64_t bits = 0;
  for (int64_t i = 0; i < n; ++i) bits |= uint64_t(ordered_key(scores[i]) > bar) << i;
  return bits;
}

#ifdef CXF_X86_TOPK
// ordered_key of 16 / 8 scores: sign-magnitude bits made monotonic (negatives inverted, positives' sign bit set),
// -0.0 as +0.0, NaN (magnitude above inf's) to 0.
__attribute__((target("arch=x86-64-v4"))) inline __m512i ordered_keys16(__m512i raw) {
  const __m512i magnitude = _mm512_and_si512(raw, _mm512_set1_epi32(0x7fffffff));
  const __m512i bits = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(magnitude, magnitude), raw);
  const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(int(0x80000000u)));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f800000));
  return _mm512_maskz_xor_epi32(__mmask16(~nan), bits, flip);
}

__attribute__((target("arch=x86-64-v4"))) uint64_t above_avx512(const float* scores, int64_t n, uint32_t bar) {
  const __m512i b = _mm512_set1_epi32(int(bar));
  uint64_t bits = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512i key = ordered_keys16(_mm512_maskz_loadu_epi32(lanes, scores + i));
    bits |= uint64_t(_mm512_mask_cmpgt_epu32_mask(lanes, key, b)) << i;
  }
  return bits;
}

// AVX2 compares signed integers only: keys and bar are compared with their top bits flipped.
__attribute__((target("arch=x86-64-v3"))) uint64_t above_avx2(const float* scores, int64_t n, uint32_t bar) {
  if (n < 64) return above_scalar(scores, n, bar);
  const __m256i top = _mm256_set1_epi32(int(0x80000000u));
  const __m256i b = _mm256_set1_epi32(int(bar ^ 0x80000000u));
  uint64_t bits = 0;
  for (int64_t i = 0; i < 64; i += 8) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scores + i));
    const __m256i mag = _mm256_and_si256(raw, _mm256_set1_epi32(0x7fffffff));
    const __m256i signed_bits = _mm256_andnot_si256(_mm256_cmpeq_epi32(mag, _mm256_setzero_si256()), raw);
    const __m256i flip = _mm256_or_si256(_mm256_srai_epi32(signed_bits, 31), top);
    const __m256i nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7f800000));  // magnitudes are < 2^31
    const __m256i key = _mm256_andnot_si256(nan, _mm256_xor_si256(signed_bits, flip));
    const __m256i gt = _mm256_cmpgt_epi32(_mm256_xor_si256(key, top), b);
    bits |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(gt)))) << i;
  }
  return bits;
}
#endif

}  // namespace

uint64_t scores_above(const float* scores, int64_t n, uint32_t bar) {
#ifdef CXF_X86_TOPK
  switch (active_isa()) {
    case kIsaAvx512Dot:
    case kIsaAvx512Vnni:
    case kIsaAvx512: return above_avx512(scores, n, bar);
    case kIsaAvx2: return above_avx2(scores, n, bar);
    default: break;
  }
#endif
  return above_scalar(scores, n, bar);
}

}  // namespace cxf
