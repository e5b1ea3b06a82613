"""Triton kernels scoring whole contiguous children blocks of a label tree.

For clusters [B, C] (int32/int64, pad -1) and CSR offsets (int64, num_clusters + 1), the children of cluster c are
the rows [offsets[c], offsets[c+1]) of W. Slot j = c * M + t of document b (M = max_children) holds

    ids[b, j]    = offsets[cl] + t                            if cl = clusters[b, c] >= 0 and t < block size
    scores[b, j] = <x[b], W[ids[b, j]]> + bias[ids[b, j]]     (fp32)
    and -1 / -inf otherwise (pad cluster, or a slot past the end of a smaller block).

Launcher (plain function, tensors on the kernel's device: CUDA, or CPU under TRITON_INTERPRET=1):

    block_score(x, weight, bias, clusters, offsets, max_children, method="auto", weight_scale=None)
        -> scores [B, C*M] fp32, ids [B, C*M] int64

An int8 table comes with its per-row fp32 scales (weight_scale): both paths load the int8 rows (a quarter of fp32's
bytes), upcast them to fp32, and multiply each row's fp32 dot products by its scale once (HAS_SCALE).

Two paths, both without a host-device sync:

- "gemv": one program per (document, BLOCK_K slots), like `shortlist_score`'s forward kernel but with the ids
  computed in the kernel from clusters/offsets (no [B, K] index tensor). A program's slots cover whole runs of
  contiguous rows, so the W loads are coalesced row blocks. Every (document, cluster) pair reads its W block.
- "grouped": the (document, cluster) pairs are sorted by cluster on the device (`torch.sort` of the flat cluster
  ids, then a few elementwise/scan ops build the tile list); one program per (run of equal clusters, tile of
  BLOCK_B of its documents, BLOCK_M of its children) loads the cluster's W block once and multiplies it with the
  gathered documents' rows by `tl.dot`, writing each document's slots. bf16/fp16 tables with the same x dtype go
  to the tensor cores with fp32 accumulation (the LOWP constexpr, compiled only for a GPU); every other case
  (mixed dtypes, fp32, and always under the interpreter, whose bf16 dot is wrong) upcasts the tiles to fp32 and
  uses `input_precision="ieee"`. Pad pairs (cluster -1) form a run of their own whose programs only write -inf/-1.
  The tile list has a host-known upper bound (num_clusters + 1 + cdiv(B*C, BLOCK_B)), so the grid needs no sync;
  unused tile slots exit at once.

`method="auto"` takes "grouped" when documents share clusters enough to pay for the sort: B >= 16 and
B * C >= _GROUP_MIN_REUSE * num_clusters (the expected number of documents per touched cluster is at least
B * C / num_clusters, since at most num_clusters distinct clusters can occur), else "gemv". For the Amazon-670K
tree at B = 256 (beams 128 / 256 / 400 over 1024 / 8192 / 65536 clusters) this groups the two upper levels
(32 and 8 documents per cluster) and keeps the leaf level (1.6) on the GEMV path. The threshold is reasoned, not
yet tuned on a GPU.

Validation (cluster ids in range, offsets non-decreasing, blocks no larger than max_children) is the ops layer's
job: these launchers trust their inputs apart from cheap shape checks. A block larger than max_children is cut
to its first max_children rows (as `reference.block_ids` does).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .shortlist_score import _check_2d, _num_warps, _pow2, _scale_arg, _tile_shape, _unit_stride_rows, gathered_dots

__all__ = ["block_score", "grouped_tiles"]

# "auto": group documents by cluster when at least this many (document, cluster) pairs per cluster exist.
_GROUP_MIN_REUSE = 4
_GROUP_MIN_B = 16


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _block_gemv_kernel(
    x_ptr, w_ptr, bias_ptr, clusters_ptr, offsets_ptr, out_ptr, ids_ptr, scale_ptr,
    C, M, D,
    stride_xb, stride_wn, stride_cb, stride_ob, stride_ib,
    HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SCALE: tl.constexpr = False,
):
    # One program: document b, BLOCK_K consecutive slots of its C * M (clusters x children) slots.
    pid_b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < C * M
    c = offs_k // M
    t = offs_k - c * M
    cl = tl.load(clusters_ptr + pid_b * stride_cb + c, mask=k_mask, other=-1).to(tl.int64)
    has_cl = cl >= 0
    start = tl.load(offsets_ptr + cl, mask=has_cl, other=0)
    end = tl.load(offsets_ptr + cl + 1, mask=has_cl, other=0)
    ids = start + t
    valid = has_cl & (ids < end)
    ids = tl.where(valid, ids, -1)
    w_rows = w_ptr + tl.where(valid, ids, 0) * stride_wn  # int64 row offsets
    x_row = x_ptr + pid_b * stride_xb

    s = gathered_dots(x_row, w_rows, valid, D, EVEN_D, BLOCK_K, BLOCK_D)
    if HAS_SCALE:
        s = s * tl.load(scale_ptr + ids, mask=valid, other=0.0)
    if HAS_BIAS:
        s += tl.load(bias_ptr + ids, mask=valid, other=0.0).to(tl.float32)
    s = tl.where(valid, s, float("-inf"))
    tl.store(out_ptr + pid_b * stride_ob + offs_k, s, mask=k_mask)
    tl.store(ids_ptr + pid_b * stride_ib + offs_k, ids, mask=k_mask)


@triton.jit
def _block_grouped_kernel(
    x_ptr, w_ptr, bias_ptr, sorted_ptr, perm_ptr, tiles_ptr, offsets_ptr, out_ptr, ids_ptr, scale_ptr,
    P, C, M, D,
    stride_xb, stride_wn, stride_ob, stride_ib,
    HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SCALE: tl.constexpr = False,
):
    # One program: the tile starting at sorted pair tiles[t] (up to BLOCK_B pairs of one cluster run), and
    # children BLOCK_M * program_id(1) + [0, BLOCK_M) of that cluster. tiles[t] = -1: no such tile.
    first = tl.load(tiles_ptr + tl.program_id(0))
    if first >= 0:
        offs_e = first + tl.arange(0, BLOCK_B)
        cl = tl.load(sorted_ptr + first).to(tl.int64)
        e_cl = tl.load(sorted_ptr + offs_e, mask=offs_e < P, other=-2).to(tl.int64)
        in_run = (offs_e < P) & (e_cl == cl)  # the run of equal ids is contiguous in sorted order
        pair = tl.load(perm_ptr + offs_e, mask=in_run, other=0)  # flat pair index b * C + c (int64)
        doc = pair // C
        col = (pair - doc * C) * M  # first slot of this pair in the document's row
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        start = tl.load(offsets_ptr + tl.maximum(cl, 0))
        size = tl.load(offsets_ptr + tl.maximum(cl, 0) + 1) - start
        size = tl.where(cl >= 0, size, 0)
        row_ok = offs_m < size
        rows = start + offs_m  # int64
        acc = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
        if tl.program_id(1) * BLOCK_M < size:
            x_rows = x_ptr + doc * stride_xb
            w_rows = w_ptr + tl.where(row_ok, rows, 0) * stride_wn
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                if EVEN_D:
                    xt = tl.load(x_rows[:, None] + offs_d[None, :], mask=in_run[:, None], other=0.0)
                    wt = tl.load(w_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
                else:
                    d_mask = offs_d < D
                    xt = tl.load(x_rows[:, None] + offs_d[None, :], mask=in_run[:, None] & d_mask[None, :],
                                 other=0.0)
                    wt = tl.load(w_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_mask[None, :],
                                 other=0.0)
                if LOWP:
                    # bf16/fp16 tensor cores, fp32 accumulation (same dtype for both operands).
                    acc = tl.dot(xt, tl.trans(wt), acc)
                else:
                    acc = tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), acc, input_precision="ieee")
        s = acc
        if HAS_SCALE:
            s = s * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[None, :]
        if HAS_BIAS:
            s += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        s = tl.where(row_ok[None, :], s, float("-inf"))
        ids = tl.where(row_ok, rows, -1)
        slot = col[:, None] + offs_m[None, :]
        keep = in_run[:, None] & (offs_m < M)[None, :]
        tl.store(out_ptr + doc[:, None] * stride_ob + slot, s, mask=keep)
        tl.store(ids_ptr + doc[:, None] * stride_ib + slot, tl.broadcast_to(ids[None, :], [BLOCK_B, BLOCK_M]),
                 mask=keep)


# ---------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------


def grouped_tiles(clusters: torch.Tensor, num_clusters: int, block_b: int):
    """(sorted flat cluster ids, pair order, tile starts) for the grouped kernel; no host sync.

    A tile starts at sorted index i if i begins a run of equal ids or lies a multiple of block_b into its run;
    tile starts are compacted to the front of a buffer whose length is a host-known upper bound on the number
    of tiles (runs <= num_clusters + 1 with the pad run, plus at most cdiv(P, block_b) extra tiles); unused
    entries hold -1.
    """
    flat = clusters.reshape(-1)
    if num_clusters < 2**31 - 1 and flat.dtype != torch.int32:
        flat = flat.to(torch.int32)  # a cheaper sort key
    P = flat.numel()
    sorted_ids, perm = torch.sort(flat)
    pos = torch.arange(P, device=flat.device)
    run_start = torch.searchsorted(sorted_ids, sorted_ids)  # first index of each entry's run
    lead = (pos - run_start) % block_b == 0
    num_tiles = min(P, num_clusters + 1 + triton.cdiv(P, block_b))
    tile = torch.cumsum(lead, 0) - 1
    # Non-leaders (and, for out-of-range ids only, tiles past the bound) go to a dummy slot at the end.
    slot = torch.where(lead & (tile < num_tiles), tile, torch.full_like(tile, num_tiles))
    tiles = torch.full((num_tiles + 1,), -1, dtype=torch.int64, device=flat.device)
    tiles.scatter_(0, slot, pos)
    return sorted_ids, perm, tiles[:num_tiles]


def _use_grouped(B: int, C: int, num_clusters: int) -> bool:
    return B >= _GROUP_MIN_B and B * C >= _GROUP_MIN_REUSE * max(num_clusters, 1)


def _grouped_blocks(B: int, C: int, num_clusters: int, M: int, D: int) -> Tuple[int, int, int]:
    reuse = B * C / max(1, min(num_clusters, B * C))  # documents per touched cluster, at least
    block_b = 16 if reuse < 24 else (32 if reuse < 48 else 64)
    block_m = _pow2(M, 16, 64)
    block_d = _pow2(D, 16, 64)
    return block_b, block_m, block_d


# ---------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------


def block_score(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    clusters: torch.Tensor,
    offsets: torch.Tensor,
    max_children: int,
    method: str = "auto",
    weight_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores (fp32) and tree-order ids (int64) of the children of clusters [B, C] (pad -1), each [B, C * M]
    with M = max_children; padded slots hold -inf and -1. method: "auto", "gemv" or "grouped". An int8 weight
    comes with weight_scale [N] (fp32 per-row scales)."""
    if method not in ("auto", "gemv", "grouped"):
        raise ValueError(f"method must be 'auto', 'gemv' or 'grouped', got {method!r}")
    _check_2d("x", x)
    _check_2d("weight", weight)
    _check_2d("clusters", clusters)
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be 1-D with num_clusters + 1 >= 1 entries, got shape {tuple(offsets.shape)}")
    B, D = x.shape
    C = clusters.shape[1]
    M = int(max_children)
    if M < 0:
        raise ValueError(f"max_children must be >= 0, got {M}")
    if clusters.shape[0] != B or weight.shape[1] != D:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, clusters {tuple(clusters.shape)}"
        )
    dev = x.device
    scale = _scale_arg(weight, weight_scale)
    scale_arg = scale if scale is not None else x
    scores = torch.empty(B, C * M, dtype=torch.float32, device=dev)
    ids = torch.empty(B, C * M, dtype=torch.int64, device=dev)
    if B == 0 or C * M == 0:
        return scores, ids
    num_clusters = offsets.numel() - 1
    x = _unit_stride_rows(x)
    weight = _unit_stride_rows(weight)
    clusters = clusters.contiguous()
    offsets = offsets.contiguous().to(torch.int64)
    if bias is not None:
        bias = bias.contiguous()
    bias_arg = bias if bias is not None else x
    if method == "auto":
        method = "grouped" if _use_grouped(B, C, num_clusters) else "gemv"

    if method == "gemv":
        block_k, block_d = _tile_shape(C * M, max(D, 1), weight.element_size(), B)
        grid = (B, triton.cdiv(C * M, block_k))
        _block_gemv_kernel[grid](
            x, weight, bias_arg, clusters, offsets, scores, ids, scale_arg,
            C, M, D,
            x.stride(0), weight.stride(0), clusters.stride(0), scores.stride(0), ids.stride(0),
            HAS_BIAS=bias is not None, EVEN_D=D % block_d == 0,
            BLOCK_K=block_k, BLOCK_D=block_d, HAS_SCALE=scale is not None,
            num_warps=_num_warps(block_k * block_d),
        )
        return scores, ids

    block_b, block_m, block_d = _grouped_blocks(B, C, num_clusters, M, D)
    sorted_ids, perm, tiles = grouped_tiles(clusters, num_clusters, block_b)
    # The interpreter's bf16 dot is wrong (and fp16 is upcast too, by the house rule): LOWP is compiled code only.
    lowp = (dev.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16))
    grid = (tiles.numel(), triton.cdiv(M, block_m))
    _block_grouped_kernel[grid](
        x, weight, bias_arg, sorted_ids, perm, tiles, offsets, scores, ids, scale_arg,
        B * C, C, M, D,
        x.stride(0), weight.stride(0), scores.stride(0), ids.stride(0),
        HAS_BIAS=bias is not None, EVEN_D=D % block_d == 0, LOWP=lowp,
        BLOCK_B=block_b, BLOCK_M=block_m, BLOCK_D=block_d, HAS_SCALE=scale is not None,
        num_warps=4,
    )
    return scores, ids
