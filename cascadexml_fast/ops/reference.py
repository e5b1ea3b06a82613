"""Plain-PyTorch definitions of every op: the specification kernels are tested against.

These are written for clarity, not speed (they materialise the [B, K, D] gather that the kernels avoid), and
follow DESIGN.md's rules of the house: pad id -1 scores -inf and gets no gradient, accumulation is fp32,
scores are fp32, ids are int64 where returned.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

PAD_ID = -1


def dequantize_table(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float table an int8 table stands for: ``q.float() * scale[:, None]`` (row-wise symmetric scales; fp32
    products, or `dtype` = float64 for gradcheck). Works on any slice of rows with the matching scales."""
    return weight.to(dtype) * scale.to(dtype).unsqueeze(-1)


def quantize_table(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric int8 quantisation: scale[r] = max_d |W[r, d]| / 127 (fp32), q = round(W / scale) (to
    nearest, ties to even) in [-127, 127]; an all-zero row gets scale 0 and q = 0. So |q * scale - W| <= scale / 2
    elementwise (up to fp32 rounding of the division). -128 is never used: the range stays symmetric."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127 if w.shape[1] > 0 else w.new_zeros(w.shape[0])
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    q = torch.round(w / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _float_rows(weight: torch.Tensor, idx: torch.Tensor, acc: torch.dtype,
                weight_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """weight[idx] (pads read row 0) in `acc`, dequantised when weight is an int8 table with per-row scales."""
    rows = _gather(weight, idx).to(acc)  # [B, K, D], gathered in storage dtype, then upcast
    if weight_scale is not None:
        rows = rows * _gather(weight_scale, idx).to(acc).unsqueeze(-1)
    return rows


def _acc(*dtypes) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def shortlist_score(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor,
    weight_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """s[b, k] = <x[b], W[idx[b, k]]> + bias[idx[b, k]] in fp32; -inf where idx is the pad id -1.

    Differentiable with ordinary autograd (gather + bmm), which is also the originals' path. float64 inputs
    are computed in float64 (for gradcheck); every other dtype is accumulated in fp32. An int8 `weight` comes with
    `weight_scale` [N] (fp32): its rows are dequantised, W[r] = weight[r].float() * weight_scale[r].
    """
    acc = _acc(x.dtype, weight.dtype)
    idx = idx.long()
    rows = _float_rows(weight, idx, acc, weight_scale)
    scores = torch.bmm(rows, x.to(acc).unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        scores = scores + _gather(bias, idx).to(acc)
    return scores.masked_fill(idx < 0, float("-inf"))


def _gather(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] with pads (-1) reading row 0, or zeros when the table is empty (then every id is a pad)."""
    if table.shape[0] == 0:
        return table.new_zeros(idx.shape + table.shape[1:])
    return table[idx.clamp(min=0)]


def shortlist_score_grad_input(grad: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor,
                               weight_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dx[b] = sum_k grad[b, k] * W[idx[b, k]] over non-pad k, fp32 [B, D] (int8 rows dequantised with
    weight_scale, as in shortlist_score)."""
    acc = _acc(grad.dtype, weight.dtype)
    idx = idx.long()
    g = grad.to(acc).masked_fill(idx < 0, 0.0)
    rows = _float_rows(weight, idx, acc, weight_scale)
    return torch.bmm(g.unsqueeze(1), rows).squeeze(1)


def _flat_pairs(grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor):
    """Non-pad entries as (row id, grad value, fp32 doc features), in row-major position order."""
    acc = torch.float64 if torch.float64 in (grad.dtype, x.dtype) else torch.float32
    idx = idx.long()
    B, K = idx.shape
    flat = idx.reshape(-1)
    keep = flat >= 0
    doc = torch.arange(B, device=idx.device).repeat_interleave(K)[keep]
    return flat[keep], grad.reshape(-1)[keep].to(acc), x[doc].to(acc)


def shortlist_score_grad_weight(
    grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, num_rows: int, dtype: Optional[torch.dtype] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense gradients: dW [num_rows, D] and dbias [num_rows], duplicates summed in fp32; dW is rounded to
    `dtype` (the table's dtype) if given."""
    rows, g, xs = _flat_pairs(grad, x, idx)
    dw = torch.zeros(num_rows, x.shape[1], dtype=xs.dtype, device=x.device)
    dw.index_add_(0, rows, g.unsqueeze(1) * xs)
    db = torch.zeros(num_rows, dtype=xs.dtype, device=x.device)
    db.index_add_(0, rows, g)
    return dw.to(dtype or dw.dtype), db


def shortlist_score_grad_weight_rows(
    grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, dtype: Optional[torch.dtype] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-sparse gradients: unique sorted row ids [U] (int64), their dW rows [U, D] (rounded to `dtype` if
    given) and dbias values [U]."""
    rows, g, xs = _flat_pairs(grad, x, idx)
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    dw = torch.zeros(unique.numel(), x.shape[1], dtype=xs.dtype, device=x.device)
    dw.index_add_(0, inverse, g.unsqueeze(1) * xs)
    db = torch.zeros(unique.numel(), dtype=xs.dtype, device=x.device)
    db.index_add_(0, inverse, g)
    return unique, dw.to(dtype or dw.dtype), db


def topk(scores: torch.Tensor, k: int, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k values (fp32) and positions (int64) per row of scores [B, K] under DESIGN.md's rules.

    Candidates are the positions where `mask` is True (all positions without a mask). They are ranked by score,
    descending, NaN below -inf, ties to the lower position. Slots beyond the number of candidates hold position
    -1 and value -inf. k may exceed K.
    """
    B, K = scores.shape
    values = scores.float()
    nan = torch.isnan(values)
    candidate = torch.ones_like(nan) if mask is None else mask.to(torch.bool)
    # Class 0: a real candidate; 1: a NaN candidate; 2: not a candidate. Sort by score (stable keeps position order
    # among equals), then by class (stable again), so the order is (class, -score, position).
    klass = torch.where(candidate, nan.long(), torch.full_like(nan, 2, dtype=torch.long))
    order = torch.sort(values.masked_fill(nan, float("-inf")), dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(klass.gather(1, order), dim=1, stable=True).indices)
    take = order[:, : min(k, K)]
    valid = klass.gather(1, take) < 2
    positions = take.masked_fill(~valid, -1)
    top = values.gather(1, take).masked_fill(~valid, float("-inf"))
    if k > K:
        positions = torch.cat([positions, positions.new_full((B, k - K), -1)], dim=1)
        top = torch.cat([top, top.new_full((B, k - K), float("-inf"))], dim=1)
    return top, positions


def block_ids(clusters: torch.Tensor, offsets: torch.Tensor, max_children: int) -> torch.Tensor:
    """Tree-order ids [B, C * max_children] of the children blocks [offsets[c], offsets[c+1]) of clusters [B, C];
    -1 for pad clusters and for the slots past a block's end."""
    clusters = clusters.long()
    if offsets.numel() < 2:  # a level without nodes: every cluster id is a pad
        return torch.full((clusters.shape[0], clusters.shape[1] * max_children), -1, device=clusters.device)
    valid_cluster = clusters >= 0
    safe = clusters.clamp(min=0)
    starts = offsets[safe]
    sizes = torch.where(valid_cluster, offsets[safe + 1] - starts, torch.zeros_like(starts))
    slot = torch.arange(max_children, device=clusters.device)
    ids = starts.unsqueeze(-1) + slot
    ids = ids.masked_fill(slot >= sizes.unsqueeze(-1), -1)
    return ids.reshape(clusters.shape[0], clusters.shape[1] * max_children)


def block_score(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    clusters: torch.Tensor,
    offsets: torch.Tensor,
    max_children: int,
    weight_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores (fp32) and tree-order ids (int64) of every child of each cluster in clusters [B, C] (pad -1):
    both [B, C * max_children]; padded slots hold -inf and -1. int8 tables come with weight_scale."""
    ids = block_ids(clusters, offsets, max_children)
    return shortlist_score(x, weight, bias, ids, weight_scale), ids


def cascade_search(
    features,
    weights,
    biases,
    offsets,
    beams,
    k: int,
    combine: str = "leaf",
    max_children=None,
    weight_scales=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Beam search down a label tree; returns tree-order ids of the last level [B, k] (int64) and scores (fp32).

    Level 0 scores all of its nodes; level i >= 1 scores the children (offsets[i-1]) of the beams[i-1] best nodes
    of level i-1, ranked by their raw scores (logits). The last level's candidates are ranked by
    `combine`: "leaf" = sigmoid(logit), "leaf_x_parent" = sigmoid(logit) * sigmoid(parent logit) (CascadeXML's
    "weighted" scheme, LightXML's sigma(label) * sigma(cluster)). Missing slots: id -1, score -inf.
    `max_children[i]` (defaults to the largest block of offsets[i]) is the padded width of a block.
    `weight_scales` (None, or one entry per level, None for a float table) holds the per-row fp32 scales of int8
    tables.
    """
    if max_children is None:
        max_children = [int((o[1:] - o[:-1]).max()) if o.numel() > 1 else 0 for o in offsets]
    return beam_search(
        features, weights, biases, offsets, beams, max_children, k, combine,
        score_fn=shortlist_score, block_score_fn=block_score, topk_fn=topk, weight_scales=weight_scales,
    )


def _with_scale(scale):
    """Keyword arguments passing an int8 table's scale to score_fn / block_score_fn (none for a float table, so
    score functions without a weight_scale argument still serve float tables)."""
    return {} if scale is None else {"weight_scale": scale}


def beam_search(features, weights, biases, offsets, beams, max_children, k, combine, *, score_fn, block_score_fn,
                topk_fn, trace=None, weight_scales=None):
    """The cascade's algorithm, written once over three ops (so that device backends can run it on their own
    kernels without a host sync): score_fn(x, W, b, ids), block_score_fn(x, W, b, clusters, offsets, width) and
    topk_fn(scores, k, mask). If `trace` is a list, (candidate ids, logits) of every level are appended to it.
    Levels with an int8 table (weight_scales[level] not None) call the score functions with
    `weight_scale=weight_scales[level]`."""
    if combine not in ("leaf", "leaf_x_parent"):
        raise ValueError(f"combine must be 'leaf' or 'leaf_x_parent', got {combine!r}")
    scales = list(weight_scales) if weight_scales is not None else [None] * len(weights)
    x0 = features[0]
    B = x0.shape[0]
    ids = torch.arange(weights[0].shape[0], device=x0.device).expand(B, -1)
    logits = score_fn(x0, weights[0], biases[0], ids, **_with_scale(scales[0]))
    if trace is not None:
        trace.append((ids, logits))
    parent = None
    for level in range(1, len(weights)):
        top, pos = topk_fn(logits, beams[level - 1], ids >= 0)
        nodes = ids_at(ids, pos)
        width = max_children[level - 1]
        logits, ids = block_score_fn(features[level], weights[level], biases[level], nodes, offsets[level - 1], width,
                                     **_with_scale(scales[level]))
        if trace is not None:
            trace.append((ids, logits))
        parent = top.repeat_interleave(width, dim=1)
    scores = torch.sigmoid(logits)
    if combine == "leaf_x_parent" and parent is not None:
        scores = scores * torch.sigmoid(parent)
    top, pos = topk_fn(scores, k, ids >= 0)
    return ids_at(ids, pos), top


def ids_at(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """ids[b, pos[b, j]], and -1 where pos is -1 (also when there are no candidates at all)."""
    if ids.shape[1] == 0:
        return torch.full_like(pos, -1)
    return ids.gather(1, pos.clamp(min=0)).masked_fill(pos < 0, -1)


def adamw_update(p, m, v, g, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float):
    """One torch.optim.AdamW step (decoupled weight decay, bias correction at `step`, 1-based) on fp32 tensors;
    returns the new (p, m, v)."""
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    return p - (lr / (1 - beta1**step)) * m / denom, m, v


def sparse_adamw_step(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    last_step: Optional[torch.Tensor] = None,
    lr_history: Optional[torch.Tensor] = None,
) -> None:
    """AdamW on the rows of `param` listed in `rows` (unique), in place; `grad` [U, D] holds their gradients.

    Lazy (last_step is None): only the listed rows decay and move, with the bias correction of the global `step`
    (SparseAdam's semantics plus decoupled weight decay). Exact (last_step given, int64 [N]: the step at which
    each row was last updated, 0 = never): a row first catches up on the steps it missed, each an AdamW step with
    a zero gradient at that step's learning rate (lr_history[j - 1] for step j, float64 [>= step]), so its state
    equals what dense AdamW over the whole table would hold; then `last_step[rows] = step`. Math in fp32, state
    stored in the dtype of its tensor.
    """
    rows = rows.long()
    p, m, v = param[rows].float(), exp_avg[rows].float(), exp_avg_sq[rows].float()
    hyper = (beta1, beta2, eps, weight_decay)
    if last_step is not None:
        zero = p.new_zeros(p.shape[1:])
        for i, row in enumerate(rows.tolist()):
            for j in range(int(last_step[row]) + 1, step):
                p[i], m[i], v[i] = adamw_update(p[i], m[i], v[i], zero, j, float(lr_history[j - 1]), *hyper)
        last_step[rows] = step
    p, m, v = adamw_update(p, m, v, grad.float(), step, lr, *hyper)
    param[rows] = p.to(param.dtype)
    exp_avg[rows] = m.to(exp_avg.dtype)
    exp_avg_sq[rows] = v.to(exp_avg_sq.dtype)


def membership(idx: torch.Tensor, pos_offsets: torch.Tensor, pos_ids: torch.Tensor, num_ids: int) -> torch.Tensor:
    """y[b, k] = idx[b, k] is one of row b's positives pos_ids[pos_offsets[b] : pos_offsets[b + 1]] (CSR);
    False at pads. All ids lie in [-1, num_ids). No host sync."""
    B, K = idx.shape
    idx = idx.long()
    counts = (pos_offsets[1:] - pos_offsets[:-1]).long()
    owner = torch.repeat_interleave(torch.arange(B, device=idx.device), counts, output_size=pos_ids.shape[0])
    # One sorted key per (row, id): row * span + id + 1, unique per row as ids lie in [-1, num_ids).
    span = num_ids + 2
    keys = torch.sort(owner * span + pos_ids.long() + 1).values
    query = torch.arange(B, device=idx.device).unsqueeze(1) * span + idx + 1
    if keys.numel() == 0:
        return torch.zeros_like(idx, dtype=torch.bool)
    where = torch.searchsorted(keys, query.reshape(-1)).clamp(max=keys.numel() - 1)
    found = (keys[where] == query.reshape(-1)).reshape(B, K)
    return found & (idx >= 0)


def shortlist_bce(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    idx: torch.Tensor,
    pos_offsets: torch.Tensor,
    pos_ids: torch.Tensor,
    level_weight: float = 1.0,
    *,
    score_fn=None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BCE-with-logits over a shortlist: (loss, d loss / d logits [B, K], logits [B, K]).

    loss = level_weight * mean over the non-pad entries of BCEWithLogits(s[b, k], y[b, k]), y = membership of
    idx[b, k] in row b's positives (CSR pos_offsets / pos_ids, same id space as idx). Pads give logit -inf and no
    loss or gradient; with no valid entry the loss is 0. `score_fn` (default: this module's shortlist_score)
    computes the logits; the rest has no host sync.
    """
    logits = (score_fn or shortlist_score)(x, weight, bias, idx)
    valid = idx >= 0
    y = membership(idx, pos_offsets, pos_ids, weight.shape[0]).to(logits.dtype)
    safe = logits.masked_fill(~valid, 0.0)
    scale = level_weight / valid.sum().clamp(min=1).to(logits.dtype)
    per_entry = torch.nn.functional.binary_cross_entropy_with_logits(safe, y, reduction="none")
    loss = (per_entry * valid).sum() * scale
    grad = ((torch.sigmoid(safe) - y) * valid) * scale
    return loss, grad, logits


# ---------------------------------------------------------------------------------------------------------
# Low-precision tables: stochastic rounding, row-wise AdaGrad
# ---------------------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def fmix32(h):
    """MurmurHash3's 32-bit finaliser on uint32 values held in a Python int or an int64 tensor (products wrap in
    int64 but their low 32 bits are exact). The C++ (csrc/cpu/optim.cpp) and Triton kernels use the same mix on
    uint32."""
    h = h & _M32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def sr_key(seed: int, step: int) -> int:
    """The per-call key of the stochastic-rounding hash: fmix32(seed32 ^ fmix32(step32 + 0x9E3779B9)), where
    seed32 = low 32 bits of seed ^ (seed >> 32) and step32 = low 32 bits of step."""
    seed32 = (int(seed) ^ (int(seed) >> 32)) & _M32
    return fmix32(seed32 ^ fmix32((int(step) + 0x9E3779B9) & _M32))


def sr_random(key: int, rows: torch.Tensor, D: int) -> torch.Tensor:
    """32 random bits per element (int64 [U, D], values in [0, 2^32)): fmix32(fmix32(row32 ^ key) ^ col)."""
    row_key = fmix32((rows.long() & _M32) ^ key)
    cols = torch.arange(D, device=rows.device, dtype=torch.int64)
    return fmix32(row_key.unsqueeze(1) ^ cols)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, random: torch.Tensor) -> torch.Tensor:
    """Round fp32 `x` to bf16 / fp16 stochastically (up with probability equal to the fraction of an ulp), using
    the 32-bit `random` of each element (sr_random). Bit trick on the fp32 pattern: add the low `drop` random bits,
    clear the low `drop` bits, then convert (exact). drop = 16 for bf16; for fp16 drop = 13 + (113 - biased
    exponent) inside fp16's subnormal range, capped at 23 (below 2^-24 the final conversion rounds to nearest).
    Non-finite values and fp32 tables pass through (round to nearest)."""
    if dtype == torch.float32:
        return x.to(dtype)
    bits = x.view(torch.int32).to(torch.int64) & _M32
    if dtype == torch.bfloat16:
        drop = torch.full_like(bits, 16)
    elif dtype == torch.float16:
        exponent = (bits >> 23) & 0xFF
        drop = (13 + (113 - exponent).clamp(min=0)).clamp(max=23)
    else:
        raise TypeError(f"stochastic rounding targets bfloat16 or float16, got {dtype}")
    mask = (torch.ones_like(bits) << drop) - 1
    rounded = ((bits + (random & mask)) & ~mask) & _M32
    as_f32 = (rounded - ((rounded >> 31) << 32)).to(torch.int32).view(torch.float32)  # uint32 -> int32 bits
    return torch.where(torch.isfinite(x), as_f32, x).to(dtype)


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt (torch's vectorised CPU sqrt can be an ulp off; sqrt in float64 rounded
    once to fp32 is exact), as C++ std::sqrt and Triton sqrt_rn."""
    return x.double().sqrt().float()


def _store_rows(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, stochastic_rounding: bool,
                key: int) -> None:
    if stochastic_rounding and table.dtype in (torch.bfloat16, torch.float16):
        table[rows] = stochastic_round(values, table.dtype, sr_random(key, rows, values.shape[1]))
    else:
        table[rows] = values.to(table.dtype)


def sparse_adamw_step_sr(param, exp_avg, exp_avg_sq, rows, grad, step, lr, beta1, beta2, eps, weight_decay,
                         last_step=None, lr_history=None, stochastic_rounding=False, seed=0) -> None:
    """`sparse_adamw_step` with the schema's stochastic-rounding arguments. Without stochastic rounding (or with
    an fp32 table) it is `sparse_adamw_step`. With it, a lazy step is computed in fp32 in the kernels' operation
    order (fp32 constants formed as the C++ kernel forms them, no fused multiply-adds), so that the fp32 values,
    and hence the stochastically rounded bf16 / fp16 values, are bit-identical to the C++ and Triton kernels'.
    An exact-mode step catches up as `sparse_adamw_step` does, then rounds stochastically."""
    if not stochastic_rounding or param.dtype not in (torch.bfloat16, torch.float16):
        return sparse_adamw_step(param, exp_avg, exp_avg_sq, rows, grad, step, lr, beta1, beta2, eps, weight_decay,
                                 last_step, lr_history)
    rows = rows.long()
    key = sr_key(seed, step)
    if last_step is not None:
        shadow = param[rows].float()
        table = torch.zeros(rows.shape[0], param.shape[1], dtype=torch.float32, device=param.device)
        table.copy_(shadow)
        local = torch.arange(rows.shape[0], device=rows.device)
        m, v = exp_avg[rows].clone(), exp_avg_sq[rows].clone()
        ls = last_step[rows].clone()
        sparse_adamw_step(table, m, v, local, grad, step, lr, beta1, beta2, eps, weight_decay, ls, lr_history)
        last_step[rows] = step
        exp_avg[rows], exp_avg_sq[rows] = m, v
        _store_rows(param, rows, table, True, key)
        return
    f32 = lambda value: torch.tensor(value, dtype=torch.float64).float().item()  # noqa: E731
    b1, b2 = f32(beta1), f32(beta2)
    one_minus_b1 = torch.tensor(1.0, dtype=torch.float32) - torch.tensor(b1, dtype=torch.float32)
    one_minus_b2 = torch.tensor(1.0, dtype=torch.float32) - torch.tensor(b2, dtype=torch.float32)
    decay = torch.tensor(f32(1.0 - lr * weight_decay))
    step_size = torch.tensor(f32(lr / (1.0 - math.pow(beta1, step))))
    inv_sqrt_bc2 = torch.tensor(f32(1.0 / math.sqrt(1.0 - math.pow(beta2, step))))
    p, m, v, g = param[rows].float(), exp_avg[rows].float(), exp_avg_sq[rows].float(), grad.float()
    p = p * decay
    m = torch.tensor(b1) * m + one_minus_b1 * g
    v = torch.tensor(b2) * v + one_minus_b2 * g * g
    p = p - (step_size * m) / (_sqrt_rn(v) * inv_sqrt_bc2 + torch.tensor(f32(eps)))
    _store_rows(param, rows, p, True, key)
    exp_avg[rows] = m.to(exp_avg.dtype)
    exp_avg_sq[rows] = v.to(exp_avg_sq.dtype)


# ---------------------------------------------------------------------------------------------------------
# AdamW with 8-bit block-quantised state
# ---------------------------------------------------------------------------------------------------------

QBLOCK = 256  # elements of a row per quantisation block (the last block of a row may be shorter)


def _f32(value) -> torch.Tensor:
    """A Python float rounded once to an fp32 0-dim tensor (as C++ float(double))."""
    return torch.tensor(value, dtype=torch.float64).float()


def _expand_blocks(scales: torch.Tensor, D: int) -> torch.Tensor:
    """[U, ceil(D / QBLOCK)] per-block values -> [U, D] per-element values."""
    return scales.repeat_interleave(QBLOCK, dim=1)[:, :D]


def _block_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over each block of QBLOCK elements of each row: [U, D] -> [U, ceil(D / QBLOCK)] (exact)."""
    U, D = x.shape
    nb = -(-D // QBLOCK)
    padded = x.new_zeros(U, nb * QBLOCK)
    padded[:, :D] = x.abs()
    return padded.view(U, nb, QBLOCK).amax(-1) if nb > 0 else x.new_zeros(U, 0)


def dequantize_exp_avg(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Signed linear 8-bit code: m = (code - 128) * absmax / 127 (fp32, in that order; code 0 is unused)."""
    return (codes.float() - 128) * _expand_blocks(scales, codes.shape[1]) / 127


def dequantize_exp_avg_sq(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Unsigned 8-bit code with square-root companding: r = code / 255, v = r * r * absmax (fp32, in that order)."""
    r = codes.float() / 255
    return r * r * _expand_blocks(scales, codes.shape[1])


def quantize_exp_avg(m: torch.Tensor):
    """fp32 [U, D] -> (uint8 codes, fp32 block absmax): code = round_half_even((m / absmax) * 127) + 128; an
    all-zero block stores absmax 0 and codes 128."""
    absmax = _block_absmax(m)
    a = _expand_blocks(absmax, m.shape[1])
    t = torch.where(a > 0, m / a, torch.zeros_like(m)) * 127
    return (torch.round(t) + 128).to(torch.uint8), absmax


def quantize_exp_avg_sq(v: torch.Tensor):
    """fp32 [U, D] (>= 0) -> (uint8 codes, fp32 block max): code = round_half_even(sqrt_rn(v / absmax) * 255)."""
    absmax = _block_absmax(v)
    a = _expand_blocks(absmax, v.shape[1])
    t = _sqrt_rn(torch.where(a > 0, v / a, torch.zeros_like(v))) * 255
    return torch.round(t).to(torch.uint8), absmax


def sparse_adamw8bit_step(param, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, rows, grad,
                          step, lr, beta1, beta2, eps, weight_decay, stochastic_rounding=False, seed=0) -> None:
    """Lazy AdamW on the rows `rows` (unique) of `param` with 8-bit block-quantised moments, in place.

    State: exp_avg_codes / exp_avg_sq_codes uint8 [N, D]; exp_avg_scales / exp_avg_sq_scales fp32
    [N, ceil(D / 256)], the absmax of each block of 256 consecutive elements of a row. Per touched row: dequantise
    m (dequantize_exp_avg) and v (dequantize_exp_avg_sq) to fp32, apply one AdamW step in fp32 in the C++
    kernel's operation order (as sparse_adamw_step_sr's lazy path: fp32 constants, no fused multiply-adds,
    correctly rounded sqrt), store p (bf16 / fp16 tables optionally with stochastic rounding, as
    sparse_adamw_step), and requantise m and v with fresh block absmaxes (quantize_exp_avg, quantize_exp_avg_sq).
    Lazy semantics only: untouched rows neither move nor decay, and their state is not re-encoded."""
    rows = rows.long()
    b1, b2 = _f32(beta1), _f32(beta2)
    one_minus_b1 = torch.tensor(1.0, dtype=torch.float32) - b1
    one_minus_b2 = torch.tensor(1.0, dtype=torch.float32) - b2
    decay = _f32(1.0 - lr * weight_decay)
    step_size = _f32(lr / (1.0 - math.pow(beta1, step)))
    inv_sqrt_bc2 = _f32(1.0 / math.sqrt(1.0 - math.pow(beta2, step)))
    m = dequantize_exp_avg(exp_avg_codes[rows], exp_avg_scales[rows])
    v = dequantize_exp_avg_sq(exp_avg_sq_codes[rows], exp_avg_sq_scales[rows])
    p, g = param[rows].float(), grad.float()
    p = p * decay
    m = b1 * m + one_minus_b1 * g
    v = b2 * v + one_minus_b2 * g * g
    p = p - (step_size * m) / (_sqrt_rn(v) * inv_sqrt_bc2 + _f32(eps))
    _store_rows(param, rows, p, stochastic_rounding, sr_key(seed, step))
    exp_avg_codes[rows], exp_avg_scales[rows] = quantize_exp_avg(m)
    exp_avg_sq_codes[rows], exp_avg_sq_scales[rows] = quantize_exp_avg_sq(v)


def sparse_rowwise_adagrad_step(param, state_sum, rows, grad, lr, eps, weight_decay, step=0,
                                stochastic_rounding=False, seed=0) -> None:
    """Row-wise AdaGrad (FBGEMM's EXACT_ROWWISE_ADAGRAD) on the rows `rows` (unique) of `param`, in place; one
    fp32 accumulator per row in `state_sum` [N]. Per touched row r with gradient g_r [D]:

        G_r += mean_d(g_rd^2)                     (sum of squares in float64, divided by D, rounded to fp32)
        p_r  = p_r * (1 - lr * wd) - (lr / (sqrt(G_r) + eps)) * g_r      (decoupled decay; fp32)

    Untouched rows neither move nor decay. bf16 / fp16 tables round the fp32 result to nearest, or
    stochastically (stochastic_round with the hash of (seed, step, row, column)) when stochastic_rounding."""
    rows = rows.long()
    f32 = lambda value: torch.tensor(value, dtype=torch.float64).float()  # noqa: E731
    g = grad.float()
    mean_sq = ((g.double() * g.double()).sum(1) / g.shape[1]).float() if g.shape[1] > 0 else g.new_zeros(g.shape[0])
    G = state_sum[rows] + mean_sq
    state_sum[rows] = G
    scale = f32(lr) / (_sqrt_rn(G) + f32(eps))
    p = param[rows].float() * f32(1.0 - lr * weight_decay) - scale.unsqueeze(1) * g
    _store_rows(param, rows, p, stochastic_rounding, sr_key(seed, step))
