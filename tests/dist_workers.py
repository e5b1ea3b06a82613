"""Functions the distributed tests run on every rank of a dist_harness.World (fn(rank, world_size, *args)), and the
single-process builders they share with the tests (same seed -> the same trees, heads and batches everywhere)."""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import torch


# ------------------------------------------------------------------------------------------------ builders
def random_offsets(n_parent: int, n_child: int, gen: torch.Generator) -> torch.Tensor:
    """CSR offsets of n_parent nodes over n_child rows with uneven (possibly empty) blocks."""
    cuts = torch.sort(torch.randint(0, n_child + 1, (n_parent - 1,), generator=gen)).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([n_child])])


def trees():
    """name -> (tree, beams). Odd shapes on purpose: empty nodes, singleton blocks, uneven blocks, beams wider
    than a level, a flat tree, and a balanced LabelTree."""
    gen = torch.Generator().manual_seed(11)
    out = {}
    out["hand"] = (SimpleNamespace(offsets=[torch.tensor([0, 3, 3, 7]), torch.tensor([0, 4, 5, 9, 9, 13, 19, 20])],
                                   perm=torch.randperm(20, generator=torch.Generator().manual_seed(3))), (2, 3))
    out["hand_wide_beams"] = (out["hand"][0], (9, 40))
    uneven = [random_offsets(5, 23, gen), random_offsets(23, 97, gen)]
    out["uneven"] = (SimpleNamespace(offsets=uneven, perm=torch.randperm(97, generator=gen)), (3, 5))
    out["flat"] = (SimpleNamespace(offsets=[], perm=torch.randperm(13, generator=gen)), ())
    out["two_level"] = (SimpleNamespace(offsets=[random_offsets(7, 50, gen)], perm=torch.randperm(50, generator=gen)),
                        (3,))
    from cascadexml_fast import LabelTree

    features = np.random.default_rng(5).standard_normal((200, 8)).astype(np.float32)
    out["labeltree"] = (LabelTree.build(features, level_sizes=(4, 16), seed=0), (2, 5))
    return out


def make_head(tree, beams, *, dims=6, combine="leaf", integer=False, seed=0, sparse_grad=False):
    import cascadexml_fast as cx

    torch.manual_seed(seed)
    head = cx.CascadeHead(tree, dim=dims, beams=beams, combine=combine, sparse_grad=sparse_grad)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for w, b in zip(head.weights, head.biases):
            if integer:
                w.copy_(torch.randint(-2, 3, w.shape, generator=gen))
                b.copy_(torch.randint(-2, 3, b.shape, generator=gen))
            else:
                b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
    return head


