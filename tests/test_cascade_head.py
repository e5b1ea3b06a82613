"""CascadeHead: per-level tables over a tree, search in original label ids, per-level shortlists."""
from types import SimpleNamespace

import pytest
import torch

import cascadexml_fast as cx
from cascadexml_fast.ops import reference


def hand_made_tree():
    # 3 top nodes -> 7 middle nodes -> 20 labels; a node with one child, a node with none, a label cluster of 1.
    offsets = [torch.tensor([0, 3, 3, 7]), torch.tensor([0, 4, 5, 9, 9, 13, 19, 20])]
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))  # tree position -> original label id
    return SimpleNamespace(offsets=offsets, perm=perm)


def integer_tables(head, generator):
    with torch.no_grad():
        for w in head.weights:
            w.copy_(torch.randint(-2, 3, w.shape, generator=generator))
        for b in head.biases:
            b.copy_(torch.randint(-2, 3, b.shape, generator=generator))


@pytest.mark.parametrize("combine", ["leaf", "leaf_x_parent"])
def test_search_equals_reference_cascade_in_label_ids(combine):
    gen = torch.Generator().manual_seed(0)
    tree = hand_made_tree()
    head = cx.CascadeHead(tree, dim=(5, 4, 6), beams=(2, 3), combine=combine)
    integer_tables(head, gen)
    assert head.level_sizes == [3, 7, 20] and head.max_children == [4, 6]
    features = [torch.randint(-2, 3, (4, d), generator=gen).float() for d in (5, 4, 6)]
    labels, scores = head.search(features, k=5)
    tree_ids, ref_scores = reference.cascade_search(
        features, list(head.weights), list(head.biases), tree.offsets, [2, 3], 5, combine
    )
    expected = torch.where(tree_ids >= 0, tree.perm[tree_ids.clamp(min=0)], -1)
    assert torch.equal(labels, expected)
    torch.testing.assert_close(scores, ref_scores)


def test_shortlists_trace_every_level():
    gen = torch.Generator().manual_seed(1)
    tree = hand_made_tree()
    head = cx.CascadeHead(tree, dim=8, beams=(2, 3))
    integer_tables(head, gen)
    x = torch.randint(-2, 3, (3, 8), generator=gen).float()
    trace = head.shortlists(x)  # one tensor feeds every level
    assert [ids.shape[1] for ids, _ in trace] == [3, 2 * 4, 3 * 6]
    ref = []
    reference.beam_search([x] * 3, list(head.weights), list(head.biases), tree.offsets, [2, 3], head.max_children, 0,
                          "leaf", score_fn=reference.shortlist_score, block_score_fn=reference.block_score,
                          topk_fn=reference.topk, trace=ref)
    for (ids, logits), (ref_ids, ref_logits) in zip(trace, ref):
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(logits, ref_logits)
    labels, _ = head.search(x, k=4)
    last_ids = trace[-1][0]
    for b in range(3):  # every label found is one of the last level's candidates
        found = {int(head.perm[i]) for i in last_ids[b] if i >= 0}
        assert {int(lab) for lab in labels[b] if lab >= 0} <= found


def test_flat_head_and_bf16_tables():
    tree = SimpleNamespace(offsets=[], perm=torch.arange(9).flip(0))
    head = cx.CascadeHead(tree, dim=4, beams=(), dtype=torch.bfloat16)
    assert head.weights[0].dtype == torch.bfloat16 and head.level_sizes == [9]
    x = torch.randn(2, 4)
    labels, scores = head.search(x, k=12)
    assert labels.shape == (2, 12) and (labels[:, 9:] == -1).all() and torch.isneginf(scores[:, 9:]).all()
    logits = x @ head.weights[0].float().T + head.biases[0].float()
    best = torch.argsort(logits, dim=1, descending=True, stable=True)
    assert torch.equal(labels[:, :9], head.perm[best])


