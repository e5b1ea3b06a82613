// Which vector code path the CPU kernels run, chosen at run time with one portable build:
//   avx512_vnni  x86-64-v4 + AVX512_VNNI (Ice Lake, Zen 4 and later): avx512, but int8 rows through vpdpwssd
//   avx512_dot   avx512_vnni + AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4): also bf16 rows through vdpbf16ps
//   avx512       x86-64-v4
//   avx2         x86-64-v3 (AVX2 + FMA)
//   scalar       whatever the compiler's default target vectorises (SSE2 on x86-64)
// The vnni and dot paths run avx512's code everywhere but in the dot products of int8 (and bf16) table rows
// (row_dot.cpp, query.h).
//
// The default path (the best of those above but avx512_dot, which is opt-in: isa.cpp says why) is picked when the
// library loads; set_cpu_isa() forces another one (the
// CASCADEXML_FAST_CPU_ISA environment variable, read by the Python package at import, and the tests, which run
// every path this CPU supports). A hot kernel is written once as an always-inline template and called through
// with_isa(): each path is a flatten-ed wrapper with its own target attribute, so the whole kernel is inlined
// into it and vectorised for that instruction set. The dispatch is one load and a switch per kernel call (a
// block of rows), not per element.
#pragma once

namespace cxf {

enum Isa : int { kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAvx512Vnni = 3, kIsaAvx512Dot = 4 };

extern int g_active_isa;  // the path in use (an Isa value); written only by set_cpu_isa

inline int active_isa() { return g_active_isa; }
const char* isa_name(int isa);          // "scalar", "avx2", "avx512", "avx512_vnni", "avx512_dot"
bool isa_supported(int isa);            // by this CPU and this build
int best_isa();                         // the default: avx512_vnni, else avx512, else avx2, else scalar
int set_cpu_isa(const char* name);      // "auto" or a path name: 1 = set, 0 = CPU lacks it, -1 = unknown name

#define CXF_KERNEL __attribute__((always_inline)) inline

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CXF_X86_PATHS 1
template <class F>
__attribute__((target("arch=x86-64-v4"), flatten)) void run_avx512(const F& f) { f(); }
template <class F>
__attribute__((target("arch=x86-64-v3"), flatten)) void run_avx2(const F& f) { f(); }
#endif
template <class F>
__attribute__((flatten)) void run_scalar(const F& f) { f(); }

// Runs f() (a lambda calling CXF_KERNEL code) compiled for the active path.
template <class F>
inline void with_isa(const F& f) {
#ifdef CXF_X86_PATHS
  switch (g_active_isa) {
    case kIsaAvx512Dot:  // the generic kernels are avx512's; only the row dots differ (row_dot.cpp)
    case kIsaAvx512Vnni:
    case kIsaAvx512: run_avx512(f); return;
    case kIsaAvx2: run_avx2(f); return;
    default: break;
  }
#endif
  run_scalar(f);
}

}  // namespace cxf
