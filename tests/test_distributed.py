"""Label-sharded heads on torch.distributed (gloo, 2 and 3 spawned CPU processes; dist_harness.World bounds every
call in time): sharded search == CascadeHead.search, a sharded training step == the single-process step, sharded
checkpoints written on 2 ranks re-load on 3, and a rank failing mid-step is an error on every rank, not a hang.

Tolerances: search ids are compared exactly and scores bit for bit (the merge reproduces the single-process
ranking and the CPU kernel's sigmoid). One training step from the same state gives bit-identical tables, biases
and loss; the encoder (and so later steps) differs by summation order only (feature gradients summed over ranks):
<= 1e-6 absolute.
"""
import time

import pytest
import torch
import torch.distributed as dist

import cascadexml_fast as cx
from cascadexml_fast.distributed import ShardedCascadeHead, load_full_head, shard_boundaries
from cascadexml_fast.distributed.checkpoint import read_index, read_rows

import dist_workers as workers
from dist_harness import World

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

TOL = 1e-6


@pytest.fixture(scope="module")
def world2():
    world = World(2)
    yield world
    world.close()


@pytest.fixture(scope="module")
def world3():
    world = World(3)
    yield world
    world.close()


# ---------------------------------------------------------------------------------------------- one process
def test_shard_boundaries_rule():
    # level 0 split evenly; deeper levels moved to the nearest children-block start (ties to the lower one)
    offsets = [torch.tensor([0, 3, 3, 7]), torch.tensor([0, 4, 5, 9, 9, 13, 19, 20])]
    assert shard_boundaries([3, 7, 20], offsets, 2) == [[0, 1, 3], [0, 3, 7], [0, 9, 20]]
    assert shard_boundaries([3, 7, 20], offsets, 1) == [[0, 3], [0, 7], [0, 20]]
    # more ranks than nodes: empty shards, still a partition
    bounds = shard_boundaries([3, 7, 20], offsets, 5)
    assert bounds[0] == [0, 0, 1, 1, 2, 3]
    for b, n in zip(bounds, [3, 7, 20]):
        assert b[0] == 0 and b[-1] == n and all(x <= y for x, y in zip(b, b[1:]))
        assert set(b[1:-1]) <= set(range(n + 1))
    for level in (1, 2):  # every inner boundary is a block start of the level above
        assert set(bounds[level]) <= set(offsets[level - 1].tolist())
    # a balanced LabelTree with a power-of-two world: each shard is whole subtrees of the top level's even split
    tree, _ = workers.trees()["labeltree"]
    sizes = [4, 16, 200]
    for R in (2, 4):
        bounds = shard_boundaries(sizes, tree.offsets, R)
        for level in (1, 2):
            assert bounds[level] == [int(tree.offsets[level - 1][b]) for b in bounds[level - 1]]


def test_one_process_sharded_head_is_the_full_head():
    tree, beams = workers.trees()["uneven"]
    head = workers.make_head(tree, beams, combine="leaf_x_parent", sparse_grad=True)
    sharded = ShardedCascadeHead.from_full(head)
    assert sharded.world_size == 1 and sharded.boundaries == [[0, n] for n in head.level_sizes]
    features = workers.make_features(head, 6)
    ids, scores = head.search(features, k=7)
    s_ids, s_scores = sharded.search(features, k=7)
    assert torch.equal(ids, s_ids) and torch.equal(scores, s_scores)
    positives = workers.random_positives(6, head.level_sizes[-1], torch.Generator().manual_seed(0))
    assert torch.equal(head.loss(features, positives), sharded.loss(features, positives))
    full = sharded.to_full_head()
    assert all(torch.equal(a, b) for a, b in zip(full.weights, head.weights))
    with pytest.raises(ValueError, match="batch must be"):
        sharded.search(features, k=3, batch="everything")


