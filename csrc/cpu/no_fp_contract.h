// Include first in a file whose arithmetic must round every multiply and add on its own (no FMA contraction): the
// CPU optimizers, so that their updates equal the reference (ops/reference.py) and the Triton kernels bit for bit.
// Being first, the pragma reaches everything the file instantiates after it (the vector paths of with_isa, isa.h,
// and what is inlined into them); adamw_math.h refuses to compile without it (CXF_NO_FP_CONTRACT).
#pragma once

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#define CXF_NO_FP_CONTRACT 1
