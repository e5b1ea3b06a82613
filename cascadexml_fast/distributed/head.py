"""`ShardedCascadeHead`: a CascadeHead whose per-level tables are split by contiguous node ranges over the ranks
of a process group.

Layout. Level l's table (and bias) is cut into one contiguous row range per rank, [b_l[r], b_l[r+1]); rank r holds
only those rows (`weights[l]` is its [b_l[r+1] - b_l[r], D] slice). The tree arrays (offsets, parents, the label
permutation) are small and replicated. Boundary rule (`shard_boundaries`): level 0 is split evenly,
b_0[r] = floor(r N_0 / R); a deeper level l starts from its even split t = floor(r N_l / R) and moves it to the
nearest start of a children block of level l-1, i.e. the nearest value of offsets[l-1] (ties to the lower one),
so that every shard of a deeper level is a run of whole children blocks (no block is split between ranks). On
the trees LabelTree.build makes (balanced, power-of-two level sizes) with R a power of two, the boundaries of
consecutive levels line up, and each rank holds whole subtrees: those of its part of the top level (tested). Shards may be empty (fewer nodes than ranks).

Positions and ties. Every rank knows the global shortlist of a level, ids [B, K] laid out as in the single-process
search (level 0: all nodes; level l: the children blocks of the previous level's beam, in beam order, each padded
to max_children), so a candidate's global position is its column in that layout. A rank scores the entries it
owns (the others are left out; levels >= 1 with the block_score op over its whole children blocks, as the
single-process search scores them), takes its own top-k over them with positions in that global layout, and the
ranks exchange these (score, position) pairs (`distributed_topk`: an all-gather, or an all-to-all to each
document's owner); the merge places the pairs back at their global positions and applies the same `topk` op
(ties to the lower position, NaN below -inf). The global top-k is contained in the
union of the ranks' local top-k, so every rank gets exactly the single-process beam, ties included. The last
level's sigmoid is taken with the backend's own kernel (on CPU through the cascade_search op, whose std::exp
sigmoid the single-process search uses), so final scores and ids match the single-process search bit for bit.

Training (`loss`): each rank passes its own documents' level features and positives; they are all-gathered (the
features with autograd: their gradient is reduce-scattered back), every rank builds the same global teacher-
forced shortlists (the forced top-k of each level is the distributed top-k above), and each rank computes the BCE
terms of the entries it owns, normalised by the global number of valid entries of the level. The sum of the
ranks' losses is the single-process loss of the global batch; the table gradients are row-sparse and stay on the
owning rank (no dense L x D gradient ever crosses the network); a SparseAdamW per rank updates its shard. The
gradient of anything replicated upstream (encoder, projections) must then be *summed* over ranks: DDP with
`comm.sum_gradients_hook`, or `comm.sync_dense_gradients`.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import List, Sequence, Tuple

import torch
from torch import nn

from ..layers import CascadeHead, head_geometry
from ..ops import reference
from ..ops.search import block_score_op, cascade_search_op, topk_op
from ..ops.shortlist_bce import shortlist_bce
from ..ops.shortlist_score import shortlist_score
from .comm import Comm

INIT_CHUNK_ROWS = 65536  # rows per random-number chunk of the world-size-independent initialisation


def shard_boundaries(level_sizes: Sequence[int], offsets: Sequence[torch.Tensor], world_size: int) -> List[List[int]]:
    """Per level, R + 1 row boundaries: rank r owns rows [b[r], b[r + 1]) of that level (rule in the module doc)."""
    R = int(world_size)
    if R < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    bounds = []
    for level, n in enumerate(level_sizes):
        n = int(n)
        even = [(r * n) // R for r in range(R + 1)]
        if level == 0 or R == 1:
            bounds.append(even)
            continue
        starts = torch.as_tensor(offsets[level - 1], dtype=torch.int64).cpu().clamp(0, n)
        b = [0]
        for t in even[1:-1]:
            i = int(torch.searchsorted(starts, torch.tensor(t)))
            below = int(starts[i - 1]) if i > 0 else None
            above = int(starts[i]) if i < starts.numel() else None
            if below is None:
                pick = above if above is not None else t
            elif above is None or t - below <= above - t:
                pick = below
            else:
                pick = above
            b.append(max(pick, b[-1]))
        b.append(n)
        bounds.append(b)
    return bounds


def _check_boundaries(bounds, level_sizes, world_size) -> List[List[int]]:
    bounds = [[int(v) for v in b] for b in bounds]
    if len(bounds) != len(level_sizes):
        raise ValueError(f"boundaries need one list per level ({len(level_sizes)}), got {len(bounds)}")
    for level, (b, n) in enumerate(zip(bounds, level_sizes)):
        if len(b) != world_size + 1 or b[0] != 0 or b[-1] != n or any(x > y for x, y in zip(b, b[1:])):
            raise ValueError(f"boundaries[{level}] must be {world_size + 1} non-decreasing values from 0 to {n}, "
                             f"got {b}")
    return bounds


def _chunk_seed(seed: int, level: int, chunk: int) -> int:
    mixed = int(seed) * 0x9E3779B97F4A7C15 + (level + 1) * 0xBF58476D1CE4E5B9 + (chunk + 1) * 0x94D049BB133111EB
    return mixed % (2**63 - 1)


def backend_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """sigmoid of a 1-D fp32 tensor exactly as the single-process cascade_search computes it on v's device: on CPU
    the search kernel's own 1 / (1 + exp(-v)) (through the cascade_search op on a one-node, one-column table:
    logit = v * 1 + 0 = v exactly), torch.sigmoid elsewhere (the CUDA search is the reference algorithm)."""
    if v.device.type != "cpu" or v.numel() == 0:
        return torch.sigmoid(v.float())
    x = v.float().reshape(-1, 1).contiguous()
    one = torch.ones(1, 1, dtype=torch.float32)
    _, scores = cascade_search_op([x], [one], [None], [], [], [], 1, "leaf")
    return scores[:, 0]


def _pack(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(fp32 values, int64 positions < 2^31) [B, k] -> int32 [B, k, 2]: the values' bits and the positions."""
    return torch.stack([values.float().contiguous().view(torch.int32), positions.to(torch.int32)], dim=-1)


