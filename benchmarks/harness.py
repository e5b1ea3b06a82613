"""Shared benchmark harness: timing, machine ceilings, peak memory, machine description, result writers.

Every benchmark script in this folder uses these helpers so that all numbers are taken the same way
(DESIGN.md, "Measurement protocol" and "Roofline and memory, defined once"):

- ``time_fn``        median and p10/p90 of timed calls after warm-up (cache flush before every call;
                     CUDA events on GPU, ``time.perf_counter`` on CPU).
- ``copy_bandwidth`` bytes read + bytes written per second by a large device copy (the roofline's bandwidth).
- ``matmul_peak``    FLOP/s of a large square matmul in a given dtype (the roofline's compute ceiling).
- ``roofline``       max(bytes / bandwidth, flops / peak), with the bound that wins.
- ``PeakMemory``     context manager: peak extra memory of the code inside it.
- ``measure_call``   one call inside ``PeakMemory`` (output kept for checks), then ``time_fn``.
- ``num_threads``    context manager: torch (and OpenMP kernel) thread count inside a block.
- ``device_info``    what the numbers were taken on.
- ``write_results``  ``<name>_<device-slug>.json`` + ``.md`` (+ ``.png``) under ``benchmarks/results``.

Only torch, numpy and the standard library are needed; matplotlib is optional (the plot is skipped without it).
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

MB = 1e6  # reported "MB" are 10^6 bytes, "GB/s" are 10^9 bytes per second


# ----------------------------------------------------------------------------------------------------------
# devices


def resolve_device(device: Optional[str | torch.device] = None) -> torch.device:
    """``None`` -> cuda when available, else cpu; ``"cuda"`` -> the current CUDA device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------
# timing


_FLUSH: Dict[Any, torch.Tensor] = {}


def last_level_cache_bytes() -> Optional[int]:
    """Largest CPU cache (bytes) from /sys (Linux), None where unknown."""
    best = None
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            txt = (d / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
            size = int(txt.rstrip("KMG")) * mult
        except (OSError, ValueError):
            continue
        best = size if best is None else max(best, size)
    return best


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """GPU: 256 MiB (L2 is 50 MB on H100, 60 MB on H200). CPU: 2 x the last-level cache, at least 64 MiB."""
    key = str(device)
    if key not in _FLUSH:
        if device.type == "cuda":
            nbytes = 256 << 20
        else:
            nbytes = max(64 << 20, 2 * (last_level_cache_bytes() or 0))
        _FLUSH[key] = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return _FLUSH[key]


def flush_cache(device: torch.device) -> None:
    """Evict the caches between timed calls. GPU: zero the buffer (as ``triton.testing.do_bench``). CPU: read it
    (a read leaves clean lines, so the timed call does not pay write-backs of the flush)."""
    buf = _flush_buffer(device)
    if device.type == "cuda":
        buf.zero_()
    else:
        buf.sum()


def _summary(times_ms: Sequence[float]) -> Dict[str, Any]:
    t = np.asarray(times_ms, dtype=np.float64)
    return dict(
        median_ms=float(np.median(t)),
        p10_ms=float(np.percentile(t, 10)),
        p90_ms=float(np.percentile(t, 90)),
        n=int(t.size),
    )


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = 5,
    reps: int = 20,
    device: Optional[str | torch.device] = None,
    setup: Optional[Callable[[], Any]] = None,
    min_reps: Optional[int] = None,
    max_time_s: Optional[float] = None,
    flush: bool = True,
) -> Dict[str, Any]:
    """Time ``fn()``; returns dict(median_ms, p10_ms, p90_ms, n).

    ``warmup`` untimed calls, then ``reps`` timed calls. ``setup()`` (optional) runs before every call,
    outside the timed region: use it to drop gradients (``p.grad = None``) so that accumulation and the memory
    it holds do not skew later calls.

    Slow baselines: with ``max_time_s``, the number of timed calls is cut to what fits that many seconds
    (estimated from the last warm-up call, or the first timed call without warm-up), but never below
    ``min_reps`` (default: ``reps``, i.e. no cut). ``n`` in the result is the number actually timed.

    Caches are flushed before every call, outside the timed region (``flush=False`` turns this off), so that
    small working sets (a B=1 shortlist is a few MB) come from DRAM/HBM as in a real step, not from a cache
    warmed by the previous call. GPU: a 256 MiB buffer is zeroed (evicts the 50-60 MB L2), the method of
    ``triton.testing.do_bench``, here with a fixed call count. CPU: a buffer of 2 x the last-level cache
    (>= 64 MiB) is read.
    CUDA timing: CUDA events around each call on the current stream; host launch overhead is inside, as in use.
    CPU timing: ``time.perf_counter`` around each call; the garbage collector is paused while timing.
    """
    device = resolve_device(device)
    min_reps = reps if min_reps is None else min(min_reps, reps)
    cuda = device.type == "cuda"

    def one_call() -> float:
        if setup is not None:
            setup()
        if flush:
            flush_cache(device)
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    est_ms = None
    for _ in range(warmup):
        est_ms = one_call()
    synchronize(device)

    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        times: List[float] = []
        target = reps
        while len(times) < target:
            times.append(one_call())
            if len(times) == 1 and max_time_s is not None:
                est = times[0] if est_ms is None else min(est_ms, times[0])
                fit = int(max_time_s * 1e3 / max(est, 1e-6))
                target = max(min_reps, min(reps, fit))
    finally:
        if gc_was_enabled:
            gc.enable()
    return _summary(times)


