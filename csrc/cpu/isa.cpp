// The active vector path of the CPU kernels (see isa.h).
#include "cpu/isa.h"

#include <string>

namespace cxf {

bool isa_supported(int isa) {
  if (isa == kIsaScalar) return true;
#ifdef CXF_X86_PATHS
  __builtin_cpu_init();
  if (isa == kIsaAvx512Dot)
    return __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("avx512vnni");
  if (isa == kIsaAvx512) return __builtin_cpu_supports("x86-64-v4");
  if (isa == kIsaAvx2) return __builtin_cpu_supports("x86-64-v3");
#endif
  return false;
}

// avx512_dot is not the default: on the 2-core Zen 4 it scores int8 rows from DRAM 0.99-1.26x as fast on one thread
// but bf16 shortlists 0.83-0.85x, and its bf16/int8 scores differ in the last bits from avx512 and avx2, which agree
// bit for bit (benchmarks/README.md, "CPU vector paths").
int best_isa() {
  for (int isa : {kIsaAvx512, kIsaAvx2})
    if (isa_supported(isa)) return isa;
  return kIsaScalar;
}

int g_active_isa = best_isa();

const char* isa_name(int isa) {
  switch (isa) {
    case kIsaAvx512Dot: return "avx512_dot";
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
  for (int isa : {kIsaAvx512Dot, kIsaAvx512, kIsaAvx2, kIsaScalar}) {
    if (wanted != isa_name(isa)) continue;
    if (!isa_supported(isa)) return 0;
    g_active_isa = isa;
    return 1;
  }
  return -1;
}

}  // namespace cxf
