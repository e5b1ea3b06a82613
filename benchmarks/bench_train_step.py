"""Benchmark of one full CascadeHead training step (shortlist build with teacher forcing, forward, loss, backward,
optimizer step over all levels of a label tree) against the originals' PyTorch path, measured in the same run.

    python benchmarks/bench_train_step.py                 # GPU when present, else CPU (full run)
    python benchmarks/bench_train_step.py --quick         # fewer shapes / reps
    python benchmarks/bench_train_step.py --device cpu --trees 262k --batches 64 --methods ours-lazy,reference

Ours:      head = cascadexml_fast.CascadeHead(tree, D, beams, sparse_grad=True, dtype=...);
           loss = head.loss(level_features, positives); loss.backward();
           opt = cascadexml_fast.SparseAdamW(head.parameters(), lr=1e-3, mode=...); opt.step(); opt.zero_grad()
           methods ours-lazy, ours-exact (mode="exact"), ours-lazy-bf16state (state_dtype=torch.bfloat16),
           ours-lazy-8bitstate (state_dtype=torch.uint8: 8-bit block-quantised moments).
           On CUDA every step runs the Triton kernels: the fused shortlist_bce forward (scores + targets + loss +
           logit gradient), the row-sparse backward, and the SparseAdamW kernel of the method's state dtype.
Reference: per level, the same teacher-forced selection written in plain torch (sigmoid(logit) + dense [B, K]
           targets, torch.topk over the beam, children expanded through a padded [nodes, max_children] table);
           level 0 dense F.linear, deeper levels torch.bmm(W[ids], x.unsqueeze(-1)).squeeze(-1) + b[ids];
           BCE-with-logits (fp32) mean over the valid entries; backward with dense gradients; torch.optim.AdamW over
           every table and bias; zero_grad().
Trees are synthetic with evenly split children (offsets = floor(arange(n + 1) * m / n)). See benchmarks/README.md
("bench_train_step.py") for every column, the memory definitions and the fairness notes.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
try:  # imported as benchmarks.bench_train_step (tests), or run as a script from anywhere
    from benchmarks import harness
    from benchmarks.trees import TREES, Tree
except ImportError:  # appended, not prepended: an installed cascadexml_fast keeps precedence over the tree
    sys.path.append(str(REPO))
    from benchmarks import harness
    from benchmarks.trees import TREES, Tree

NAME = "train_step"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# method -> SparseAdamW options (None: the reference path)
METHODS: Dict[str, Optional[Dict[str, Any]]] = {
    "ours-lazy": dict(mode="lazy", state_dtype=torch.float32),
    "ours-exact": dict(mode="exact", state_dtype=torch.float32),
    "ours-lazy-bf16state": dict(mode="lazy", state_dtype=torch.bfloat16),
    "ours-lazy-8bitstate": dict(mode="lazy", state_dtype=torch.uint8),
    "reference": None,
}
LR = 1e-3

COLUMNS = ["method", "tree", "dtype", "B", "K", "rows", "ms", "p10_ms", "p90_ms", "n", "x_vs_ref", "extra_mb",
           "mem_vs_ref", "state_mb", "weights_mb", "total_mb", "loss", "loss_rel_diff", "sl_match", "agree", "note"]
HEADERS = {"p10_ms": "p10", "p90_ms": "p90", "x_vs_ref": "x ref", "extra_mb": "extra MB", "mem_vs_ref": "mem/ref",
           "state_mb": "opt state MB", "weights_mb": "weights MB", "total_mb": "total MB", "loss_rel_diff": "loss rel",
           "sl_match": "SL match"}


# ----------------------------------------------------------------------------------------------------------
# trees, inputs




@dataclass(frozen=True)
class Case:
    tree: str
    B: int
    dtype: str
    methods: Tuple[str, ...] = tuple(METHODS)


def plan(device: str, preset: str) -> List[Case]:
    """Shapes per device and preset (full / quick / tiny). D = 768 except tiny (64)."""
    if preset == "tiny":
        return [Case("tiny", 4, "fp32"), Case("tiny", 3, "bf16")]
    if device == "cuda":
        if preset == "quick":
            return [Case("670k", 64, "bf16"), Case("2.8m", 256, "fp32")]
        return [Case(t, B, dt) for t in ("670k", "2.8m") for dt in ("fp32", "bf16") for B in (64, 256)]
    if preset == "quick":
        return [Case("262k", 64, "fp32", ("ours-lazy", "reference"))]
    # B = 256 and the 2.81M tree are GPU shapes: on CPU the reference alone would need ~10-40 GB and minutes a step
    return [Case("262k", 64, "fp32"), Case("670k", 64, "fp32")]


def make_positives(B: int, L: int, seed: int, max_per_doc: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
    """CSR (offsets int64 [B + 1], label ids int64): 1..max_per_doc distinct random labels per document (mean 5.5,
    Amazon-670K has 5.45)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_per_doc + 1, (B,), generator=g)
    ids = [torch.randperm(L, generator=g)[:int(c)] if L <= 1 << 16 else
           torch.unique(torch.randint(0, L, (int(c) * 2,), generator=g))[:int(c)] for c in counts]
    ids = [t[torch.randperm(t.numel(), generator=g)] for t in ids]
    counts = torch.tensor([t.numel() for t in ids], dtype=torch.int64)
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, torch.cat(ids).long()