# ----------------------------------------------------------------------------------------------------------
# machine ceilings


def copy_bandwidth(device: Optional[str | torch.device] = None, nbytes: Optional[int] = None,
                   reps: int = 7) -> float:
    """Bytes read + bytes written per second by ``dst.copy_(src)`` of ``nbytes`` (median of ``reps``).

    Default size: 256 MiB source on CPU (512 MiB moved), 1 GiB source on GPU (2 GiB moved): far beyond every
    cache, so this is DRAM/HBM bandwidth as a streaming kernel sees it. On CPU it uses torch's threads.
    """
    device = resolve_device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page
    t = time_fn(lambda: dst.copy_(src), warmup=2, reps=reps, device=device, flush=False)
    del src, dst
    return 2.0 * n * 4 / (t["median_ms"] * 1e-3)


def matmul_peak(device: Optional[str | torch.device] = None, dtype: torch.dtype = torch.float32,
                n: Optional[int] = None, reps: int = 5) -> float:
    """FLOP/s (2 n^3 per call) of an n x n @ n x n matmul in ``dtype`` (median of ``reps``).

    Default n: 8192 on GPU (tensor cores for bf16/fp16; fp32 follows torch's current TF32 setting, which
    ``device_info`` records), 2048 on CPU (about 1 s in all on 2 cores).
    """
    device = resolve_device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b, out=out), warmup=2, reps=reps, device=device, flush=False)
    return 2.0 * n ** 3 / (t["median_ms"] * 1e-3)


def roofline(nbytes: float, flops: float, bandwidth: float, peak_flops: float) -> Dict[str, Any]:
    """Roofline time (DESIGN.md): unavoidable bytes / copy bandwidth and FLOPs / matmul peak; the larger wins."""
    mem_ms = nbytes / bandwidth * 1e3
    cmp_ms = flops / peak_flops * 1e3 if peak_flops else 0.0
    return dict(ms=max(mem_ms, cmp_ms), memory_ms=mem_ms, compute_ms=cmp_ms,
                bound="memory" if mem_ms >= cmp_ms else "compute")