def _unpack(packed: torch.Tensor):
    return packed[..., 0].contiguous().view(torch.float32), packed[..., 1].long()


def _merge(packed: torch.Tensor, K: int, k: int):
    """Top-k of candidate lists [n, m, 2] (packed (value, global position) pairs; position -1 = none): the pairs
    are put back at their positions in an [n, K] row (no position occurs twice) and the topk op ranks them."""
    values, positions = _unpack(packed)
    n = values.shape[0]
    valid = positions >= 0
    where = torch.where(valid, positions, torch.full_like(positions, K))
    row = values.new_full((n, K + 1), float("-inf"))
    row.scatter_(1, where, values)
    chosen = torch.zeros(n, K + 1, dtype=torch.bool, device=values.device)
    chosen.scatter_(1, where, valid)
    return topk_op(row[:, :K].contiguous(), k, chosen[:, :K].contiguous())


class ShardedCascadeHead(nn.Module):
    """A CascadeHead with every level's table sharded over the ranks of `group` (module doc).

    Args:
        tree, dim, beams, combine, bias, sparse_grad, dtype, device: as CascadeHead.
        group: the process group (default: the default group; none at all: a single process holding everything).
        boundaries: per level, the R + 1 row boundaries (default: `shard_boundaries`).
        topk_merge: how the per-level top-k lists are merged over ranks (`distributed_topk`).
        seed: initialisation. Tables are Xavier-uniform with the full table's bound, drawn in chunks of
            INIT_CHUNK_ROWS rows from generators seeded by (seed, level, chunk), so the full table is the same
            for any number of ranks; biases are zero. `from_full` copies an existing CascadeHead instead.

    Every call (search, loss, the gathers) is collective: all ranks of the group make it, in the same order.
    """

    def __init__(self, tree, dim, beams, *, group=None, combine: str = "leaf", bias: bool = True,
                 sparse_grad: bool = False, dtype=None, device=None, boundaries=None, seed: int = 0,
                 topk_merge: str = "auto", _initialize: bool = True):
        super().__init__()
        offsets, perm, sizes, dims, beams = head_geometry(tree, dim, beams, combine)
        if topk_merge not in ("auto", "all_gather", "all_to_all"):
            raise ValueError(f"topk_merge must be 'auto', 'all_gather' or 'all_to_all', got {topk_merge!r}")
        self.comm = Comm(group)
        R, rank = self.comm.world_size, self.comm.rank
        self.level_sizes = sizes
        self.dims = dims
        self.beams = beams
        self.combine = combine
        self.sparse_grad = sparse_grad
        self.seed = seed
        self.topk_merge = topk_merge
        self.max_children = [int((o[1:] - o[:-1]).max()) if o.numel() > 1 else 0 for o in offsets]
        self.boundaries = _check_boundaries(boundaries if boundaries is not None else
                                            shard_boundaries(sizes, offsets, R), sizes, R)
        # levels whose every children block lies inside one shard (always so with shard_boundaries' rule)
        self._whole_blocks = [False] + [set(b) <= set(o.tolist()) | {0, sizes[level + 1]}
                                        for level, (b, o) in enumerate(zip(self.boundaries[1:], offsets))]
        factory = {"device": device, "dtype": dtype}
        local = [b[rank + 1] - b[rank] for b in self.boundaries]
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(n, d, **factory)) for n, d in zip(local, dims)])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(n, **factory)) for n in local]) if bias else None
        for level, o in enumerate(offsets):
            self.register_buffer(f"offsets_{level}", o.to(device))
        self.register_buffer("perm", perm.to(device))
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel())
        self.register_buffer("inverse_perm", inverse.to(device))
        for level, o in enumerate(offsets):
            parent = torch.repeat_interleave(torch.arange(o.numel() - 1), o[1:] - o[:-1])
            self.register_buffer(f"parent_{level}", parent.to(device))
        if _initialize:
            self.reset_parameters()

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_full(cls, head: CascadeHead, group=None, boundaries=None,
                  topk_merge: str = "auto") -> "ShardedCascadeHead":
        """This rank's shard of a full CascadeHead (every rank passes the same head: e.g. built from the same seed,
        or loaded from the same file)."""
        if getattr(head, "quantized", False):
            raise ValueError("ShardedCascadeHead.from_full: the head holds int8 tables (cascadexml_fast.quantize); "
                             "shard the float head")
        tree = SimpleNamespace(offsets=[o.cpu() for o in head.offsets], perm=head.perm.cpu())
        w0 = head.weights[0]
        sharded = cls(tree, head.dims, head.beams, group=group, combine=head.combine, bias=head.biases is not None,
                      sparse_grad=head.sparse_grad, dtype=w0.dtype, device=w0.device, boundaries=boundaries,
                      topk_merge=topk_merge, _initialize=False)
        with torch.no_grad():
            for level in range(sharded.num_levels):
                lo, hi = sharded.local_range(level)
                sharded.weights[level].copy_(head.weights[level][lo:hi])
                if head.biases is not None:
                    sharded.biases[level].copy_(head.biases[level][lo:hi])
        return sharded

    def reset_parameters(self) -> None:
        """Xavier-uniform tables (bound of the full [N_l, D_l] table), zero biases; independent of the sharding."""
        with torch.no_grad():
            for level, w in enumerate(self.weights):
                n, d = self.level_sizes[level], self.dims[level]
                bound = math.sqrt(6.0 / (n + d)) if n + d > 0 else 0.0
                lo, hi = self.local_range(level)
                first, last = lo // INIT_CHUNK_ROWS, (hi - 1) // INIT_CHUNK_ROWS if hi > lo else -1
                for chunk in range(first, last + 1):
                    c0 = chunk * INIT_CHUNK_ROWS
                    rows = min(INIT_CHUNK_ROWS, n - c0)
                    g = torch.Generator().manual_seed(_chunk_seed(self.seed, level, chunk))
                    values = (torch.rand(rows, d, generator=g) * 2 - 1) * bound
                    a, b = max(lo, c0), min(hi, c0 + rows)
                    w[a - lo:b - lo].copy_(values[a - c0:b - c0])
            if self.biases is not None:
                for b in self.biases:
                    b.zero_()

    # ------------------------------------------------------------------------------------------ layout
    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def offsets(self):
        return [getattr(self, f"offsets_{level}") for level in range(self.num_levels - 1)]

    def local_range(self, level: int) -> Tuple[int, int]:
        """[start, end) of the rows of level `level` this rank holds."""
        b = self.boundaries[level]
        return b[self.rank], b[self.rank + 1]

    to_label_ids = CascadeHead.to_label_ids
    level_positives = CascadeHead.level_positives

    def _level_inputs(self, level_features) -> List[torch.Tensor]:
        if isinstance(level_features, torch.Tensor):
            return [level_features] * self.num_levels
        features = list(level_features)
        if len(features) != self.num_levels:
            raise ValueError(f"level_features needs one [B, D] tensor per level ({self.num_levels}), "
                             f"got {len(features)}")
        return features

    def _owned(self, ids: torch.Tensor, level: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mask of the entries of ids [B, K] this rank owns, their local row ids with -1 elsewhere)."""
        lo, hi = self.local_range(level)
        owned = (ids >= lo) & (ids < hi)
        return owned, torch.where(owned, ids - lo, torch.full_like(ids, -1))

    # ------------------------------------------------------------------------------------------ collectives
    def _gather_features(self, features: List[torch.Tensor], autograd: bool) -> Tuple[List[torch.Tensor], List[int]]:
        """All ranks' rows of every level's features (rank order) and the per-rank row counts."""
        comm = self.comm
        B = features[0].shape[0]
        sizes = comm.all_gather_sizes([B], self.perm.device)[:, 0].tolist() if comm.distributed else [B]
        gather = (lambda x: comm.gather_rows_autograd(x, sizes)) if autograd else \
            (lambda x: comm.all_gather_rows(x, sizes)[0])
        if all(f is features[0] for f in features):
            whole = gather(features[0])
            return [whole] * len(features), sizes
        same = all(f.dtype == features[0].dtype and f.device == features[0].device and f.shape[0] == B
                   for f in features)
        if not same:
            return [gather(f) for f in features], sizes
        widths = [f.shape[1] for f in features]
        whole = gather(torch.cat(features, dim=1))  # one collective for every level
        return list(torch.split(whole, widths, dim=1)), sizes

    def _gather_positives(self, positives, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The global batch's CSR positives from every rank's (offsets, ids)."""
        offsets, label_ids = (torch.as_tensor(t) for t in positives)
        offsets = offsets.to(device=device, dtype=torch.int64)
        label_ids = label_ids.to(device=device, dtype=torch.int64)
        comm = self.comm
        if not comm.distributed:
            return offsets, label_ids
        counts = offsets[1:] - offsets[:-1]
        sizes = comm.all_gather_sizes([counts.numel(), label_ids.numel()], device).tolist()
        most_b = max(s[0] for s in sizes)
        most_n = max(s[1] for s in sizes)
        packed = torch.zeros(1, most_b + most_n, dtype=torch.int64, device=device)
        packed[0, :counts.numel()] = counts
        packed[0, most_b:most_b + label_ids.numel()] = label_ids
        gathered = comm.all_gather_tensor(packed)
        all_counts = torch.cat([gathered[r, :b] for r, (b, _) in enumerate(sizes)])
        all_ids = torch.cat([gathered[r, most_b:most_b + n] for r, (_, n) in enumerate(sizes)])
        global_offsets = torch.zeros(all_counts.numel() + 1, dtype=torch.int64, device=device)
        torch.cumsum(all_counts, 0, out=global_offsets[1:])
        return global_offsets, all_ids

    def distributed_topk(self, scores: torch.Tensor, k: int, candidates: torch.Tensor):
        """The top-k (values fp32, positions int64 [B, k]) of scores [B, K] over the union of every rank's
        `candidates` (each rank passes the entries it owns; the sets are disjoint), identical on every rank and
        equal to `topk` over the union in one process (ties to the lower position, NaN below -inf).

        Each rank's own top-k travels as (fp32 score bits, int32 position) pairs, 8 bytes a candidate. Merge
        (`self.topk_merge`): "all_gather" (every rank receives all R lists of all B documents and merges them:
        (R - 1) B k pairs per rank) or "all_to_all" (documents are split into R contiguous chunks; rank c
        receives every rank's lists of chunk c, merges them, and the merged top-k are all-gathered: about
        2 (R - 1) / R B k pairs per rank, two collectives); "auto" = all_gather for R <= 2, else all_to_all."""
        values, positions = topk_op(scores, k, candidates)
        comm = self.comm
        B, K = scores.shape
        R = comm.world_size
        if not comm.distributed or B * k == 0:
            return values, positions
        packed = _pack(values, positions)  # [B, k, 2] int32
        mode = self.topk_merge if self.topk_merge != "auto" else ("all_gather" if R <= 2 else "all_to_all")
        if mode == "all_gather":
            gathered = comm.all_gather_tensor(packed.unsqueeze(0))  # [R, B, k, 2]
            return _merge(gathered.permute(1, 0, 2, 3).reshape(B, R * k, 2), K, k)
        chunks = [(r + 1) * B // R - r * B // R for r in range(R)]
        mine = chunks[comm.rank]
        received = comm.all_to_all_rows(packed, chunks, [mine] * R)  # [R * mine, k, 2]
        merged_values, merged_positions = _merge(
            received.reshape(R, mine, k, 2).permute(1, 0, 2, 3).reshape(mine, R * k, 2), K, k)
        merged, _ = comm.all_gather_rows(_pack(merged_values, merged_positions), chunks)
        return _unpack(merged)

    # ------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def search(self, level_features, k: int, *, beams=None, combine=None, batch: str = "replicated"):
        """Top-k labels: (original label ids [B, k] int64, scores [B, k] fp32), -1 / -inf where fewer than k labels
        were reached; identical on every rank and to CascadeHead.search of the full head.

        batch: "replicated" (every rank passes the same documents and gets all results) or "local" (each rank
        passes its own documents; results for those are returned, the search runs over all ranks' documents)."""
        if batch not in ("replicated", "local"):
            raise ValueError(f"batch must be 'replicated' or 'local', got {batch!r}")
        beams = self.beams if beams is None else [int(b) for b in beams]
        combine = self.combine if combine is None else combine
        if combine not in ("leaf", "leaf_x_parent"):
            raise ValueError(f"combine must be 'leaf' or 'leaf_x_parent', got {combine!r}")
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        with self.comm.guard("ShardedCascadeHead.search"):
            features = self._level_inputs(level_features)
            sizes = None
            if batch == "local":
                features, sizes = self._gather_features(features, autograd=False)
            tree_ids, scores = self._search(features, k, beams, combine)
            labels = self.to_label_ids(tree_ids)
            if sizes is not None:
                start = sum(sizes[:self.rank])
                labels, scores = labels[start:start + sizes[self.rank]], scores[start:start + sizes[self.rank]]
            return labels, scores

    def _score(self, level: int, x: torch.Tensor, ids: torch.Tensor):
        owned, local = self._owned(ids, level)
        bias = self.biases[level] if self.biases is not None else None
        return shortlist_score(x, self.weights[level], bias, local, validate=False), owned

    def _score_blocks(self, level: int, x: torch.Tensor, nodes: torch.Tensor, width: int):
        """Scores [B, C * width] of the children blocks of nodes [B, C] (level - 1) that this rank owns, with the
        block_score op as the single-process search does (-inf elsewhere), and the mask of those entries. Needs
        every block of the level inside one shard (`_whole_blocks`)."""
        lo, hi = self.local_range(level)
        offsets = self.offsets[level - 1]
        safe = nodes.clamp(min=0)
        mine = (nodes >= 0) & (offsets[safe] >= lo) & (offsets[safe + 1] <= hi)
        local_nodes = torch.where(mine, nodes, torch.full_like(nodes, -1))
        local_offsets = (offsets - lo).clamp(0, hi - lo)
        bias = self.biases[level] if self.biases is not None else None
        logits, local_ids = block_score_op(x, self.weights[level], bias, local_nodes, local_offsets, width)
        return logits, local_ids >= 0

    def _search(self, features, k, beams, combine):
        B = features[0].shape[0]
        device = self.perm.device
        ids = torch.arange(self.level_sizes[0], device=device).expand(B, -1)
        logits, owned = self._score(0, features[0], ids)
        parent = None
        for level in range(1, self.num_levels):
            top, pos = self.distributed_topk(logits, beams[level - 1], owned)
            nodes = reference.ids_at(ids, pos)
            width = self.max_children[level - 1]
            ids = reference.block_ids(nodes, self.offsets[level - 1], width)
            if self._whole_blocks[level]:  # the single-process search's own kernel (CUDA: block_score)
                logits, owned = self._score_blocks(level, features[level], nodes, width)
            else:
                logits, owned = self._score(level, features[level], ids)
            parent = top.repeat_interleave(width, dim=1)
        final = torch.full_like(logits, float("-inf"))
        mine = owned.nonzero(as_tuple=True)
        values = backend_sigmoid(logits[mine])
        if combine == "leaf_x_parent" and parent is not None:
            values = values * backend_sigmoid(parent[mine])
        final[mine] = values
        top, pos = self.distributed_topk(final, k, owned)
        return reference.ids_at(ids, pos), top

    # ------------------------------------------------------------------------------------------ training
    def _local_positives(self, pos_offsets, pos_ids, level: int):
        """The CSR positives of a level restricted to this rank's rows, in local row ids."""
        lo, hi = self.local_range(level)
        B = pos_offsets.numel() - 1
        keep = (pos_ids >= lo) & (pos_ids < hi)
        counts = pos_offsets[1:] - pos_offsets[:-1]
        owner = torch.repeat_interleave(torch.arange(B, device=pos_ids.device), counts, output_size=pos_ids.numel())
        kept = torch.zeros(B, dtype=torch.int64, device=pos_ids.device).index_add_(0, owner, keep.long())
        offsets = torch.zeros(B + 1, dtype=torch.int64, device=pos_ids.device)
        torch.cumsum(kept, 0, out=offsets[1:])
        return offsets, pos_ids[keep] - lo

    def loss(self, level_features, positives, *, level_weights=None, beams=None, batch: str = "local"):
        """This rank's part of CascadeHead.loss over the global batch (teacher-forced shortlists, summed per-level
        BCE); the sum over ranks is the full loss (`global_loss` gives it for logging).

        batch: "local" (default: each rank passes its own documents' [B_r, D] features and their CSR positives in
        original label ids; the global batch is all ranks' documents in rank order) or "replicated" (every rank
        passes the whole batch; no gathering, and the feature gradients are then partial sums per rank).
        Gradients: row-sparse (sparse_grad) or dense for this rank's shard only; to the features through the
        all-gather (reduce-scatter in backward)."""
        if batch not in ("replicated", "local"):
            raise ValueError(f"batch must be 'replicated' or 'local', got {batch!r}")
        beams = self.beams if beams is None else [int(b) for b in beams]
        level_weights = [1.0] * self.num_levels if level_weights is None else [float(w) for w in level_weights]
        with self.comm.guard("ShardedCascadeHead.loss"):
            features = self._level_inputs(level_features)
            device = self.perm.device
            if batch == "local":
                features, _ = self._gather_features(features, autograd=True)
                positives = self._gather_positives(positives, device)
            else:
                positives = tuple(torch.as_tensor(t).to(device=device, dtype=torch.int64) for t in positives)
            targets = self.level_positives(positives)
            B = features[0].shape[0]
            ids = torch.arange(self.level_sizes[0], device=device).expand(B, -1)
            total = features[0].new_zeros((), dtype=torch.float32)
            for level in range(self.num_levels):
                owned, local = self._owned(ids, level)
                n_all = int((ids >= 0).sum())
                n_mine = int(owned.sum())
                pos_offsets, pos_ids = targets[level]
                local_offsets, local_pos = self._local_positives(pos_offsets, pos_ids, level)
                # the kernel divides by this rank's count n_mine: level_weight / n_mine == w / n_all
                weight = level_weights[level] / max(n_all, 1) * n_mine
                bias = self.biases[level] if self.biases is not None else None
                part, logits = shortlist_bce(features[level], self.weights[level], bias, local, local_offsets,
                                             local_pos, level_weight=weight, sparse_grad=self.sparse_grad,
                                             validate=False)
                total = total + part
                if level + 1 < self.num_levels:
                    forced = torch.sigmoid(logits) + reference.membership(ids, pos_offsets, pos_ids,
                                                                          self.level_sizes[level])
                    _, pos = self.distributed_topk(forced, beams[level], owned)
                    nodes = reference.ids_at(ids, pos)
                    ids = reference.block_ids(nodes, self.offsets[level], self.max_children[level])
            return total

    def global_loss(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `partial` (detached): the loss of the global batch, on every rank."""
        total = partial.detach().clone().reshape(1).float()
        return self.comm.all_reduce_sum(total)[0]

    # ------------------------------------------------------------------------------------------ full tables
    def gather_rows(self, level: int, local: torch.Tensor) -> torch.Tensor:
        """The full [N_l, ...] tensor from every rank's row shard `local` of level `level` (on every rank)."""
        sizes = [b - a for a, b in zip(self.boundaries[level][:-1], self.boundaries[level][1:])]
        with self.comm.guard("ShardedCascadeHead.gather_rows"):
            return self.comm.all_gather_rows(local.detach().contiguous(), sizes)[0]

    def full_state(self):
        """(full weights, full biases or None) of every level, gathered on every rank."""
        weights = [self.gather_rows(level, w) for level, w in enumerate(self.weights)]
        biases = None if self.biases is None else [self.gather_rows(level, b) for level, b in enumerate(self.biases)]
        return weights, biases

    def to_full_head(self) -> CascadeHead:
        """A single-process CascadeHead holding the full tables (gathered; on every rank)."""
        weights, biases = self.full_state()
        tree = SimpleNamespace(offsets=[o.cpu() for o in self.offsets], perm=self.perm.cpu())
        w0 = self.weights[0]
        head = CascadeHead(tree, self.dims, self.beams, combine=self.combine, bias=self.biases is not None,
                           sparse_grad=self.sparse_grad, dtype=w0.dtype, device=w0.device)
        with torch.no_grad():
            for level in range(self.num_levels):
                head.weights[level].copy_(weights[level])
                if biases is not None:
                    head.biases[level].copy_(biases[level])
        return head

    def extra_repr(self) -> str:
        ranges = [self.local_range(level) for level in range(self.num_levels)]
        return (f"level_sizes={self.level_sizes}, dims={self.dims}, beams={self.beams}, combine={self.combine!r}, "
                f"rank={self.rank}/{self.world_size}, rows={ranges}, dtype={self.weights[0].dtype}")
