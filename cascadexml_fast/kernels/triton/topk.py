"""Triton top-k with positions, under DESIGN.md's rules (ties to the lower position, NaN below -inf, missing
slots position -1 and value -inf), identical ids to `ops.reference.topk`.

Launcher (plain function, tensors on the kernel's device: CUDA, or CPU under TRITON_INTERPRET=1):

    topk(scores [B, K], k, mask=None [B, K] bool, method="auto") -> values [B, k] fp32, positions [B, k] int64

Packed keys. Every score becomes one int64 whose signed order is the ranking:

    skey   = fp32 bits as int32, negatives with the 31 low bits flipped      (signed int32 order = float order)
             -0.0 -> +0.0's key (they compare equal, so the lower position wins), NaN -> _NAN_KEY (just below
             -inf's key), not a candidate (mask False, or past K) -> _MASK_KEY = INT32_MIN (below everything)
    packed = skey << 32 | (2^32 - 1 - position)                            (equal scores: lower position larger)

All the key arithmetic is on integer bits (no float compares), so denormals and signed zeros behave the same on
every device. Values are read back from the original scores at the chosen positions (a NaN stays that NaN).

Methods (`method="auto"` picks by the padded row length, without a host sync):

- "sort" (next_pow2(K) <= _SORT_MAX): one program per row holds the whole row's packed keys in registers and
  runs Triton's bitonic `tl.topk` (or `tl.sort` when k covers the row); one read of the row.
- "radix" (longer rows): one program per row runs a radix select with 8-bit digits on the 32-bit score key
  (the position never needs radix passes: ties at the threshold are taken in position order). Pass 0 reads
  the row and builds the histogram of the top digit. Each further pass appends the elements already known to
  be in the top k (prefix above the threshold prefix) to the winners, and deals with the elements still tied
  with the threshold prefix: while they are more than _CAP, it histograms their next digit on the way; once
  they number <= _CAP, it only copies them (packed, in position order) into a per-row scratch buffer, whose
  next-digit histogram is then taken from the buffer, and every later pass reads only the buffer. (Triton 3.6
  lowers `tl.histogram` to warp ballots, ~60 instructions per 32 elements for 256 bins, 3.8 to one
  shared-memory atomic per element: far dearer than the compaction, so it is kept off the second full pass.) A pass that finds all remaining ties needed stops
  early; after the last digit the threshold is exact and its ties are taken by position. For typical scores
  (a few hundred to a few thousand ties with the top digit) this reads the row twice and histograms it once.
  The <= k winners are then sorted by packed key in registers (`tl.sort`, k <= _SELECT_SORT_MAX) and unpacked;
  the output positions tensor doubles as the winners' scratch. For k > _SELECT_SORT_MAX the winners are sorted
  with `torch.sort` on the packed keys instead.
- "torch": Triton packing, `torch.topk` on the int64 packed keys, Triton unpacking (a reference-exact fallback,
  also used to cross-check the kernels).

Limits: K < 2^31 (positions are packed into 32 bits). One program per row: long rows with few rows (say B < 64
at K = 65536) leave most of a GPU idle; the cascade's rows (beam x children, a few thousand) and the issue's
[256, 65536] target fit this shape. The block sizes below are reasoned, not yet tuned on a GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["topk", "pack_keys"]

# Rows whose padded length is at most this are sorted whole in registers ("sort" method).
_SORT_MAX = 4096
# "radix": the <= k winners are sorted in registers up to this many, else by torch.sort on packed keys.
_SELECT_SORT_MAX = 4096
# "radix": elements per loop iteration of a pass over the row, and tie candidates kept in the scratch buffer.
_RADIX_BLOCK = 4096
_CAP = 4096

_MASK_KEY = tl.constexpr(-2147483648)  # INT32_MIN: not a candidate
_NAN_KEY = tl.constexpr(-2147483647)  # below -inf's key (-2139095041)
_LOW32 = tl.constexpr(4294967295)
_EMPTY = tl.constexpr(-9223372036854775808)  # INT64_MIN: an empty slot (skey = INT32_MIN, not a candidate)


# ---------------------------------------------------------------------------------------------------------
# Key helpers
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _score_key(s):
    """fp32 -> int32 whose signed order is the score order; +-0 equal, NaN just below -inf."""
    i = s.to(tl.int32, bitcast=True)
    mag = i & 0x7FFFFFFF
    key = tl.where(i < 0, i ^ 0x7FFFFFFF, i)
    key = tl.where(mag == 0, 0, key)
    key = tl.where(mag > 0x7F800000, _NAN_KEY, key)
    return key


@triton.jit
def _row_keys(s_row, m_row, offs, K, HAS_MASK: tl.constexpr):
    """Score keys of positions offs of one row, and whether each is a candidate."""
    inb = offs < K
    s = tl.load(s_row + offs, mask=inb, other=0.0).to(tl.float32)
    valid = inb
    if HAS_MASK:
        valid = valid & (tl.load(m_row + offs, mask=inb, other=0) != 0)
    return _score_key(s), valid


@triton.jit
def _pack(skey, offs):
    return (skey.to(tl.int64) << 32) | (_LOW32 - offs.to(tl.int64))


@triton.jit
def _unpack_store(packed, cols, s_row, v_row, p_row, k):
    """Write the packed keys (best first) to columns cols (< k) as values (read from the scores) and positions."""
    valid = (packed >> 32) != _MASK_KEY
    pos = _LOW32 - (packed & _LOW32)
    keep = cols < k
    v = tl.load(s_row + pos, mask=valid & keep, other=float("-inf")).to(tl.float32)
    tl.store(v_row + cols, v, mask=keep)
    tl.store(p_row + cols, tl.where(valid, pos, -1), mask=keep)


@triton.jit
def _fill_empty(v_row, p_row, start, k, BLOCK: tl.constexpr):
    """Columns [start, k): value -inf, position -1."""
    for c0 in range(start, k, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        keep = cols < k
        tl.store(v_row + cols, tl.full([BLOCK], float("-inf"), tl.float32), mask=keep)
        tl.store(p_row + cols, tl.full([BLOCK], -1, tl.int64), mask=keep)


# ---------------------------------------------------------------------------------------------------------
# "sort": the whole row in registers
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _topk_sort_kernel(
    s_ptr, m_ptr, v_ptr, p_ptr,
    K, k,
    stride_sb, stride_mb, stride_vb, stride_pb,
    HAS_MASK: tl.constexpr, KPAD: tl.constexpr, KP: tl.constexpr, FILL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + b * stride_sb
    v_row = v_ptr + b * stride_vb
    p_row = p_ptr + b * stride_pb
    offs = tl.arange(0, KPAD)
    skey, valid = _row_keys(s_row, m_ptr + b * stride_mb, offs, K, HAS_MASK)
    packed = _pack(tl.where(valid, skey, _MASK_KEY), offs)
    if KP == KPAD:
        top = tl.sort(packed, descending=True)
    else:
        top = tl.topk(packed, KP)
    _unpack_store(top, tl.arange(0, KP), s_row, v_row, p_row, k)
    _fill_empty(v_row, p_row, KP, k, FILL)


# ---------------------------------------------------------------------------------------------------------
# "radix": radix select on the score key, then a register sort of the winners
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _pick_digit(hist, need):
    """The digit d whose bin holds the need-th largest element: (d, count in bins above d, count in bin d)."""
    bins = tl.arange(0, 256)
    incl = tl.cumsum(hist, 0, reverse=True)  # elements in bins >= j
    d = tl.max(tl.where(incl >= need, bins, -1), 0)
    above = tl.sum(tl.where(bins > d, hist, 0), 0)
    cnt = tl.sum(tl.where(bins == d, hist, 0), 0)
    return d, above, cnt


@triton.jit
def _radix_pass(
    s_row, m_row, src, dst, sel, K, nsrc, level, prefix, nsel, buffered,
    HAS_MASK: tl.constexpr, FROM_BUF: tl.constexpr, BLOCK: tl.constexpr,
):
    """One pass at `level` (the prefix holds the top 8 * (level + 1) key bits of the threshold):
    elements above the prefix (with the same higher bits) are winners, appended to sel; elements equal to it
    (the ties) are histogrammed on the next digit and, if `buffered`, appended to dst in source order.
    Returns (hist, nsel, ncopied)."""
    shift = 24 - 8 * level
    hist = tl.zeros([256], dtype=tl.int32)
    ncopy = nsel * 0
    for start in range(0, nsrc, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        if FROM_BUF:
            inb = offs < nsrc
            packed = tl.load(src + offs, mask=inb, other=_EMPTY)
            skey = (packed >> 32).to(tl.int32)
            valid = inb
        else:
            skey, valid = _row_keys(s_row, m_row, offs, K, HAS_MASK)
            packed = _pack(skey, offs)
        q = skey >> shift
        upper = (level == 0) | ((q >> 8) == (prefix >> 8))
        win = valid & upper & (q > prefix)
        tie = valid & (q == prefix)
        win_i = win.to(tl.int32)
        tl.store(sel + nsel + tl.cumsum(win_i, 0) - 1, packed, mask=win)
        nsel += tl.sum(win_i, 0)
        if buffered:
            tie_i = tie.to(tl.int32)
            tl.store(dst + ncopy + tl.cumsum(tie_i, 0) - 1, packed, mask=tie)
            ncopy += tl.sum(tie_i, 0)
        else:
            hist += tl.histogram((skey >> (shift - 8)) & 255, 256, mask=tie)
    if buffered:
        # The ties are few (<= CAP): histogram them from the buffer, not inside the pass over the source (the
        # ballot-based histogram costs far more per element than the compaction).
        tl.debug_barrier()
        for start in range(0, ncopy, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < ncopy
            skey = (tl.load(dst + offs, mask=inb, other=_EMPTY) >> 32).to(tl.int32)
            hist += tl.histogram((skey >> (shift - 8)) & 255, 256, mask=inb)
    return hist, nsel, ncopy


@triton.jit
def _final_pass(
    s_row, m_row, src, sel, K, nsrc, level, prefix, need, nsel,
    HAS_MASK: tl.constexpr, FROM_BUF: tl.constexpr, BLOCK: tl.constexpr,
):
    """Winners above the prefix, then the first `need` elements equal to it (in position order)."""
    shift = 24 - 8 * level
    ntie = nsel * 0
    for start in range(0, nsrc, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        if FROM_BUF:
            inb = offs < nsrc
            packed = tl.load(src + offs, mask=inb, other=_EMPTY)
            skey = (packed >> 32).to(tl.int32)
            valid = inb
        else:
            skey, valid = _row_keys(s_row, m_row, offs, K, HAS_MASK)
            packed = _pack(skey, offs)
        q = skey >> shift
        upper = (level == 0) | ((q >> 8) == (prefix >> 8))
        tie = valid & (q == prefix)
        tie_i = tie.to(tl.int32)
        tie_rank = ntie + tl.cumsum(tie_i, 0) - 1
        ntie += tl.sum(tie_i, 0)
        take = (valid & upper & (q > prefix)) | (tie & (tie_rank < need))
        take_i = take.to(tl.int32)
        tl.store(sel + nsel + tl.cumsum(take_i, 0) - 1, packed, mask=take)
        nsel += tl.sum(take_i, 0)
    return nsel


@triton.jit
def _topk_radix_kernel(
    s_ptr, m_ptr, v_ptr, p_ptr, buf_ptr,
    K, k,
    stride_sb, stride_mb, stride_vb, stride_pb,
    HAS_MASK: tl.constexpr, SORT: tl.constexpr,
    BLOCK: tl.constexpr, CAP: tl.constexpr, KP: tl.constexpr, FILL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + b * stride_sb
    m_row = m_ptr + b * stride_mb
    v_row = v_ptr + b * stride_vb
    p_row = p_ptr + b * stride_pb  # doubles as the winners' scratch: at most k packed keys
    buf = buf_ptr + b * (2 * CAP)

    # Pass 0: histogram of the top digit over the candidates.
    hist = tl.zeros([256], dtype=tl.int32)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        skey, valid = _row_keys(s_row, m_row, offs, K, HAS_MASK)
        hist += tl.histogram((skey >> 24) + 128, 256, mask=valid)
    want = tl.minimum(tl.sum(hist, 0), k)

    nsel = want * 0
    if want > 0:
        d, above, cnt = _pick_digit(hist, want)
        need = want - above  # winners still to take from the elements equal to the prefix (1 <= need <= cnt)
        prefix = d - 128  # top 8 bits of the threshold key, as a signed prefix (skey >> 24)
        level = 0
        nbuf = -1  # tie candidates in the scratch buffer (-1: not copied, read the row)
        while (level < 3) & (need < cnt):
            buffered = cnt <= CAP
            src = buf + (level % 2) * CAP
            dst = buf + ((level + 1) % 2) * CAP
            if nbuf >= 0:
                hist, nsel, ncopy = _radix_pass(s_row, m_row, src, dst, p_row, K, nbuf, level, prefix, nsel,
                                                buffered, HAS_MASK, True, BLOCK)
            else:
                hist, nsel, ncopy = _radix_pass(s_row, m_row, src, dst, p_row, K, K, level, prefix, nsel,
                                                buffered, HAS_MASK, False, BLOCK)
            nbuf = tl.where(buffered, ncopy, -1)
            d, above, cnt = _pick_digit(hist, need)
            need -= above
            prefix = (prefix << 8) | d
            level += 1
        src = buf + (level % 2) * CAP
        if nbuf >= 0:
            nsel = _final_pass(s_row, m_row, src, p_row, K, nbuf, level, prefix, need, nsel,
                               HAS_MASK, True, BLOCK)
        else:
            nsel = _final_pass(s_row, m_row, src, p_row, K, K, level, prefix, need, nsel,
                               HAS_MASK, False, BLOCK)

    if SORT:
        # Make the winners written by every thread visible to every thread, then sort them in registers.
        tl.debug_barrier()
        cols = tl.arange(0, KP)
        packed = tl.load(p_row + cols, mask=cols < nsel, other=_EMPTY)
        # Every (possibly replicated) load must be done before p_row is overwritten with positions.
        tl.debug_barrier()
        top = tl.sort(packed, descending=True)
        _unpack_store(top, cols, s_row, v_row, p_row, k)
        _fill_empty(v_row, p_row, KP, k, FILL)
    else:
        # Leave packed keys in p_row[:k] (empty slots INT64_MIN) for a torch.sort by the launcher.
        for c0 in range(nsel, k, FILL):
            cols = c0 + tl.arange(0, FILL)
            tl.store(p_row + cols, tl.full([FILL], _EMPTY, tl.int64), mask=cols < k)


# ---------------------------------------------------------------------------------------------------------
# Packing / unpacking (for torch.topk / torch.sort on packed keys)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _pack_kernel(
    s_ptr, m_ptr, out_ptr, K,
    stride_sb, stride_mb, stride_ob,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    skey, valid = _row_keys(s_ptr + b * stride_sb, m_ptr + b * stride_mb, offs, K, HAS_MASK)
    tl.store(out_ptr + b * stride_ob + offs, _pack(tl.where(valid, skey, _MASK_KEY), offs), mask=offs < K)


@triton.jit
def _unpack_kernel(
    top_ptr, s_ptr, v_ptr, p_ptr, n, k,
    stride_tb, stride_sb, stride_vb, stride_pb,
    BLOCK: tl.constexpr,
):
    """Columns < n come from the sorted packed keys top[:, :n]; columns in [n, k) are empty."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    packed = tl.load(top_ptr + b * stride_tb + cols, mask=cols < n, other=_EMPTY)
    _unpack_store(packed, cols, s_ptr + b * stride_sb, v_ptr + b * stride_vb, p_ptr + b * stride_pb, k)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