# ----------------------------------------------------------------------------------------------------------
# peak extra memory


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """Peak extra memory of the code inside ``with PeakMemory(device) as pm:``; read ``pm.extra_bytes``.

    "Extra" = peak during the block minus what was in use when it started (parameters, inputs, optimizer
    state, anything alive before), DESIGN.md's definition.

    CUDA: ``torch.cuda.reset_peak_memory_stats`` on entry, then ``max_memory_allocated - memory_allocated``
    (caching-allocator view: tensors only, no allocator slack, no cuBLAS/Triton workspaces outside torch).
    CPU: RSS-based. On entry the kernel's high-water mark is reset (``5`` written to /proc/self/clear_refs,
    which sets VmHWM to the current VmRSS) and VmRSS is read; on exit the result is VmHWM - that VmRSS. It counts
    pages actually touched by the whole process (allocator caching and other threads included), so it is a
    close upper bound for large, touched allocations and can miss small ones served from memory malloc kept.
    Where /proc is unavailable (not Linux, or clear_refs not writable) ``extra_bytes`` is None.
    """

    def __init__(self, device: Optional[str | torch.device] = None):
        self.device = resolve_device(device)
        self.extra_bytes: Optional[int] = None
        self._before: Optional[int] = None

    @property
    def extra_mb(self) -> Optional[float]:
        return None if self.extra_bytes is None else self.extra_bytes / MB

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            self._before = None
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                rss = _proc_status_kb("VmRSS")
                self._before = None if rss is None else rss * 1024
            except OSError:
                self._before = None
        return self

    def __exit__(self, *exc) -> None:
        if self._before is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._before)
        else:
            hwm = _proc_status_kb("VmHWM")
            self.extra_bytes = None if hwm is None else max(0, hwm * 1024 - self._before)


def peak_memory_available(device: Optional[str | torch.device] = None) -> bool:
    """Whether PeakMemory can measure on this device (CUDA always; CPU needs a writable /proc/self/clear_refs)."""
    with PeakMemory(device) as pm:
        pass
    return pm.extra_bytes is not None


def available_memory_bytes(device: Optional[str | torch.device] = None) -> Optional[int]:
    """Free device memory (CUDA: mem_get_info free + torch's cached-but-free blocks; CPU: MemAvailable)."""
    device = resolve_device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


# ----------------------------------------------------------------------------------------------------------
# threads and one measured call