def make_features(levels: int, B: int, D: int, device: torch.device, dtype: torch.dtype, seed: int):
    """One [B, D] N(0, 1) feature matrix per level (CascadeXML feeds each level from its own encoder layer); leaf
    tensors with requires_grad, so both paths also compute the features' gradients."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True) for _ in range(levels)]


# ----------------------------------------------------------------------------------------------------------
# the reference path (plain PyTorch, the originals' way)


def children_table(offsets: torch.Tensor, max_children: int) -> torch.Tensor:
    """[n + 1, max_children] int64: row c holds node c's children ids (tree order), -1 past its block; the extra last
    row is all -1 (the children of a pad node). CascadeXML keeps such a padded cluster -> children map."""
    n = offsets.numel() - 1
    starts, sizes = offsets[:-1], offsets[1:] - offsets[:-1]
    slot = torch.arange(max_children, device=offsets.device)
    tab = (starts.unsqueeze(1) + slot).masked_fill(slot >= sizes.unsqueeze(1), -1)
    return torch.cat([tab, tab.new_full((1, max_children), -1)])


def level_positive_ids(offsets: Sequence[torch.Tensor], label_offsets: torch.Tensor, label_ids: torch.Tensor,
                       pad: int = -2) -> List[torch.Tensor]:
    """Per level, each document's positive nodes as a padded [B, P] int64 matrix (pad -2, never an id): the labels
    (perm = identity, so tree position = label id), then their ancestors level by level. Built once per batch
    outside the timed region, as the originals' data loaders deliver per-level labels."""
    B = label_offsets.numel() - 1
    counts = label_offsets[1:] - label_offsets[:-1]
    P = max(1, int(counts.max())) if B else 1
    rows = torch.repeat_interleave(torch.arange(B), counts)
    cols = torch.arange(label_ids.numel()) - label_offsets[rows]
    ids = label_ids.long().cpu()
    out = []
    for level in range(len(offsets), -1, -1):
        m = torch.full((B, P), pad, dtype=torch.int64)
        m[rows, cols] = ids
        out.append(m)
        if level > 0:
            o = offsets[level - 1].cpu()
            parent = torch.repeat_interleave(torch.arange(o.numel() - 1), o[1:] - o[:-1])
            ids = parent[ids]
    return list(reversed(out))