def test_direct_initialisation_does_not_depend_on_the_sharding(world3):
    tree, beams = workers.trees()["uneven"]
    one = ShardedCascadeHead(tree, 5, beams, seed=4)
    bounds = [(6 / (n + 5)) ** 0.5 for n in one.level_sizes]
    assert all(0 < float(w.detach().abs().max()) <= bound for w, bound in zip(one.weights, bounds))
    assert all(torch.equal(b, torch.zeros_like(b)) for b in one.biases)
    full = world3.run(workers.direct_init, 4)[0]
    assert all(torch.equal(a, b) for a, b in zip(full, one.weights))


# ---------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("ranks", [2, 3])
def test_sharded_search_equals_single_process(request, ranks):
    world = request.getfixturevalue(f"world{ranks}")
    results = world.run(workers.search_cases)
    for rank_results in results:
        assert len(rank_results) == 49
        assert not all(rank_results[-1]["whole_blocks"][1:])  # some level really cuts blocks
        for r in rank_results:
            assert r["ids_equal"] and r["local_ids_equal"] and r["pads_equal"], r["case"]
            assert r["bit_equal"], (r["case"], r["max_diff"])
    # the ranks really were split: some level of every tree is shared out
    assert all(any(b[1] not in (0, b[-1]) for b in r["boundaries"]) for r in results[0])


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("ranks", [2, 3])
def test_sharded_training_step_equals_single_process(request, ranks):
    world = request.getfixturevalue(f"world{ranks}")
    one = world.run(workers.train_step_case, (0,))
    for r in one:  # one step from the same state: identical loss, tables, biases and updated rows
        assert r["losses"] == r["ref_losses"]
        assert r["tables_bit_equal"] and r["bias_max_diff"] == 0.0 and r["updated_rows_equal"]
        assert r["encoder_max_diff"] <= TOL
        # no dense table gradient crossed the network: features, top-k candidates and a loss scalar only
        assert set(r["meter"]["calls"]) <= {"all_gather", "all_to_all", "reduce_scatter", "all_reduce", "broadcast"}
        table_bytes = 4 * (6 + 30 + 150) * (workers.TRAIN_D + 1)
        assert r["meter"]["payload"].get("all_reduce", 0) < table_bytes
    assert len({tuple(r["local_rows"][-1]) for r in one}) == ranks
    three = world.run(workers.train_step_case, (0, 1, 2))
    for r in three:
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"])) <= TOL
        assert r["table_max_diff"] <= TOL and r["bias_max_diff"] <= TOL and r["encoder_max_diff"] <= TOL
        assert r["updated_rows_equal"]


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_written_on_2_ranks_reloads_on_3(world2, world3, tmp_path):
    first, second = tmp_path / "two", tmp_path / "three"
    saved = world2.run(workers.checkpoint_save, str(first))[0]
    index = read_index(first)
    assert index["world_size"] == 2 and len(index["files"]) == 2 and index["optimizer"]["cls"] == "SparseAdamW"
    full = load_full_head(first)
    assert all(torch.equal(a, b) for a, b in zip(full.weights, saved["weights"]))
    assert all(torch.equal(a, b) for a, b in zip(full.biases, saved["biases"]))

    after = world3.run(workers.checkpoint_reload, str(first), str(second))[0]
    index3 = read_index(second)
    assert index3["world_size"] == 3 and len(index3["files"]) == 3 and index3["boundaries"] == after["boundaries"]
    assert index3["boundaries"] != index["boundaries"]
    again = load_full_head(second)  # 2 -> 3 round trip: identical full tables and optimizer state
    assert all(torch.equal(a, b) for a, b in zip(again.weights, full.weights))
    assert all(torch.equal(a, b) for a, b in zip(again.biases, full.biases))
    for level, n in enumerate(index["level_sizes"]):
        for param in (f"weights.{level}", f"biases.{level}"):
            for state in ("exp_avg", "exp_avg_sq"):
                name = f"optim.{param}.{state}"
                assert torch.equal(read_rows(first, index, name, level, 0, n),
                                   read_rows(second, index3, name, level, 0, n))
    assert index3["optimizer"]["scalars"] == index["optimizer"]["scalars"]

    # training goes on from the re-sharded state as it would have in one process
    _, reference, _, _ = workers.single_process_steps((0, 1))
    for a, b in zip(after["weights"], reference.weights):
        assert float((a - b).detach().abs().max()) <= TOL
    for a, b in zip(after["biases"], reference.biases):
        assert float((a - b).detach().abs().max()) <= TOL