@contextlib.contextmanager
def num_threads(n: Optional[int]):
    """``torch.set_num_threads(n)`` inside the block (``None``: unchanged), the previous count restored after.
    The package's OpenMP kernels follow torch's thread count."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def measure_call(
    fn: Callable[[], Any],
    device: Optional[str | torch.device] = None,
    *,
    warmup: int = 2,
    reps: int = 20,
    min_reps: Optional[int] = None,
    max_time_s: Optional[float] = None,
    setup: Optional[Callable[[], Any]] = None,
    slow_ms: float = 250.0,
    keep_out: bool = False,
    flush: bool = True,
) -> Dict[str, Any]:
    """One call inside ``PeakMemory`` (warm-up call 1: it also pays one-time costs such as compilation), then
    ``time_fn`` with the remaining ``warmup - 1`` warm-up calls. On CPU a first call slower than ``slow_ms`` gets
    no further warm-up (slow baselines: every extra call costs seconds). Returns ``time_fn``'s dict plus
    ``extra_mb`` (peak extra memory of call 1, None where unmeasurable), ``first_ms`` (call 1's wall time) and
    ``out`` (call 1's result when ``keep_out``, for correctness checks; else None). ``flush`` goes to ``time_fn``."""
    device = resolve_device(device)
    if setup is not None:
        setup()
    synchronize(device)
    with PeakMemory(device) as pm:  # entering resets the high-water mark, which can take a while: not timed
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        first_ms = (time.perf_counter() - t0) * 1e3
    if not keep_out:
        out = None
    more = max(0, warmup - 1)
    if device.type != "cuda" and first_ms > slow_ms:
        more = 0
    t = time_fn(fn, warmup=more, reps=reps, device=device, setup=setup, min_reps=min_reps, max_time_s=max_time_s,
                flush=flush)
    return dict(t, extra_mb=pm.extra_mb, first_ms=first_ms, out=out)


# ----------------------------------------------------------------------------------------------------------
# machine description


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags(wanted=("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "asimd", "sve")):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def loadavg() -> Optional[List[float]]:
    """1/5/15-minute load averages (other processes competing for the cores show here), None where unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


TABLE_MEMORY = ("huge", "plain")
_table_memory = ["huge"]


def set_table_memory(kind: str) -> None:
    """"huge" (default): benchmark tables in huge pages, as the library allocates its CPU tables; "plain": ordinary
    torch memory (4 KiB pages), to measure what huge pages are worth (--table-memory plain)."""
    if kind not in TABLE_MEMORY:
        raise ValueError(f"table memory must be one of {TABLE_MEMORY}, got {kind!r}")
    _table_memory[0] = kind


def add_table_memory_arg(parser) -> None:
    parser.add_argument("--table-memory", choices=TABLE_MEMORY, default="huge",
                        help="CPU tables in huge pages as the library allocates them (default) or in plain memory")


def table_memory_report() -> Dict[str, Any]:
    """For meta: how tables were allocated, and how much huge-page memory the kernel actually gave this process."""
    try:
        from cascadexml_fast.hugepages import process_hugepage_bytes
        held = process_hugepage_bytes() / 1e9
    except Exception:
        held = None
    return dict(table_memory=_table_memory[0], transparent_hugepages=thp_mode(), hugepages_held_gb=held)


def table_empty(shape: Sequence[int], dtype: torch.dtype = torch.float32,
                device: Optional[str | torch.device] = None) -> torch.Tensor:
    """Storage for a benchmark's label table as the library allocates its own (cascadexml_fast.hugepages: huge pages
    on CPU), so that fused and baseline paths read the same memory a user's model holds; plain torch.empty where the
    package does not import or set_table_memory("plain") was called."""
    try:
        from cascadexml_fast.hugepages import table_empty as allocate
    except Exception:
        allocate = None
    if allocate is None or _table_memory[0] == "plain":
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return allocate(shape, dtype, device)


def table_as(table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`table` converted to `dtype` in table storage (itself when it already has that dtype)."""
    if table.dtype == dtype:
        return table
    return table_empty(table.shape, dtype, table.device).copy_(table)


def thp_mode() -> Optional[str]:
    """Linux's transparent-huge-page setting (always / madvise / never), None where there is none."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.find("[") + 1:text.find("]")] if "[" in text else None


def device_info(device: Optional[str | torch.device] = None) -> Dict[str, Any]:
    """What the numbers were taken on: device name, cores, threads, library versions."""
    device = resolve_device(device)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info: Dict[str, Any] = dict(
        device=str(device),
        device_type=device.type,
        cpu_model=_cpu_model(),
        cpu_flags=_cpu_flags(),
        cpu_count=os.cpu_count(),
        cpu_usable=usable,
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        triton=_version("triton") or _version("pytorch-triton"),
        numpy=np.__version__,
        cuda_runtime=torch.version.cuda,
        loadavg=loadavg(),
        transparent_hugepages=thp_mode(),
    )
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            name=p.name,
            gpu_name=p.name,
            gpu_capability=f"{p.major}.{p.minor}",
            gpu_memory_gb=round(p.total_memory / 1e9, 1),
            gpu_sms=p.multi_processor_count,
            allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            triton_interpret=os.environ.get("TRITON_INTERPRET"),
        )
    else:
        info.update(name=f"{info['cpu_model']} ({usable} cores)")
    return info


def device_slug(info: Dict[str, Any]) -> str:
    """File-name tag for a device: ``cuda-nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-2c``."""
    if info.get("device_type") == "cuda":
        base = "cuda-" + str(info.get("gpu_name", "gpu"))
    else:
        base = f"cpu-{info.get('cpu_model', 'cpu')}-{info.get('cpu_usable', '')}c"
    base = re.sub(r"\(r\)|\(tm\)", "", base.lower())
    return re.sub(r"[^a-z0-9]+", "-", base).strip("-")


def command_line() -> str:
    return " ".join([Path(sys.executable).name] + sys.argv)


# ----------------------------------------------------------------------------------------------------------
# writers


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def format_table(records: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None,
                 headers: Optional[Dict[str, str]] = None) -> str:
    """A markdown table (readable as plain text too). ``columns``: keys to show (default: all, first-seen order);
    ``headers``: optional display names."""
    if columns is None:
        columns = []
        for r in records:
            for k in r:
                if k not in columns:
                    columns.append(k)
    headers = headers or {}
    names = [headers.get(c, c) for c in columns]
    rows = [[_fmt(r.get(c)) for c in columns] for r in records]
    widths = [max([len(n)] + [len(row[i]) for row in rows]) for i, n in enumerate(names)]
    out = ["| " + " | ".join(n.ljust(w) for n, w in zip(names, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(out)


def plot_records(records: Sequence[Dict[str, Any]], path: str | Path, *, x: str, y: str = "ms", series: str = "method",
                 panels: Sequence[str] = (), logy: bool = True, title: str = "") -> Optional[Path]:
    """One panel per distinct value of ``panels`` keys; in each, ``y`` against categorical ``x``, one line per
    ``series`` value. Returns the path, or None when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    recs = [r for r in records if r.get(y) is not None and r.get(x) is not None]
    if not recs:
        return None
    keys: List[tuple] = []
    for r in recs:
        k = tuple(r.get(p) for p in panels)
        if k not in keys:
            keys.append(k)
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 4 * nrow), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        sub = [r for r in recs if tuple(r.get(p) for p in panels) == k]
        xs: List[Any] = []
        for r in sub:
            if r[x] not in xs:
                xs.append(r[x])
        names: List[Any] = []
        for r in sub:
            if r.get(series) not in names:
                names.append(r.get(series))
        for name in names:
            pts = [(xs.index(r[x]), r[y]) for r in sub if r.get(series) == name]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="--" if name == "roofline" else "-", label=str(name))
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([str(v) for v in xs], rotation=45, ha="right", fontsize=7)
        if logy:
            ax.set_yscale("log")
        ax.set_ylabel(y)
        ax.set_title(", ".join(f"{p}={v}" for p, v in zip(panels, k)), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(o: Any) -> Any:
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    return str(o)


def _clean(o: Any) -> Any:
    """Replace NaN/inf floats by None so the JSON is strict."""
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_results(name: str, records: Sequence[Dict[str, Any]], meta: Dict[str, Any],
                  out_dir: Optional[str | Path] = None, *, columns: Optional[Sequence[str]] = None,
                  headers: Optional[Dict[str, str]] = None, plot: Optional[Dict[str, Any]] = None,
                  slug: Optional[str] = None, notes: str = "") -> Dict[str, Optional[Path]]:
    """Write ``<name>_<device-slug>.json`` (meta + records), ``.md`` (meta summary + table) and ``.png``.

    ``meta["device_info"]`` (from ``device_info``) names the device unless ``slug`` is given. ``columns`` /
    ``headers`` choose the markdown table; ``plot`` holds ``plot_records`` keyword arguments (x, y, series,
    panels, ...); without it, or without matplotlib, no PNG is written. Returns the paths written.
    """
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    slug = slug or device_slug(meta.get("device_info", {}))
    stem = out / f"{name}_{slug}"
    paths: Dict[str, Optional[Path]] = {}

    payload = _clean({"name": name, "meta": meta, "records": list(records)})
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable))
    tmp.replace(stem.with_suffix(".json"))
    paths["json"] = stem.with_suffix(".json")

    di = meta.get("device_info", {})
    lines = [f"# {name} on {di.get('name', slug)}", ""]
    for k in ("command", "timestamp"):
        if k in meta:
            lines.append(f"- {k}: `{meta[k]}`")
    for k in ("torch", "triton", "numpy", "python", "torch_threads"):
        if k in di:
            lines.append(f"- {k}: {di[k]}")
    for k, v in meta.items():
        if k in ("device_info", "command", "timestamp") or isinstance(v, (dict, list)):
            continue
        lines.append(f"- {k}: {_fmt(v)}")
    if notes:
        lines += ["", notes]
    lines += ["", format_table(list(records), columns, headers), ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    paths["md"] = stem.with_suffix(".md")

    paths["png"] = None
    if plot:
        kw = dict(plot)
        kw.setdefault("title", f"{name} on {di.get('name', slug)}")
        paths["png"] = plot_records(list(records), stem.with_suffix(".png"), **kw)
    return paths
