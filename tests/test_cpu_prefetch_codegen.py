"""The software prefetches of the CPU kernels survive compilation.

A prefetch has no effect a test can observe, and GCC may delete one: a helper that only prefetches, left out of line,
is a "pure" function to it, and its calls go (csrc/cpu/vec.h, CXF_PREFETCH_INLINE). That once removed every row
prefetch of the shortlist forward, 40-60% slower on scattered rows with every result still right. So this reads the
built extension's machine code: each hot kernel's AVX-512 and AVX2 instances must still hold prefetch instructions,
for its rows and, where it reads them, its bias and int8 scales. x86-64 builds with GNU objdump only."""
import platform
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

import cascadexml_fast

OBJDUMP = shutil.which("objdump")

# (kernel, fewest prefetch instructions per instance): the per-document shortlist forward prefetches its first rows
# and, in its loop, the row ahead, each with the id's bias and scale entries (3 sites, twice); the beam search's
# block scorer advances the stream (rows) and prefetches a block's bias and scales when it reaches the block.
KERNELS = [
    ("forward_impl<cxf::F32, long>", 6),
    ("forward_impl<cxf::BF16, int>", 6),
    ("forward_impl<cxf::I8, long>", 6),
    ("score_block_erased<cxf::F32>", 2),
    ("score_block_erased<cxf::I8>", 2),
    ("score_block_docs_erased<cxf::BF16>", 2),
    ("forward_grouped_impl<cxf::F32, long>", 1),
    ("grad_input_impl<cxf::F32, long>", 1),
]


@pytest.fixture(scope="module")
def prefetches_per_function():
    if platform.machine() not in ("x86_64", "AMD64") or OBJDUMP is None:
        pytest.skip("needs an x86-64 build and objdump")
    so = next(Path(cascadexml_fast.__file__).parent.glob("_C*.so"), None)
    if so is None:
        pytest.skip("the compiled extension is not built")
    listing = subprocess.run([OBJDUMP, "-d", "-C", "--no-show-raw-insn", str(so)], capture_output=True, text=True,
                             check=True).stdout
    counts: Counter = Counter()  # prefetch instructions per function
    names = []
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            names.append(header.group(1))
        elif names and "\tprefetch" in line:
            counts[names[-1]] += 1
    if not any(n.startswith("void cxf::run_avx512<") for n in names):
        pytest.skip("no per-path kernel instances by these names (another compiler's build)")
    return counts


@pytest.mark.parametrize("kernel, fewest", KERNELS)
@pytest.mark.parametrize("path", ["run_avx512", "run_avx2"])
def test_hot_kernels_keep_their_prefetches(prefetches_per_function, kernel, fewest, path):
    instances = {n: c for n, c in prefetches_per_function.items()
                 if n.startswith(f"void cxf::{path}<") and f"::{kernel}(" in n}
    assert instances, f"no prefetch instruction left in the {path} instance of {kernel}"
    assert min(instances.values()) >= fewest, f"{path} {kernel}: {instances}"
