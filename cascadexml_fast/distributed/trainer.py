"""`cascadexml-fast train --distributed`: the Trainer on torch.distributed, one process per rank (torchrun).

The smallest change to the single-process Trainer (cascadexml_fast.training.trainer), made by overriding a few of
its steps, not by copying its loop:

- set-up: rank 0 prepares first (data, tree, feature cache, the initial model, which it writes to
  <output_dir>/.distributed/init-model, removed once loaded); the other ranks wait at a barrier and then load that
  model, so every rank starts from the same weights and reads warm caches. Ranks other than 0 print nothing and
  write their own files (log, config copy) under <output_dir>/.distributed/rank-<r>/.
- the head: the model's CascadeHead becomes a ShardedCascadeHead before the optimizers are built, so each rank's
  SparseAdamW holds only its rows (and their moments).
- a step: the global batch (config.batch_size documents, the same order as one process) is split into R
  contiguous parts; each rank encodes its part, the sharded loss gathers the features and positives of the whole
  batch, and the dense gradients (encoder, projections) are summed over the ranks before the optimizers step. The
  logged loss is the global batch's. Dropout draws from a generator seeded by (seed, global step, rank).
- evaluation: every rank runs the same documents through the sharded search (identical results everywhere).
- saving: the best model and the checkpoints are written by rank 0 in the single-process format (tables and the
  SparseAdamW moments gathered), so `evaluate`, `predict` and `--resume` work on them with any number of ranks
  (resuming re-shards them). For tables too big to gather on one rank, use distributed.save_sharded instead.

Not supported here: LightXML (its head is not sharded) and fp16 autocast with a GradScaler (bf16 or none).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

from ..training.datasets import csr_rows
from ..training.trainer import Trainer
from .checkpoint import ROW_STATE
from .comm import Comm, sync_dense_gradients
from .head import ShardedCascadeHead

DIST_DIR = ".distributed"


class DistributedTrainer(Trainer):
    """A Trainer whose label head is sharded over the ranks of `group` (the default group); see the module doc.
    Every rank constructs it with the same config and calls prepare() and train()."""

    def __init__(self, config, *, resume: bool = False, log: Callable[[str], None] = print, progress: bool = True,
                 group=None):
        self.comm = Comm(group)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        if config.model_type != "cascadexml":
            raise ValueError(f"--distributed trains model_type cascadexml (a sharded CascadeHead); got "
                             f"{config.model_type!r}")
        if self.rank != 0:
            log, progress = (lambda *_args, **_kwargs: None), False
        super().__init__(config, resume=resume, log=log, progress=progress)
        self.shared_out = Path(config.output_dir)
        if self.rank != 0:
            # this rank's own files; the checkpoints it resumes from are rank 0's (a link to them)
            self.out = self.shared_out / DIST_DIR / f"rank-{self.rank}"
            self.out.mkdir(parents=True, exist_ok=True)
            link = self.out / "checkpoints"
            if not link.exists() and not link.is_symlink():
                os.symlink(os.path.relpath(self.shared_out / "checkpoints", self.out), link)

    # ---- set-up
    @property
    def _init_model_dir(self) -> Path:
        return self.shared_out / DIST_DIR / "init-model"

    def prepare(self) -> "DistributedTrainer":
        with self.comm.guard("prepare"):  # a rank failing here stops the others at their barrier
            if self.rank == 0:
                super().prepare()
                self.comm.barrier()
            else:
                self.comm.barrier()  # rank 0 has prepared: caches are warm and the initial model is on disk
                super().prepare()
            self.comm.barrier()  # every rank has loaded the initial model
        if self.rank == 0 and self._init_model_dir.exists():
            shutil.rmtree(self._init_model_dir, ignore_errors=True)
        if self.amp.scaler is not None:
            raise ValueError("--distributed supports amp bf16 or none (fp16 needs a GradScaler whose skipped steps "
                             "would differ between ranks); set --amp bf16 or --amp none")
        self.say(f"distributed: {self.world_size} ranks ({self.comm.backend}); label tables sharded: "
                 + ", ".join(f"level {level} rows {self.model.head.local_range(level)}"
                             for level in range(self.model.head.num_levels)) + " on rank 0")
        return self

    def _build_model(self):
        if self.rank == 0:
            model = super()._build_model()
            model.save_pretrained(self._init_model_dir)
            return model
        from ..models import load_pretrained

        return load_pretrained(self._init_model_dir)

    def _build_optimizers(self) -> None:
        head = self.model.head
        if not isinstance(head, ShardedCascadeHead):
            self.model.head = ShardedCascadeHead.from_full(head, self.comm.group)
        super()._build_optimizers()
        self._dense_params = [p for optimizer in self.optimizers for group in optimizer.param_groups
                              for p in group["params"] if not _is_head_param(self.model.head, p)]
        self._sparse = [optimizer for optimizer in self.optimizers
                        if any(_is_head_param(self.model.head, p) for g in optimizer.param_groups for p in g["params"])]

    # ---- a step
    def _batch_loss(self, rows: np.ndarray) -> torch.Tensor:
        with self.comm.guard("training step (forward)"):
            return self._sharded_batch_loss(rows)

    def _sharded_batch_loss(self, rows: np.ndarray) -> torch.Tensor:
        parts = np.array_split(np.asarray(rows), self.world_size)
        local = parts[self.rank]
        train = self.splits.train
        positives = csr_rows(train.label_offsets, train.label_ids, local)
        seed = (int(self.config.seed) * 1_000_003 + int(self.state["global_step"])) * 4099 + self.rank
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.amp.context():
            torch.manual_seed(seed % (2**63 - 1))
            if self.config.freeze_encoder:
                features = torch.from_numpy(np.asarray(self.features["train"][local])).to(self.device)
                partial = self.model.loss_from_features(features, positives)
            elif len(local) == 0:
                S, H = len(self.model.feature_layers), self.model.hidden_size
                partial = self.model.loss_from_features(torch.zeros(0, S, H, device=self.device), positives)
            else:
                batch = self.model.tokenize([train.texts[i] for i in local])
                partial = self.model.loss(batch, positives)
        # the value logged is the global batch's loss; the gradient is this rank's part's
        total = self.model.head.global_loss(partial)
        return partial + (total - partial.detach())

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        with self.comm.guard("training step (backward and update)"):
            self._sharded_optimizer_step(loss)

    def _sharded_optimizer_step(self, loss: torch.Tensor) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in self._dense_params:  # every rank all-reduces the same buffers, touched or not
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        sync_dense_gradients(self._dense_params, self.comm)
        for optimizer in self.optimizers:
            optimizer.step()

    # ---- saving: rank 0 writes the single-process format
    @contextlib.contextmanager
    def _as_single_process(self, optimizers: bool):
        """Gather (all ranks) the full head and, with `optimizers`, the sparse optimizer's full state; inside the
        block rank 0's model holds the full head and its optimizers' state_dict() return the full states."""
        sharded = self.model.head
        full_head = sharded.to_full_head()
        states = [self._full_state_dict(opt) if opt in self._sparse else None for opt in self.optimizers] \
            if optimizers else []
        if self.rank == 0:
            self.model.head = full_head
            for optimizer, state in zip(self.optimizers, states):
                if state is not None:
                    optimizer.state_dict = (lambda s=state: s)
        try:
            yield self.rank == 0
        finally:
            if self.rank == 0:
                self.model.head = sharded
                for optimizer in self.optimizers:
                    optimizer.__dict__.pop("state_dict", None)

    def _full_state_dict(self, optimizer) -> dict:
        """optimizer.state_dict() with every per-row state tensor gathered to the full table (collective)."""
        head = self.model.head
        state = optimizer.state_dict()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        full = dict(state, state={})
        for index, p in enumerate(params):
            entry = state["state"].get(index)
            if entry is None:
                continue
            level = _level_of(head, p)
            full["state"][index] = {key: (head.gather_rows(level, value) if key in ROW_STATE and
                                          isinstance(value, torch.Tensor) else value)
                                    for key, value in entry.items()}
        return full

    def _shard_state_dict(self, optimizer, state: dict) -> dict:
        """The inverse: a full (single-process) state_dict cut to this rank's rows."""
        head = self.model.head
        params = [p for group in optimizer.param_groups for p in group["params"]]
        out = dict(state, state={})
        for index, entry in state["state"].items():
            p = params[int(index)]
            level = _level_of(head, p)
            lo, hi = head.local_range(level)
            out["state"][index] = {key: (value[lo:hi].clone() if key in ROW_STATE and isinstance(value, torch.Tensor)
                                         else value) for key, value in entry.items()}
        return out

    def save_model(self, directory: Path, extra=None) -> Path:
        with self._as_single_process(optimizers=False) as writer:
            if writer:
                return super().save_model(directory, extra)
        return Path(directory)

    def save_checkpoint(self) -> Path:
        with self._as_single_process(optimizers=True) as writer:
            if writer:
                return super().save_checkpoint()
        return self.out / "checkpoints"

    def _load_checkpoint(self, checkpoint: Path) -> None:
        originals: Dict[int, Callable] = {}
        for optimizer in self._sparse:
            load = optimizer.load_state_dict
            originals[id(optimizer)] = load
            optimizer.load_state_dict = (lambda state, o=optimizer, f=load: f(self._shard_state_dict(o, state)))
        try:
            super()._load_checkpoint(checkpoint)
        finally:
            for optimizer in self._sparse:
                optimizer.__dict__.pop("load_state_dict", None)

    def _finish(self, selection_name: str) -> dict:
        if self.rank == 0:
            return super()._finish(selection_name)
        return dict(best_epoch=self.state["best_epoch"], selection_split=selection_name,
                    selection_metrics=self.state["best_metrics"], model_dir=str(self.shared_out / "model"),
                    rank=self.rank)


def _is_head_param(head: ShardedCascadeHead, p) -> bool:
    return any(p is q for q in head.parameters())


def _level_of(head: ShardedCascadeHead, p) -> int:
    for level, w in enumerate(head.weights):
        if p is w:
            return level
    if head.biases is not None:
        for level, b in enumerate(head.biases):
            if p is b:
                return level
    raise ValueError("a sparse optimizer parameter that is not a table of the sharded head")


def run_distributed_train(config, *, resume: bool, progress: bool, timeout_s: float) -> dict:
    """Initialise the process group from torchrun's environment and train (every rank); rank 0's summary."""
    from .comm import init_distributed

    init_distributed(timeout_s=timeout_s)
    if config.device == "auto" and torch.cuda.is_available():
        config.device = f"cuda:{torch.cuda.current_device()}"
    trainer = DistributedTrainer(config, resume=resume, progress=progress)
    try:
        summary = trainer.prepare().train()
        trainer.comm.barrier()  # rank 0 may still be scoring the best model on the test set
        return summary
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


__all__: List[str] = ["DistributedTrainer", "run_distributed_train"]