def make_features(head, B, *, integer=False, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    if integer:
        return [torch.randint(-2, 3, (B, d), generator=gen).float() for d in head.dims]
    return [torch.randn(B, d, generator=gen) for d in head.dims]


def random_positives(B: int, num_labels: int, gen: torch.Generator, most: int = 3):
    counts = torch.randint(0, most + 1, (B,), generator=gen)
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    ids = torch.randint(0, num_labels, (int(offsets[-1]),), generator=gen)
    return offsets, ids


def split_rows(B: int, world: int, rank: int):
    sizes = [len(part) for part in np.array_split(np.arange(B), world)]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def csr_slice(positives, start: int, end: int):
    offsets, ids = positives
    part = offsets[start:end + 1] - offsets[start]
    return part.clone(), ids[int(offsets[start]):int(offsets[end])].clone()


# ------------------------------------------------------------------------------------------------ inference
def search_cases(rank: int, world: int):
    """Every tree x combine x table kind: sharded search (replicated and local batches) vs CascadeHead.search."""
    from cascadexml_fast.distributed import ShardedCascadeHead

    results = []
    for name, (tree, beams) in trees().items():
        for combine in ("leaf", "leaf_x_parent"):
            for integer in (False, True):
                head = make_head(tree, beams, combine=combine, integer=integer, seed=len(results))
                merge = ("all_gather", "all_to_all")[len(results) % 2]  # both merges on every kind of case
                sharded = ShardedCascadeHead.from_full(head, topk_merge=merge)
                for B, k in ((5, 4), (2, 30)):
                    features = make_features(head, B, integer=integer, seed=len(results))
                    ids, scores = head.search(features, k=k)
                    s_ids, s_scores = sharded.search(features, k=k)
                    start, end = split_rows(B, world, rank)
                    l_ids, l_scores = sharded.search([f[start:end] for f in features], k=k, batch="local")
                    finite = torch.isfinite(scores)
                    results.append(dict(
                        case=f"{name}/{combine}/{'int' if integer else 'float'}/B{B}k{k}/{merge}",
                        ids_equal=bool(torch.equal(ids, s_ids)),
                        local_ids_equal=bool(torch.equal(ids[start:end], l_ids)),
                        pads_equal=bool(torch.equal(finite, torch.isfinite(s_scores))),
                        max_diff=float((scores[finite] - s_scores[finite]).abs().max()) if finite.any() else 0.0,
                        bit_equal=bool(torch.equal(scores, s_scores)) and bool(torch.equal(scores[start:end],
                                                                                            l_scores)),
                        boundaries=sharded.boundaries,
                    ))
    # boundaries that cut children blocks (even splits of every level): the per-entry scoring path
    tree, beams = trees()["uneven"]
    head = make_head(tree, beams, combine="leaf_x_parent", seed=99)
    even = [[(r * n) // world for r in range(world + 1)] for n in head.level_sizes]
    sharded = ShardedCascadeHead.from_full(head, boundaries=even)
    features = make_features(head, 7, seed=99)
    ids, scores = head.search(features, k=6)
    s_ids, s_scores = sharded.search(features, k=6)
    results.append(dict(case="uneven/cut-blocks", ids_equal=bool(torch.equal(ids, s_ids)), local_ids_equal=True,
                        pads_equal=True, max_diff=0.0, bit_equal=bool(torch.equal(scores, s_scores)),
                        boundaries=even, whole_blocks=sharded._whole_blocks))
    return results


def direct_init(rank: int, world: int, seed: int):
    """The full tables of a ShardedCascadeHead built directly (not from a full head) on this world."""
    from cascadexml_fast.distributed import ShardedCascadeHead

    tree, beams = trees()["uneven"]
    sharded = ShardedCascadeHead(tree, 5, beams, seed=seed)
    weights, _ = sharded.full_state()  # collective: every rank gathers
    return weights if rank == 0 else None


# ------------------------------------------------------------------------------------------------ training
TRAIN_F, TRAIN_D, TRAIN_B = 10, 8, 12


def train_setup(seed: int = 0):
    """A tiny encoder (Linear F -> 3 D: one D-slice per level) and a sparse-gradient head over an uneven tree."""
    gen = torch.Generator().manual_seed(seed + 7)
    tree = SimpleNamespace(offsets=[random_offsets(6, 30, gen), random_offsets(30, 150, gen)],
                           perm=torch.randperm(150, generator=gen))
    head = make_head(tree, (3, 6), dims=TRAIN_D, combine="leaf_x_parent", seed=seed, sparse_grad=True)
    torch.manual_seed(seed + 1)
    encoder = torch.nn.Linear(TRAIN_F, 3 * TRAIN_D)
    return encoder, head


def train_batch(step: int, num_labels: int):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(TRAIN_B, TRAIN_F, generator=gen)
    return x, random_positives(TRAIN_B, num_labels, gen)


def make_optimizers(encoder_params, head_params):
    import cascadexml_fast as cx

    return (torch.optim.AdamW(encoder_params, lr=1e-2, weight_decay=0.01),
            cx.SparseAdamW(head_params, lr=1e-2, weight_decay=0.01))


def single_process_steps(steps, seed: int = 0):
    """The reference: `steps` optimizer steps of encoder + full head in one process; (encoder, head, losses)."""
    encoder, head = train_setup(seed)
    dense, sparse = make_optimizers(encoder.parameters(), head.parameters())
    losses = []
    for step in steps:
        x, positives = train_batch(step, head.level_sizes[-1])
        loss = head.loss(list(encoder(x).split(TRAIN_D, dim=1)), positives)
        loss.backward()
        dense.step()
        sparse.step()
        dense.zero_grad()
        sparse.zero_grad()
        losses.append(float(loss.detach()))
    return encoder, head, losses, sparse


def _sharded_step(step, ddp, sharded, dense, sparse, rank, world):
    x, positives = train_batch(step, sharded.level_sizes[-1])
    start, end = split_rows(TRAIN_B, world, rank)
    features = list(ddp(x[start:end]).split(TRAIN_D, dim=1))
    partial = sharded.loss(features, csr_slice(positives, start, end))
    partial.backward()
    dense.step()
    sparse.step()
    dense.zero_grad()
    sparse.zero_grad()
    return float(sharded.global_loss(partial))


def train_step_case(rank: int, world: int, steps=(0, 1)):
    """`steps` sharded steps (DDP encoder with the sum hook, SparseAdamW per shard) vs the same steps in one
    process: losses, full tables, updated rows, encoder."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cascadexml_fast.distributed import ShardedCascadeHead, sum_gradients_hook

    encoder, head = train_setup()
    initial = [w.detach().clone() for w in head.weights]
    ref_encoder, ref_head, ref_losses, _ = single_process_steps(steps)
    sharded = ShardedCascadeHead.from_full(head)
    ddp = DDP(encoder)
    ddp.register_comm_hook(None, sum_gradients_hook)
    dense, sparse = make_optimizers(ddp.parameters(), sharded.parameters())
    sharded.comm.meter.reset()
    losses = [_sharded_step(step, ddp, sharded, dense, sparse, rank, world) for step in steps]
    weights, biases = sharded.full_state()
    ref_weights = [w.detach() for w in ref_head.weights]
    ref_biases = [b.detach() for b in ref_head.biases]
    out = dict(losses=losses, ref_losses=ref_losses, meter=sharded.comm.meter.as_dict(),
               local_rows=[sharded.local_range(level) for level in range(sharded.num_levels)])
    out["table_max_diff"] = max(float((w - r).abs().max()) for w, r in zip(weights, ref_weights))
    out["tables_bit_equal"] = all(torch.equal(w, r) for w, r in zip(weights, ref_weights))
    out["bias_max_diff"] = max(float((b - r).abs().max()) for b, r in zip(biases, ref_biases))
    out["updated_rows_equal"] = all(
        torch.equal((w != w0).any(1), (r != w0).any(1)) for w, r, w0 in zip(weights, ref_weights, initial))
    out["updated_rows"] = [int((r != w0).any(1).sum()) for r, w0 in zip(ref_weights, initial)]
    out["encoder_max_diff"] = max(float((p.detach() - q.detach()).abs().max())
                                  for p, q in zip(encoder.parameters(), ref_encoder.parameters()))
    return out


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_save(rank: int, world: int, directory: str):
    """One sharded training step, then save_sharded(head, directory, optimizer); returns the gathered tables."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cascadexml_fast.distributed import ShardedCascadeHead, save_sharded, sum_gradients_hook

    encoder, head = train_setup()
    sharded = ShardedCascadeHead.from_full(head)
    ddp = DDP(encoder)
    ddp.register_comm_hook(None, sum_gradients_hook)
    dense, sparse = make_optimizers(ddp.parameters(), sharded.parameters())
    _sharded_step(0, ddp, sharded, dense, sparse, rank, world)
    save_sharded(sharded, directory, sparse)
    if rank == 0:
        torch.save(encoder.state_dict(), os.path.join(directory, "encoder-0.pt"))
    weights, biases = sharded.full_state()
    return dict(weights=weights, biases=biases, boundaries=sharded.boundaries) if rank == 0 else None


def checkpoint_reload(rank: int, world: int, directory: str, directory2: str):
    """load_sharded + load_sharded_optimizer on this world size, save again to directory2, then one more training
    step (batch 1) from the reloaded state; returns the gathered tables after that step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import cascadexml_fast as cx
    from cascadexml_fast.distributed import (
        load_sharded, load_sharded_optimizer, save_sharded, sum_gradients_hook,
    )

    sharded = load_sharded(directory)
    encoder, _ = train_setup()
    encoder.load_state_dict(torch.load(os.path.join(directory, "encoder-0.pt")))
    ddp = DDP(encoder)
    ddp.register_comm_hook(None, sum_gradients_hook)
    dense, sparse = make_optimizers(ddp.parameters(), sharded.parameters())
    load_sharded_optimizer(directory, sharded, sparse)
    save_sharded(sharded, directory2, sparse)
    # the dense optimizer restarts here: give the reference the same restart (only the head is compared)
    _sharded_step(1, ddp, sharded, dense, sparse, rank, world)
    weights, biases = sharded.full_state()
    assert isinstance(sparse, cx.SparseAdamW)
    return dict(weights=weights, biases=biases, boundaries=sharded.boundaries) if rank == 0 else None


# ------------------------------------------------------------------------------------------------ failures
def failing_step(rank: int, world: int, bad_rank: int, mode: str, hang_s: float = 0.0):
    """A sharded training step in which `bad_rank` fails at its second distributed top-k (mid-step, after several
    collectives): mode "raise" (an exception), "exit" (the process dies) or "hang" (sleeps hang_s, then goes on).
    Returns (what happened, message, seconds) on every surviving rank."""
    from cascadexml_fast.distributed import PeerFailure, ShardedCascadeHead

    encoder, head = train_setup()
    sharded = ShardedCascadeHead.from_full(head)
    if rank == bad_rank:
        original = sharded.distributed_topk
        calls = []

        def broken(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                if mode == "raise":
                    raise ValueError(f"injected failure on rank {rank}")
                if mode == "exit":
                    os._exit(17)
                time.sleep(hang_s)
            return original(*args, **kwargs)

        sharded.distributed_topk = broken
    x, positives = train_batch(0, sharded.level_sizes[-1])
    start, end = split_rows(TRAIN_B, world, rank)
    t0 = time.monotonic()
    try:
        sharded.loss(list(encoder(x[start:end]).split(TRAIN_D, dim=1)), csr_slice(positives, start, end))
        return ("ok", "", time.monotonic() - t0)
    except PeerFailure as exc:
        return ("peer", str(exc), time.monotonic() - t0)
    except ValueError as exc:
        return ("local", str(exc), time.monotonic() - t0)



# ------------------------------------------------------------------------------------------------ trainer
def trainer_run(rank: int, world: int, fields: dict, stop_after, resume: bool):
    """DistributedTrainer over this world (the default group): prepare + train (optionally stopped after
    `stop_after` global steps, as an interruption: nothing saved then)."""
    from cascadexml_fast.distributed.trainer import DistributedTrainer
    from cascadexml_fast.training import TrainConfig

    trainer = DistributedTrainer(TrainConfig(**fields), resume=resume, log=lambda *_: None, progress=False)
    summary = trainer.prepare().train(stop_after_steps=stop_after)
    head = trainer.model.head
    return dict(summary=summary, rows=[head.local_range(level) for level in range(head.num_levels)])


def cross_comm_failure(rank: int, world: int):
    """Rank 1 fails under one Comm's guard while the others wait in a collective under another Comm's guard on the
    same group (the trainer's and the head's): the report key is per group, so they stop at once."""
    from cascadexml_fast.distributed import Comm, PeerFailure

    outer, inner = Comm(), Comm()
    with outer.guard("set-up"):
        pass
    with inner.guard("set-up"):
        pass
    t0 = time.monotonic()
    if rank == 1:
        try:
            with outer.guard("training step"):
                raise ValueError("injected failure in the step")
        except ValueError as exc:
            return ("local", str(exc), time.monotonic() - t0)
    try:
        with inner.guard("ShardedCascadeHead.loss"):
            inner.all_gather_tensor(torch.ones(1))
        return ("ok", "", time.monotonic() - t0)
    except PeerFailure as exc:
        return ("peer", str(exc), time.monotonic() - t0)
