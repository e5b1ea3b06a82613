"""Label tables in transparent huge pages (2 MiB) on CPU.

Shortlisted scoring reads rows at random from tables of hundreds of MB to GB. With ordinary 4 KiB pages every
row is a TLB miss and a page walk on top of the DRAM access; backed by 2 MiB pages, a 2 GB table needs ~1,000 TLB
entries, which the second-level TLB holds. Measured on the 2-core EPYC (benchmarks/README.md, "Huge pages and
prefetch"): shortlists of scattered rows of a 670,091 x 768 table score 1.5-1.65x faster in fp32 and 1.45-2.2x in
bf16; shortlists of contiguous blocks (tree children, clusters) gain little, one TLB entry covering a block.

Linux hands a region huge pages only when it is 2 MiB-aligned and, under the common THP setting "madvise", marked
with madvise(MADV_HUGEPAGE) before it is first touched. torch's allocator does neither by default (its
THP_MEM_ALLOC_ENABLE=1 environment variable does, for every allocation of the process), so the library allocates
its CPU tables (layers, int8 copies from `quantize`, sparse optimizer state) with `hugepage_empty`, and
`to_hugepages` moves the tables of an existing model. Where THP is off ("never"), not Linux, or the tensor is
smaller than one huge page, these fall back to plain `torch.empty` / leave the tensor as it is.

The memory is an anonymous mmap owned by the tensor's storage (freed with it); the storage is not resizable.
Copies (`clone`, `.to`, `torch.save`/`load`, `share_memory_()`) are ordinary tensors.
"""
from __future__ import annotations

import math
import mmap
from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["HUGE_PAGE_BYTES", "thp_mode", "hugepage_empty", "hugepage_zeros", "table_empty", "to_hugepages",
           "process_hugepage_bytes"]

HUGE_PAGE_BYTES = 2 << 20
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> Optional[str]:
    """The kernel's transparent-huge-page setting: "always", "madvise" or "never"; None without THP (not Linux,
    or no sysfs entry)."""
    try:
        with open(_THP_SETTING) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _usable(nbytes: int) -> bool:
    return nbytes >= HUGE_PAGE_BYTES and hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in ("always", "madvise")


def hugepage_empty(shape: Union[int, Sequence[int], torch.Size], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor whose memory is 2 MiB-aligned and advised for huge pages (plain
    `torch.empty` where huge pages are unavailable or the tensor is smaller than one)."""
    shape = torch.Size([shape] if isinstance(shape, int) else shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not _usable(nbytes):
        return torch.empty(shape, dtype=dtype)
    # One spare huge page lets the data start on a 2 MiB boundary wherever mmap places the region.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    start = (-torch.frombuffer(region, dtype=torch.uint8).data_ptr()) % HUGE_PAGE_BYTES
    # The storage is exactly the aligned bytes (safetensors refuses tensors that do not cover their storage); it
    # holds the memoryview, which holds `region`: the mapping is unmapped when the last tensor on it is freed.
    return torch.frombuffer(memoryview(region)[start:start + nbytes], dtype=dtype).view(shape)


def hugepage_zeros(shape: Union[int, Sequence[int], torch.Size], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`hugepage_empty` filled with zeros."""
    return hugepage_empty(shape, dtype).zero_()


def table_empty(shape: Sequence[int], dtype: Optional[torch.dtype] = None,
                device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Storage for a label table: huge pages on CPU, `torch.empty` on any other device."""
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    device = torch.device(device) if device is not None else torch.empty(()).device
    if device.type != "cpu":
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return hugepage_empty(shape, dtype)


def _moved(t: torch.Tensor, min_bytes: int) -> Optional[torch.Tensor]:
    """A huge-page copy of CPU tensor `t`, or None when it should stay (not CPU, small, already aligned there)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or t.is_sparse or nbytes < max(min_bytes, HUGE_PAGE_BYTES) or not _usable(nbytes):
        return None
    if t.is_contiguous() and t.data_ptr() % HUGE_PAGE_BYTES == 0:  # hugepage_empty's (or THP_MEM_ALLOC_ENABLE's)
        return None
    return hugepage_empty(t.shape, t.dtype).copy_(t)


@torch.no_grad()
def to_hugepages(obj, *, min_bytes: int = 16 * HUGE_PAGE_BYTES):
    """Moves CPU tensors of at least `min_bytes` (default 32 MiB) into huge-page memory.

    A tensor gives a moved copy (or itself). A module is changed in place and returned: each qualifying parameter
    and buffer keeps its identity (`param.data` is swapped), so optimizers built before still hold them, though
    state they already allocated stays where it is. Call it after any dtype conversion (`.to(torch.bfloat16)`
    allocates plain memory again).
    """
    if isinstance(obj, torch.Tensor):
        moved = _moved(obj, min_bytes)
        return obj if moved is None else moved
    if not isinstance(obj, nn.Module):
        raise TypeError(f"obj must be a torch.Tensor or nn.Module, got {type(obj).__name__}")
    for module in obj.modules():
        for param in module.parameters(recurse=False):
            moved = _moved(param.data, min_bytes)
            if moved is not None:
                param.data = moved
        for name, buf in module.named_buffers(recurse=False):
            moved = None if buf is None else _moved(buf, min_bytes)
            if moved is not None:
                setattr(module, name, moved)
    return obj


def process_hugepage_bytes() -> int:
    """Bytes of transparent huge pages this process holds (AnonHugePages of /proc/self/smaps_rollup); 0 where
    that cannot be read. The kernel may give fewer huge pages than advised (fragmented memory: the rest of a region
    then uses 4 KiB pages); tests and benchmark reports read this to see what it gave."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