def test_bad_configurations():
    tree = hand_made_tree()
    with pytest.raises(ValueError, match="dim needs one entry per level"):
        cx.CascadeHead(tree, dim=(4, 4), beams=(2, 3))
    with pytest.raises(ValueError, match="beams needs one entry per level but the last"):
        cx.CascadeHead(tree, dim=4, beams=(2,))
    with pytest.raises(ValueError, match="combine must be"):
        cx.CascadeHead(tree, dim=4, beams=(2, 3), combine="mean")
    with pytest.raises(ValueError, match="last level has 20 nodes but its permutation 19"):
        cx.CascadeHead(SimpleNamespace(offsets=tree.offsets, perm=torch.arange(19)), dim=4, beams=(2, 3))
    head = cx.CascadeHead(tree, dim=4, beams=(2, 3))
    with pytest.raises(ValueError, match="one \\[B, D\\] tensor per level"):
        head.search([torch.randn(2, 4)] * 2, k=3)


def csr(rows):
    offsets = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    return offsets, torch.tensor([i for r in rows for i in r], dtype=torch.long)


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_loss_teacher_forces_positives_and_matches_manual_bce(sparse_grad):
    gen = torch.Generator().manual_seed(4)
    tree = hand_made_tree()
    head = cx.CascadeHead(tree, dim=6, beams=(2, 3), sparse_grad=sparse_grad)
    x = torch.randn(3, 6, generator=gen)
    labels = [[int(tree.perm[0]), int(tree.perm[15])], [], [int(tree.perm[19])]]  # tree positions 0, 15 and 19
    loss, trace = head.loss(x, csr(labels), level_weights=(1.0, 0.5, 2.0), return_shortlists=True)
    # Positions 0 (node 0 -> 0), 15 (node 5 -> 2) and 19 (node 6 -> 2) must be in the last level's shortlist.
    last_ids = trace[-1][0]
    assert 0 in last_ids[0].tolist() and 15 in last_ids[0].tolist() and 19 in last_ids[2].tolist()
    manual = 0.0
    level_targets = head.level_positives(csr(labels))
    for level, ((ids, _), weight) in enumerate(zip(trace, (1.0, 0.5, 2.0))):
        offsets, pos_ids = level_targets[level]
        manual = manual + weight * reference.shortlist_bce(x, head.weights[level], head.biases[level], ids, offsets,
                                                           pos_ids)[0]
    torch.testing.assert_close(loss, manual)
    loss.backward()
    for w in head.weights:
        assert w.grad is not None and w.grad.is_sparse == sparse_grad


def test_loss_trains_the_head():
    torch.manual_seed(0)
    tree = hand_made_tree()
    head = cx.CascadeHead(tree, dim=8, beams=(2, 4), sparse_grad=True)
    x = torch.randn(6, 8)
    labels = [[int(tree.perm[i % 20])] for i in range(0, 18, 3)]
    opt = cx.SparseAdamW(head.parameters(), lr=0.05, weight_decay=0.0)
    first = None
    for _ in range(60):
        loss = head.loss(x, csr(labels))
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.2 * first
    found, _ = head.search(x, k=1)
    assert found[:, 0].tolist() == [r[0] for r in labels]


def test_loss_rejects_unknown_labels():
    head = cx.CascadeHead(hand_made_tree(), dim=4, beams=(2, 3))
    with pytest.raises(ValueError, match=r"positive label ids must lie in \[0, 20\)"):
        head.loss(torch.randn(1, 4), csr([[20]]))


def test_head_on_a_built_label_tree():
    # Labels in 8 planted clusters; a head trained on "document i has label i" must find it again by search.
    gen = torch.Generator().manual_seed(7)
    centres = torch.randn(8, 16, generator=gen)
    features = (centres.repeat_interleave(25, 0) + 0.1 * torch.randn(200, 16, generator=gen)).numpy()
    tree = cx.LabelTree.build(features, level_sizes=(8,))
    head = cx.CascadeHead(tree, dim=16, beams=(3,), sparse_grad=True)
    labels = torch.arange(0, 200, 20)
    x = torch.randn(labels.numel(), 16, generator=gen)
    positives = (torch.arange(labels.numel() + 1), labels)
    opt = cx.SparseAdamW(head.parameters(), lr=0.05, weight_decay=0.0)
    for _ in range(80):
        head.loss(x, positives).backward()
        opt.step()
        opt.zero_grad()
    found, _ = head.search(x, k=1)
    assert torch.equal(found[:, 0], labels)
