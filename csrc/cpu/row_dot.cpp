// <x, w> for one table row (fp32 x, fp32 result), the inner loop of every scoring kernel: fp32, bf16 and int8 rows.
//
// The generic loader loop (vec.h dot<L>) keeps 32 lanes in one FMA chain per vector and ends with a serial sum of
// the 32 lanes, which for a 768-long row costs about as much as reading the row from DRAM (bf16 and int8 rows
// most: they are half and a quarter of the bytes). Here each ISA gets explicit code, following the kernels' active
// path (isa.h: the CPU's best, or the one set_cpu_isa forces):
//
//   avx512 (x86-64-v4)  4 zmm accumulators of 16 lanes; rows widened to fp32 in registers (bf16: zero-extend and
//                       shift into the high half; int8: vpmovsxbd + vcvtdq2ps), then vfmadd
//   avx2   (x86-64-v3)  8 ymm accumulators of 8 lanes, the same 64 lanes and the same FMAs
//   scalar (baseline)   64 lanes in plain C++ (mul + add, no FMA)
//
// All three keep 64 lanes (lane j sums the elements 64 i + j) and reduce them by one fixed tree: 64 -> 16 as
// (L[j] + L[j+16]) + (L[j+32] + L[j+48]), then halving (j + 8, j + 4, j + 2, j + 1); the D % 64 trailing elements
// are summed in order and added last. avx512 and avx2 are therefore bit-identical; scalar differs only by the
// rounding of the fused multiply-adds. Results never depend on the thread count.
#include "cpu/isa.h"
#include "cpu/vec.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_*() (GCC bug 105593): harmless.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define CXF_X86_DOT 1
#endif

namespace cxf {
namespace {

constexpr int64_t kDotLanes = 64;

// Element widening per storage type, shared by the three paths.
inline float widen(float v) { return v; }
inline float widen(uint16_t bf16) { return bits_to_float(uint32_t(bf16) << 16); }
inline float widen(int8_t v) { return float(v); }

template <class T>
float dot_scalar(const float* __restrict x, const T* __restrict w, int64_t D) {
  float lanes[kDotLanes] = {};
  int64_t i = 0;
  for (; i + kDotLanes <= D; i += kDotLanes)
    for (int64_t j = 0; j < kDotLanes; ++j) lanes[j] += x[i + j] * widen(w[i + j]);
  float s[16];
  for (int j = 0; j < 16; ++j) s[j] = (lanes[j] + lanes[j + 16]) + (lanes[j + 32] + lanes[j + 48]);
  for (int width = 8; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) s[j] = s[j] + s[j + width];
  float tail = 0.f;
  for (; i < D; ++i) tail += x[i] * widen(w[i]);
  return s[0] + tail;
}

#ifdef CXF_X86_DOT
#define CXF_AVX2 __attribute__((target("arch=x86-64-v3"), always_inline)) inline
#define CXF_AVX512 __attribute__((target("arch=x86-64-v4"), always_inline)) inline

// Sum of 8 lanes by the tree above: (t[j] + t[j+4]), then (j + 2), then (j + 1).
CXF_AVX2 float hsum8(__m256 t) {
  __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  u = _mm_add_ps(u, _mm_movehl_ps(u, u));
  u = _mm_add_ss(u, _mm_shuffle_ps(u, u, 1));
  return _mm_cvtss_f32(u);
}

// 8 elements at p widened to fp32 (AVX2) and 16 (AVX-512).
CXF_AVX2 __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
CXF_AVX2 __m256 widen8(const uint16_t* p) {
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}
CXF_AVX2 __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
CXF_AVX512 __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
CXF_AVX512 __m512 widen16(const uint16_t* p) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}
CXF_AVX512 __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <class T>
__attribute__((target("arch=x86-64-v4"))) float dot_avx512(const float* __restrict x, const T* __restrict w,
                                                            int64_t D) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + kDotLanes <= D; i += kDotLanes) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), widen16(w + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), widen16(w + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), widen16(w + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), widen16(w + i + 48), a3);
  }
  const __m512 s = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
  const float total = hsum8(_mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1)));
  float tail = 0.f;
  for (; i < D; ++i) tail += x[i] * widen(w[i]);
  return total + tail;
}

template <class T>
__attribute__((target("arch=x86-64-v3"))) float dot_avx2(const float* __restrict x, const T* __restrict w,
                                                          int64_t D) {
  // a[2k] and a[2k+1] are the low and high halves of avx512's accumulator k.
  __m256 a[8];
  for (auto& v : a) v = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + kDotLanes <= D; i += kDotLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8 * j), widen8(w + i + 8 * j), a[j]);
  }
  const __m256 lo = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[4], a[6]));
  const __m256 hi = _mm256_add_ps(_mm256_add_ps(a[1], a[3]), _mm256_add_ps(a[5], a[7]));
  const float total = hsum8(_mm256_add_ps(lo, hi));
  float tail = 0.f;
  for (; i < D; ++i) tail += x[i] * widen(w[i]);
  return total + tail;
}
#endif

// The path in use is the kernels' (isa.h): forcing a path with set_cpu_isa switches these dots too.
template <class T>
inline float dot_active(const float* x, const T* w, int64_t D) {
#ifdef CXF_X86_DOT
  switch (active_isa()) {
    case kIsaAvx512: return dot_avx512<T>(x, w, D);
    case kIsaAvx2: return dot_avx2<T>(x, w, D);
    default: break;
  }
#endif
  return dot_scalar<T>(x, w, D);
}

}  // namespace

float dot_f32(const float* x, const float* w, int64_t D) { return dot_active<float>(x, w, D); }
float dot_bf16(const float* x, const uint16_t* w, int64_t D) { return dot_active<uint16_t>(x, w, D); }
float dot_i8(const float* x, const int8_t* w, int64_t D) { return dot_active<int8_t>(x, w, D); }

}  // namespace cxf