def _prepare(scores: torch.Tensor, mask: Optional[torch.Tensor]):
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [B, K], got shape {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if scores.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        scores = scores.float()  # as the reference: rank the fp32 values
    if scores.shape[1] > 1 and scores.stride(1) != 1:
        scores = scores.contiguous()
    if scores.shape[1] >= 2**31:
        raise ValueError(f"scores rows must be shorter than 2^31, got K = {scores.shape[1]}")
    if mask is not None:
        if mask.shape != scores.shape:
            mask = mask.expand(scores.shape)  # raises for a shape that does not broadcast
        if mask.dtype != torch.bool:
            mask = mask != 0
        if mask.shape[1] > 1 and mask.stride(1) != 1:
            mask = mask.contiguous()
        mask = mask.view(torch.uint8)
    return scores, mask


def pack_keys(scores: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Packed int64 ranking keys [B, K] (larger = better; non-candidates below every candidate)."""
    return _pack_prepared(*_prepare(scores, mask))


def _pack_prepared(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    B, K = scores.shape
    out = torch.empty(B, K, dtype=torch.int64, device=scores.device)
    if B == 0 or K == 0:
        return out
    block = max(16, min(1024, triton.next_power_of_2(K)))
    _pack_kernel[(B, triton.cdiv(K, block))](
        scores, mask if mask is not None else scores, out, K,
        scores.stride(0), mask.stride(0) if mask is not None else 0, out.stride(0),
        HAS_MASK=mask is not None, BLOCK=block, num_warps=4,
    )
    return out


def _unpack(top: torch.Tensor, scores: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
    B, k = values.shape
    n = top.shape[1]
    block = max(16, min(1024, triton.next_power_of_2(k)))
    _unpack_kernel[(B, triton.cdiv(k, block))](
        top, scores, values, positions, n, k,
        top.stride(0), scores.stride(0), values.stride(0), positions.stride(0),
        BLOCK=block, num_warps=4,
    )


def topk(
    scores: torch.Tensor, k: int, mask: Optional[torch.Tensor] = None, method: str = "auto"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k values (fp32) and positions (int64) per row of scores [B, K], exactly as `reference.topk`.

    Candidates are the positions where mask is True (every position without a mask), ranked by score
    descending, NaN below -inf, ties to the lower position; slots past the number of candidates hold position
    -1 and value -inf; k may exceed K. method: "auto", "sort", "radix" or "torch" (see the module docstring).
    No host-device sync.
    """
    if method not in ("auto", "sort", "radix", "torch"):
        raise ValueError(f"method must be 'auto', 'sort', 'radix' or 'torch', got {method!r}")
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    scores, mask = _prepare(scores, mask)
    B, K = scores.shape
    dev = scores.device
    values = torch.empty(B, k, dtype=torch.float32, device=dev)
    positions = torch.empty(B, k, dtype=torch.int64, device=dev)
    if B == 0 or k == 0:
        return values, positions
    if K == 0:
        return values.fill_(float("-inf")), positions.fill_(-1)
    kk = min(k, K)
    kpad = triton.next_power_of_2(K)
    if method == "auto":
        method = "sort" if kpad <= _SORT_MAX else "radix"
    m_arg = mask if mask is not None else scores
    stride_mb = mask.stride(0) if mask is not None else 0
    fill = max(16, min(1024, triton.next_power_of_2(k)))

    if method == "sort":
        if kpad > 4 * _SORT_MAX:
            raise ValueError(f"method='sort' holds a whole row in registers: K = {K} is too long, use 'radix'")
        kp = min(max(2, triton.next_power_of_2(kk)), kpad)  # tl.topk needs k >= 2
        _topk_sort_kernel[(B,)](
            scores, m_arg, values, positions,
            K, k,
            scores.stride(0), stride_mb, values.stride(0), positions.stride(0),
            HAS_MASK=mask is not None, KPAD=kpad, KP=kp, FILL=fill,
            num_warps=_sort_warps(kpad),
        )
        return values, positions

    if method == "torch":
        packed = _pack_prepared(scores, mask)
        top = torch.topk(packed, kk, dim=1, largest=True, sorted=True).values
        _unpack(top, scores, values, positions)
        return values, positions

    # radix
    block = max(16, min(_RADIX_BLOCK, kpad))
    cap = max(16, min(_CAP, kpad))
    buf = torch.empty(B, 2 * cap, dtype=torch.int64, device=dev)
    kp = max(2, triton.next_power_of_2(kk))
    sort_in_kernel = kp <= _SELECT_SORT_MAX
    _topk_radix_kernel[(B,)](
        scores, m_arg, values, positions, buf,
        K, k,
        scores.stride(0), stride_mb, values.stride(0), positions.stride(0),
        HAS_MASK=mask is not None, SORT=sort_in_kernel,
        BLOCK=block, CAP=cap, KP=kp if sort_in_kernel else 16, FILL=fill,
        num_warps=8 if block >= 2048 else 4,
    )
    if not sort_in_kernel:
        top = torch.sort(positions[:, :kk], dim=1, descending=True).values
        _unpack(top, scores, values, positions)
    return values, positions


def _sort_warps(kpad: int) -> int:
    # About 8 packed keys per thread.
    return max(1, min(16, kpad // 256))
