// The active vector path of the CPU kernels (see isa.h).
#include "cpu/isa.h"

#include <string>

namespace cxf {

bool isa_supported(int isa) {
  if (isa == kIsaScalar) return true;
#ifdef CXF_X86_PATHS
  __builtin_cpu_init();
  if (isa == kIsaAvx512Dot)
    return __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("avx512bf16");
  if (isa == kIsaAvx512Vnni) return __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512vnni");
  if (isa == kIsaAvx512) return __builtin_cpu_supports("x86-64-v4");
  if (isa == kIsaAvx2) return __builtin_cpu_supports("x86-64-v3");
#endif
  return false;
}

// avx512_vnni is the default where supported: its int8 rows score 0.96-1.20x as fast as avx512's on the 2-core
// Zen 4, and closer to the exact dot. avx512_dot is not: its bf16 rows score document-by-document shortlists at
// 0.76-0.85x (benchmarks/README.md, "CPU vector paths").
int best_isa() {
  for (int isa : {kIsaAvx512Vnni, kIsaAvx512, kIsaAvx2})
    if (isa_supported(isa)) return isa;
  return kIsaScalar;
}

int g_active_isa = best_isa();

const char* isa_name(int isa) {
  switch (isa) {
    case kIsaAvx512Dot: return "avx512_dot";
    case kIsaAvx512Vnni: return "avx512_vnni";
    case kIsaAvx512: return "avx512";
    case kIsaAvx2: return "avx2";
    default: return "scalar";
  }
}

int set_cpu_isa(const char* name) {
  const std::string wanted = name ? name : "";
  if (wanted.empty() || wanted == "auto") {
    g_active_isa = best_isa();
    return 1;
  }
  for (int isa : {kIsaAvx512Vnni, kIsaAvx512Dot, kIsaAvx512, kIsaAvx2, kIsaScalar}) {
    if (wanted != isa_name(isa)) continue;
    if (!isa_supported(isa)) return 0;
    g_active_isa = isa;
    return 1;
  }
  return -1;
}

}  // namespace cxf