# ---------------------------------------------------------------------------------------------- failures
def _check_failure(results, bad_rank, expect_report):
    for rank, (ok, value) in enumerate(results):
        assert ok, value
        what, message, seconds = value
        if rank == bad_rank and expect_report:
            assert what == "local" and "injected failure on rank 1" in message
            continue
        assert what == "peer", (rank, value)
        if expect_report:
            assert "another rank failed: rank 1: ShardedCascadeHead.loss: ValueError: injected failure" in message
        else:
            assert "no rank reported an error" in message


def test_a_rank_raising_mid_step_fails_every_rank_fast(world3):
    t0 = time.monotonic()
    results = world3.run_allow_errors(workers.failing_step, 1, "raise", timeout_s=30)
    _check_failure(results, 1, expect_report=True)
    assert max(value[2] for _, value in results) < 10, results  # not the process group's 30 s timeout
    assert time.monotonic() - t0 < 30
    world3.reinit(pg_timeout_s=2.0)


def test_a_failure_under_any_guard_of_the_group_stops_the_others(world3):
    results = world3.run_allow_errors(workers.cross_comm_failure, timeout_s=30)
    assert results[1] == (True, results[1][1]) and results[1][1][0] == "local"
    for rank in (0, 2):
        ok, (what, message, seconds) = results[rank]
        assert ok and what == "peer" and "rank 1: training step: ValueError: injected failure" in message
        assert seconds < 10
    world3.reinit(pg_timeout_s=2.0)


def test_a_hung_rank_times_out_on_every_rank(world3):
    results = world3.run_allow_errors(workers.failing_step, 1, "hang", 4.0, timeout_s=30)
    for rank, (ok, value) in enumerate(results):
        assert ok and value[0] == "peer", (rank, value)
        if rank != 1:
            assert "no rank reported an error" in value[1] and value[2] < 4.0
    world3.reinit()


def test_a_rank_dying_mid_step_fails_every_rank_fast(world3):
    results = world3.run_allow_errors(workers.failing_step, 1, "exit", timeout_s=30)
    assert not results[1][0] and "exited with code 17" in results[1][1]
    for rank in (0, 2):
        ok, value = results[rank]
        assert ok and value[0] == "peer" and "no rank reported an error" in value[1] and value[2] < 10, value


def test_sparse_optimizers_step_an_empty_shard():
    # a rank may hold no row of a level (fewer nodes than ranks): its parameters still step, so every rank's
    # optimizer state has the same structure (gathered checkpoints rely on it)
    weight, bias = torch.nn.Parameter(torch.zeros(0, 3)), torch.nn.Parameter(torch.zeros(0))
    for optimizer in (cx.SparseAdamW([weight, bias]), cx.SparseRowwiseAdagrad([weight, bias])):
        empty = torch.zeros(1, 0, dtype=torch.long)
        weight.grad = torch.sparse_coo_tensor(empty, torch.zeros(0, 3), (0, 3), check_invariants=True)
        bias.grad = torch.sparse_coo_tensor(empty, torch.zeros(0), (0,), check_invariants=True)
        optimizer.step()
        assert [state["step"] for state in optimizer.state.values()] == [1, 1]


def test_train_distributed_needs_torchrun(monkeypatch, tmp_path, capsys):
    from cascadexml_fast.__main__ import main

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--distributed", "--output-dir", str(tmp_path / "run")]) == 2
    assert "needs torchrun's environment" in capsys.readouterr().err
    assert not dist.is_initialized()