class Reference:
    """The originals' training step over dense tables W[l] [n_l, D], b[l] [n_l] (nn.Parameters, dense gradients).
    `loss(features, pos, forced_ids=None)`: the teacher-forced shortlist loss; with `forced_ids` (one [B, K_l] id
    tensor per level) the given shortlists are scored instead of selected (the correctness check)."""

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], tree: Tree,
                 device: torch.device):
        self.weights, self.biases = list(weights), list(biases)
        self.beams = list(tree.beams)
        self.sizes = list(tree.sizes)
        self.children = [children_table(o.to(device), mc) for o, mc in zip(tree.offsets(), tree.max_children())]

    def loss(self, features, pos, forced_ids=None):
        B = features[0].shape[0]
        total = features[0].new_zeros((), dtype=torch.float32)
        trace = []
        ids = None
        for level, (x, W, b) in enumerate(zip(features, self.weights, self.biases)):
            if level == 0:
                ids = torch.arange(self.sizes[0], device=x.device).expand(B, -1)
                logits = F.linear(x, W, b)  # the top level is a plain dense layer in CascadeXML
            else:
                safe = ids.clamp(min=0)
                logits = torch.bmm(W[safe], x.unsqueeze(-1)).squeeze(-1) + b[safe]
            valid = ids >= 0
            # dense [B, K] targets: is ids[b, k] one of document b's positive nodes at this level
            targets = (ids.unsqueeze(-1) == pos[level].unsqueeze(1)).any(-1) & valid
            lf = logits.float()
            per_entry = F.binary_cross_entropy_with_logits(lf, targets.float(), reduction="none")
            total = total + (per_entry * valid).sum() / valid.sum().clamp(min=1)
            trace.append(ids)
            if level + 1 < len(self.sizes):
                if forced_ids is not None:
                    ids = forced_ids[level + 1]
                    continue
                forced = (torch.sigmoid(lf.detach()) + targets).masked_fill(~valid, float("-inf"))
                top, pos_k = torch.topk(forced, min(self.beams[level], ids.shape[1]), dim=1)
                nodes = ids.gather(1, pos_k).masked_fill(top == float("-inf"), self.sizes[level])
                ids = self.children[level][nodes].reshape(B, -1)
        return total, trace


# ----------------------------------------------------------------------------------------------------------
# checks and bookkeeping


def shortlist_match(ours: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """Fraction of (level, document) shortlists whose sets of valid ids are equal."""
    eq, n = 0, 0
    for a, b in zip(ours, ref):
        a, b = a.cpu(), b.cpu()
        for i in range(a.shape[0]):
            x, y = a[i][a[i] >= 0].sort().values, b[i][b[i] >= 0].sort().values
            eq += int(x.shape == y.shape and bool(torch.equal(x, y)))
            n += 1
    return eq / max(n, 1)


def rel_diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-30)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def probe_optimizer_ms_per_row(device: torch.device, dtype: torch.dtype, D: int, opts: Dict[str, Any],
                               rows: int = 2048) -> float:
    """ms per touched row of a SparseAdamW step on a small table where half the rows catch up one missed step (the
    worst per-row work of exact mode). Guards against optimizer paths that are far too slow to time at full size
    (e.g. a Python per-row loop)."""
    import cascadexml_fast as cx

    p = torch.nn.Parameter(torch.zeros(rows, D, device=device, dtype=dtype))
    opt = cx.SparseAdamW([p], lr=LR, **opts)
    g = torch.ones(rows, D, device=device, dtype=dtype)

    def step(idx):
        p.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), g[: idx.numel()], (rows, D),
                                         check_invariants=False).coalesce()
        opt.step()
        p.grad = None

    step(torch.arange(0, rows, 2, device=device))
    step(torch.arange(0, rows, 4, device=device))
    harness.synchronize(device)
    t0 = time.perf_counter()
    step(torch.arange(rows, device=device))
    harness.synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / rows


def memory_estimate(method: str, tree: Tree, B: int, D: int, s_w: int, state_size: int, rows: int,
                    cuda: bool) -> int:
    """A guess, on the safe side, of a method's bytes beyond the tables already allocated (optimizer state + one
    step's peak), to skip what cannot fit. Measured on CPU at 670k, B = 64: ours-lazy 6.3 GB (estimate 7.7),
    reference 11.2 GB (estimate 13.9)."""
    table = tree.table_rows() * (D + 1)
    gathered = B * sum(tree.widths()[1:]) * D
    if method == "reference":
        # dense grads + AdamW state, AdamW's temporaries (foreach on CUDA: a table-sized list; the CPU for-loop: the
        # largest table), the gathered rows saved for backward and their grads
        temps = table if cuda else tree.L * (D + 1)
        return (table * 3 + temps + gathered * 3) * s_w + (1 << 29)
    # state + row-sparse grads of the touched rows and the optimizer's temporaries over them
    return table * 2 * state_size + 3 * rows * D * max(s_w, 4) + (1 << 29)


# ----------------------------------------------------------------------------------------------------------
# measurement


def measure(step: Callable[[], Any], setup: Callable[[], Any], device: torch.device, timing: Dict[str, Any],
            opt_getter: Callable[[], torch.optim.Optimizer]) -> Dict[str, Any]:
    """Step 1 (plain: creates the optimizer state; its loss is kept), the optimizer state's bytes, more warm-up
    steps (GPU: compilation, autotuning; skipped on CPU when step 1 was slow), one step inside PeakMemory (extra
    memory beyond tables, inputs and optimizer state), then time_fn."""
    setup()
    harness.synchronize(device)
    t0 = time.perf_counter()
    first_loss = float(step())
    harness.synchronize(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    st = state_bytes(opt_getter())
    more = max(0, timing["warmup"] - 2)
    if device.type != "cuda" and first_ms > timing["slow_ms"]:
        more = 0
    for _ in range(more):
        setup()
        step()
    setup()
    free_memory(device)
    with harness.PeakMemory(device) as pm:
        step()
    t = harness.time_fn(step, warmup=0, reps=timing["reps"], device=device, setup=setup,
                        min_reps=timing["min_reps"], max_time_s=timing["max_time_s"])
    return dict(t, extra_mb=pm.extra_mb, state_mb=st / harness.MB, first_ms=first_ms, first_step_loss=first_loss)


def run(cases: Sequence[Case], device: torch.device, timing: Dict[str, Any], *, D: int, seed: int = 0,
        methods: Optional[Sequence[str]] = None, max_step_s: float = 30.0,
        log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    import cascadexml_fast as cx

    records: List[Dict[str, Any]] = []
    cuda = device.type == "cuda"
    safety = 0.95 if cuda else 0.85  # CUDA out-of-memory is caught and recorded; on CPU the OOM killer is not
    order: List[Tuple[str, str]] = []
    for c in cases:
        if (c.tree, c.dtype) not in order:
            order.append((c.tree, c.dtype))

    for tname, dname in order:
        tree = TREES[tname]
        dtype = DTYPES[dname]
        group = [c for c in cases if c.tree == tname and c.dtype == dname]
        want_all = {m for c in group for m in c.methods if methods is None or m in methods}
        s_w = torch.tensor([], dtype=dtype).element_size()
        free_memory(device)
        avail = harness.available_memory_bytes(device)
        base_need = tree.table_rows() * (D + 1) * s_w  # the head's tables
        if avail is not None and base_need > 0.85 * avail:
            for c in group:
                for m in c.methods:
                    records.append(dict(method=m, tree=tname, dtype=dname, B=c.B, ms=None,
                                        note=f"skipped: tables need ~{base_need / 1e9:.1f} GB, "
                                             f"{avail / 1e9:.1f} GB free"))
            log(f"# {tname} {dname}: skipped, tables need ~{base_need / 1e9:.1f} GB")
            continue

        t0 = time.perf_counter()
        tree_obj = SimpleNamespace(offsets=tree.offsets(), perm=torch.arange(tree.L))
        head = cx.CascadeHead(tree_obj, D, list(tree.beams), sparse_grad=True, dtype=dtype, device=device)

        def restore():
            """The common starting tables of every method: CascadeHead's initialisation (Xavier-uniform weights,
            zero biases) redrawn from the seed. As fast as copying a saved copy, and no second copy in memory."""
            torch.manual_seed(seed)
            head.reset_parameters()
            for p in head.parameters():
                p.grad = None

        restore()
        harness.synchronize(device)
        weights_mb = tensor_bytes(list(head.parameters())) / harness.MB
        log(f"# tree {tname} {'/'.join(map(str, tree.sizes))} beams {'/'.join(map(str, tree.beams))} D={D} {dname}: "
            f"head built in {time.perf_counter() - t0:.1f} s, tables {weights_mb:.0f} MB")

        per_case: Dict[int, Dict[str, Any]] = {}
        probes: Dict[str, float] = {}
        # phase 1: checks + our methods, per batch size
        for c in group:
            B = c.B
            X = make_features(tree.levels, B, D, device, dtype, seed + 17 * B + 1)
            pos_off, pos_ids = make_positives(B, tree.L, seed + 31 * B + 2)
            positives = (pos_off.to(device), pos_ids.to(device))
            pos_pad = [p.to(device) for p in level_positive_ids(tree.offsets(), pos_off, pos_ids)]
            ref = Reference([p.detach() for p in head.weights], [p.detach() for p in head.biases], tree, device)

            # correctness check at the common starting weights (forward only, untimed)
            restore()
            with torch.no_grad():
                loss_ours, trace = head.loss(X, positives, return_shortlists=True)
                ours_ids = [ids for ids, _ in trace]
                loss_ref, ref_ids = ref.loss(X, pos_pad)
                loss_ref_same, _ = ref.loss(X, pos_pad, forced_ids=ours_ids)
            chk = dict(loss_ours=float(loss_ours), loss_ref=float(loss_ref), loss_ref_same_sl=float(loss_ref_same))
            chk["loss_rel_diff"] = rel_diff(chk["loss_ours"], chk["loss_ref"])
            chk["loss_rel_diff_same_sl"] = rel_diff(chk["loss_ours"], chk["loss_ref_same_sl"])
            chk["sl_match"] = shortlist_match(ours_ids, ref_ids)
            tol = 1e-4 if dname == "fp32" else 2e-2
            chk["agree"] = chk["loss_rel_diff_same_sl"] <= tol and (chk["sl_match"] < 1 or chk["loss_rel_diff"] <= tol)
            chk["agree_tol"] = tol
            K_levels = [int(i.shape[1]) for i in ours_ids]
            rows_levels = [int(torch.unique(i[i >= 0]).numel()) for i in ours_ids]
            del trace, ref_ids, loss_ours, loss_ref, loss_ref_same, ref
            per_case[B] = dict(X=X, positives=positives, pos_pad=pos_pad, chk=chk)
            common = dict(device=device.type, tree=tname, sizes="/".join(map(str, tree.sizes)),
                          beams="/".join(map(str, tree.beams)), L=tree.L, D=D, dtype=dname, B=B, K=sum(K_levels),
                          K_levels=K_levels, rows=sum(rows_levels), rows_levels=rows_levels, weights_mb=weights_mb,
                          positives=int(pos_ids.numel()), shape=f"{tname} B={B}")
            per_case[B]["common"] = common
            log(f"  {tname} {dname} B={B}: K per level {K_levels}, rows touched {rows_levels}; loss ours "
                f"{chk['loss_ours']:.6f} ref {chk['loss_ref']:.6f} (same shortlists {chk['loss_ref_same_sl']:.6f}), "
                f"shortlists equal {100 * chk['sl_match']:.1f}%")

            def drop_feature_grads():
                for x in X:
                    x.grad = None

            for method in [m for m in c.methods if m in want_all and METHODS[m] is not None]:
                opts = METHODS[method]
                rec = dict(common, method=method, mode=opts["mode"], state_dtype=str(opts["state_dtype"]).replace(
                    "torch.", ""), loss=chk["loss_ours"], loss_ref=chk["loss_ref"],
                    loss_rel_diff=chk["loss_rel_diff"], loss_ref_same_sl=chk["loss_ref_same_sl"],
                    loss_rel_diff_same_sl=chk["loss_rel_diff_same_sl"], sl_match=chk["sl_match"], agree=chk["agree"])
                state_size = torch.tensor([], dtype=opts["state_dtype"]).element_size()
                avail = harness.available_memory_bytes(device)
                need = memory_estimate(method, tree, B, D, s_w, state_size, sum(rows_levels), cuda)
                if avail is not None and need > safety * avail:
                    rec.update(ms=None, note=f"skipped: needs ~{need / 1e9:.1f} GB, {avail / 1e9:.1f} GB free")
                    records.append(rec)
                    log(f"  {method:20s} {rec['note']}")
                    continue
                key = f"{opts['mode']}/{opts['state_dtype']}"
                if key not in probes:
                    probes[key] = probe_optimizer_ms_per_row(device, dtype, D, opts)
                projected_s = probes[key] * sum(rows_levels) / 1e3
                rec["optimizer_probe_ms_per_row"] = probes[key]
                if projected_s > max_step_s:
                    rec.update(ms=None, note=f"skipped: optimizer alone projected {projected_s:.0f} s/step "
                                             f"({probes[key] * 1e3:.1f} us/row on a probe; > --max-step-s)")
                    records.append(rec)
                    log(f"  {method:20s} {rec['note']}")
                    continue
                restore()
                holder: Dict[str, Any] = {"opt": cx.SparseAdamW(head.parameters(), lr=LR, **opts)}

                def our_step(holder=holder):
                    opt = holder["opt"]
                    loss = head.loss(X, positives)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    return loss.detach()

                try:
                    m = measure(our_step, drop_feature_grads, device, timing, lambda: holder["opt"])
                except Exception as exc:
                    if not _oom(exc):
                        raise
                    holder.clear()
                    restore()
                    free_memory(device)
                    rec.update(ms=None, note="skipped: out of memory")
                    records.append(rec)
                    log(f"  {method:20s} out of memory")
                    continue
                rec.update(ms=m["median_ms"], p10_ms=m["p10_ms"], p90_ms=m["p90_ms"], n=m["n"],
                           extra_mb=m["extra_mb"], state_mb=m["state_mb"], first_ms=m["first_ms"],
                           first_step_loss=m["first_step_loss"])
                rec["total_mb"] = weights_mb + m["state_mb"] + (m["extra_mb"] or 0.0)
                records.append(rec)
                log(f"  {method:20s} {m['median_ms']:.2f} ms (p10 {m['p10_ms']:.2f}, p90 {m['p90_ms']:.2f}, "
                    f"n={m['n']}), extra {harness._fmt(m['extra_mb'])} MB, state {m['state_mb']:.0f} MB")
                holder.clear()
                drop_feature_grads()
                restore()
                free_memory(device)

        # phase 2: the reference, its parameters sharing the head's tables (restored to the starting values)
        ref_cases = [c for c in group if "reference" in c.methods and "reference" in want_all]
        for c in ref_cases:
            B = c.B
            pc = per_case[B]
            X, pos_pad, chk = pc["X"], pc["pos_pad"], pc["chk"]
            rec = dict(pc["common"], method="reference", mode="dense AdamW", state_dtype=dname, loss=chk["loss_ref"],
                       loss_ref=chk["loss_ref"])
            avail = harness.available_memory_bytes(device)
            need = memory_estimate("reference", tree, B, D, s_w, s_w, pc["common"]["rows"], cuda)
            if avail is not None and need > safety * avail:
                rec.update(ms=None, note=f"skipped: needs ~{need / 1e9:.1f} GB, {avail / 1e9:.1f} GB free")
                records.append(rec)
                log(f"  {'reference':20s} {rec['note']}")
                continue
            restore()
            params = [torch.nn.Parameter(p.detach()) for p in list(head.weights) + list(head.biases)]
            ref = Reference(params[:tree.levels], params[tree.levels:], tree, device)
            holder = {"opt": torch.optim.AdamW(params, lr=LR)}

            def ref_step(holder=holder, ref=ref):
                opt = holder["opt"]
                loss, _ = ref.loss(X, pos_pad)
                loss.backward()
                opt.step()
                opt.zero_grad()
                return loss.detach()

            def drop_feature_grads():
                for x in X:
                    x.grad = None

            try:
                m = measure(ref_step, drop_feature_grads, device, timing, lambda: holder["opt"])
            except Exception as exc:
                if not _oom(exc):
                    raise
                holder.clear()
                for p in params:
                    p.grad = None
                free_memory(device)
                rec.update(ms=None, note="skipped: out of memory")
                records.append(rec)
                log("  reference            out of memory")
                continue
            rec.update(ms=m["median_ms"], p10_ms=m["p10_ms"], p90_ms=m["p90_ms"], n=m["n"], extra_mb=m["extra_mb"],
                       state_mb=m["state_mb"], first_ms=m["first_ms"], first_step_loss=m["first_step_loss"])
            rec["total_mb"] = weights_mb + m["state_mb"] + (m["extra_mb"] or 0.0)
            records.append(rec)
            log(f"  {'reference':20s} {m['median_ms']:.2f} ms (p10 {m['p10_ms']:.2f}, p90 {m['p90_ms']:.2f}, "
                f"n={m['n']}), extra {harness._fmt(m['extra_mb'])} MB, state {m['state_mb']:.0f} MB")
            holder.clear()
            for p in params:
                p.grad = None
            del params, ref
            free_memory(device)
        del head, per_case
        free_memory(device)
    return records


def fill_ratios(records: List[Dict[str, Any]]) -> None:
    """x_vs_ref = reference ms / this ms; mem_vs_ref = this extra MB / the reference's (same tree, dtype, B)."""
    ref = {(r["tree"], r["dtype"], r["B"]): r for r in records if r["method"] == "reference" and r.get("ms")}
    for r in records:
        b = ref.get((r["tree"], r["dtype"], r["B"]))
        r["x_vs_ref"] = b["ms"] / r["ms"] if (b and r.get("ms")) else None
        r["mem_vs_ref"] = (r["extra_mb"] / b["extra_mb"] if (b and b.get("extra_mb") and r.get("extra_mb") is not None)
                           else None)


# ----------------------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer shapes and reps (~1 min on 2 CPU cores)")
    g.add_argument("--tiny", action="store_true", help="toy shapes in seconds (used by the tests)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; OpenMP kernels follow)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per measurement (default 50 GPU, 10 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before timing, the memory step included (default 5 GPU, 2 CPU)")
    p.add_argument("--max-time", type=float, default=None,
                   help="seconds per measurement; slow methods get fewer reps, never below --min-reps")
    p.add_argument("--min-reps", type=int, default=None, help="floor on reps for slow methods (default 20 GPU, 3 CPU)")
    p.add_argument("--max-step-s", type=float, default=None,
                   help="skip an optimizer whose probe projects more seconds per step (default 10 GPU, 30 CPU)")
    p.add_argument("--trees", default=None, help="comma list to keep: " + ",".join(TREES))
    p.add_argument("--dtypes", default=None, help="comma list to keep, e.g. bf16 or fp32,bf16")
    p.add_argument("--batches", default=None, help="comma list of B to keep, e.g. 64")
    p.add_argument("--methods", default=None, help="comma list to keep: " + ",".join(METHODS))
    p.add_argument("--dim", type=int, default=None, help="features D (default 768; 64 for --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="exit status 1 when a loss check disagrees")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    with harness.num_threads(args.threads or None):
        return _main(args, argv)


def _main(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    device = harness.resolve_device(args.device)
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    cuda = device.type == "cuda"
    defaults = {  # (warmup, reps, min_reps, max seconds per measurement)
        "full": (5, 50, 20, 5.0) if cuda else (2, 10, 3, 12.0),
        "quick": (4, 30, 10, 2.0) if cuda else (2, 3, 3, 5.0),
        "tiny": (2, 3, 2, 0.5),
    }[preset]
    pick = lambda v, d: d if v is None else v  # noqa: E731
    timing = dict(warmup=pick(args.warmup, defaults[0]), reps=pick(args.reps, defaults[1]),
                  min_reps=pick(args.min_reps, defaults[2]), max_time_s=pick(args.max_time, defaults[3]),
                  slow_ms=1000.0)
    timing["min_reps"] = min(timing["min_reps"], timing["reps"])
    max_step_s = pick(args.max_step_s, 10.0 if cuda else 30.0)
    D = pick(args.dim, 64 if preset == "tiny" else 768)
    cases = plan(device.type, preset)
    if args.trees:
        keep = set(args.trees.split(","))
        cases = [c for c in cases if c.tree in keep]
    if args.dtypes:
        keep = set(args.dtypes.split(","))
        cases = [c for c in cases if c.dtype in keep]
    if args.batches:
        keep_b = {int(b) for b in args.batches.split(",")}
        cases = [c for c in cases if c.B in keep_b]
    methods = None
    if args.methods:
        methods = [m for m in args.methods.split(",")]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")

    import cascadexml_fast as cx

    try:
        cx_info = cx.info()
    except Exception as exc:  # info() is a convenience: never let it stop a benchmark
        cx_info = {"error": f"{type(exc).__name__}: {exc}"}
    dinfo = harness.device_info(device)
    print(f"# {NAME} on {dinfo['name']} ({device}), torch {dinfo['torch']}, triton {dinfo['triton']}, "
          f"{dinfo['torch_threads']} threads, load average {dinfo['loadavg']}")
    free_gb = (harness.available_memory_bytes(device) or 0) / 1e9
    print(f"# timing: {timing}; D={D}; free memory {free_gb:.1f} GB")

    records = run(cases, device, timing, D=D, seed=args.seed, methods=methods, max_step_s=max_step_s)
    fill_ratios(records)
    failed = [f"{r['method']} {r['tree']} {r['dtype']} B={r['B']}" for r in records if r.get("agree") is False]
    elapsed = time.perf_counter() - t_start
    meta = dict(
        op=NAME,
        command=harness.command_line() if argv is None else f"bench_train_step.main({list(argv)})",
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        preset=preset,
        D=D,
        lr=LR,
        trees={t: dict(sizes=list(TREES[t].sizes), beams=list(TREES[t].beams))
               for t in sorted({c.tree for c in cases})},
        cascadexml_fast_info=cx_info,
        device_info=dinfo,
        timing=dict(timing, method="CUDA events, 256 MiB L2 flush before each call" if cuda else
                    "time.perf_counter, gc paused, cache flush before each call",
                    memory_call="step 1 creates the optimizer state (its loss kept), then warm-up, then one step "
                                "inside PeakMemory"),
        max_step_s=max_step_s,
        checks_failed=len(failed),
        seed=args.seed,
        memory_method="torch.cuda max_memory_allocated delta" if cuda else
        "RSS high-water mark (VmHWM after clear_refs) minus VmRSS before",
        elapsed_s=round(elapsed, 1),
        loadavg_end=harness.loadavg(),
    )
    meta["load_average"] = f"start {dinfo.get('loadavg')}, end {meta['loadavg_end']} (1/5/15 min)"  # shown in the .md
    table = harness.format_table(records, COLUMNS, HEADERS)
    print()
    print(table)
    print(f"\n# {len(records)} rows in {elapsed:.0f} s; load average at the end {meta['loadavg_end']}")
    paths = {}
    if not args.no_write:
        paths = harness.write_results(
            NAME if preset == "full" else f"{NAME}_{preset}", records, meta, args.out, columns=COLUMNS,
            headers=HEADERS, plot=dict(x="shape", y="ms", series="method", panels=("dtype",)),
            notes="One full head training step (all levels: teacher-forced shortlists, forward, BCE, backward, "
                  "optimizer). ms = median; x ref = reference ms / ms (same run); extra MB = peak during one step "
                  "minus what was allocated before it (tables, inputs, optimizer state); opt state MB = the "
                  "optimizer's state on its own; total MB = weights + state + extra; loss = loss at the common "
                  "starting weights; loss rel = |ours - ref| / ref (each with its own shortlists); SL match = "
                  "fraction of (level, document) shortlists equal as sets; agree = losses agree on the same "
                  "shortlists (and on their own when those are equal). See benchmarks/README.md.")
        print("# wrote " + ", ".join(str(p) for p in paths.values() if p))
    if failed:
        print(f"# {len(failed)} loss check(s) disagree: " + ", ".join(failed))
        if args.strict:
            raise SystemExit(1)
    return dict(records=records, meta=meta, paths=paths)


if __name__ == "__main__":
    main()
