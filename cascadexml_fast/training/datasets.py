"""Data for training: the three sources of the config, the validation split, batches of CSR positives."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from .. import data as xmc_data
from ..data import XMCData


@dataclass
class Splits:
    train: XMCData
    test: Optional[XMCData]
    valid: Optional[XMCData]
    source: str

    @property
    def selection(self) -> Tuple[str, Optional[XMCData]]:
        """(name, data) of the split used for per-epoch evaluation and model selection."""
        if self.valid is not None:
            return "valid", self.valid
        return "test", self.test


def load_source(source: str, test_source: Optional[str] = None, unknown: str = "drop"):
    """(train, test or None) from "wn-nouns", a raw-text directory, or a JSON lines file (+ its test file)."""
    if source == "wn-nouns":
        return xmc_data.load_wn_nouns()
    path = Path(source)
    if path.is_dir():
        train, test = xmc_data.load_raw_text_dataset(path, unknown=unknown)
    elif path.is_file():
        train, test = xmc_data.read_jsonl(path), None
    else:
        raise FileNotFoundError(f"data: {source!r} is neither 'wn-nouns', a raw-text directory nor a JSON lines file")
    if test_source is not None:
        if test is not None:
            raise ValueError(f"test_data: {source} already holds a test split")
        test = xmc_data.read_jsonl(test_source, vocab=train.vocab, unknown=unknown)
    return train, test


def load_splits(config) -> Splits:
    train, test = load_source(config.data, config.test_data)
    if train.texts is None:
        raise ValueError(f"data: {config.data} holds no texts")
    if config.train_limit is not None and config.train_limit < train.n_docs:
        train = train.subset(np.arange(config.train_limit))
    if test is not None and config.test_limit is not None and config.test_limit < test.n_docs:
        test = test.subset(np.arange(config.test_limit))
    valid = None
    if config.valid_size:
        count = int(config.valid_size) if config.valid_size >= 1 else int(round(config.valid_size * train.n_docs))
        if not 0 < count < train.n_docs:
            raise ValueError(f"valid_size={config.valid_size} leaves {train.n_docs - count} of {train.n_docs} "
                             "training documents")
        # its own generator, so that the split depends on the seed only
        order = np.random.default_rng([config.seed, 7919]).permutation(train.n_docs)
        valid_rows, train_rows = np.sort(order[:count]), np.sort(order[count:])
        train, valid = train.subset(train_rows), train.subset(valid_rows)
    if valid is None and test is None:
        raise ValueError(f"data: {config.data} has no test split and valid_size is 0: nothing to evaluate on "
                         "(give test_data or valid_size)")
    return Splits(train=train, test=test, valid=valid, source=config.data)


def csr_rows(offsets: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """The CSR (offsets int64 [len(rows) + 1], ids int64) of the given rows of a CSR structure."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, ends = offsets[rows], offsets[rows + 1]
    lengths = ends - starts
    out_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_offsets[1:])
    gather = np.repeat(starts - out_offsets[:-1], lengths) + np.arange(out_offsets[-1], dtype=np.int64)
    return torch.from_numpy(out_offsets), torch.from_numpy(np.ascontiguousarray(ids[gather]))


LENGTH_GROUP_BATCHES = 32  # batches per length-sorted window: little padding, batches still well mixed


def epoch_order(seed: int, epoch: int, n: int, lengths: Optional[np.ndarray] = None,
                batch_size: Optional[int] = None) -> np.ndarray:
    """The document order of one epoch: a function of (seed, epoch) (and `lengths`) only, so a resumed run sees
    the same.

    With `lengths` (tokens per document) and `batch_size`: grouped by length. The shuffled order is cut into
    windows of LENGTH_GROUP_BATCHES batches, each window is sorted by length (stable), the full batches of all
    windows are shuffled again and the one partial batch (if any) goes last, so every batch holds documents of
    similar length (less padding) while the batches of an epoch still come in random order."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(n)
    if lengths is None:
        return order
    lengths = np.asarray(lengths)
    if lengths.shape != (n,):
        raise ValueError(f"lengths must have one entry per document ({n}), got shape {lengths.shape}")
    if batch_size is None or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 with lengths, got {batch_size!r}")
    window = batch_size * LENGTH_GROUP_BATCHES
    for start in range(0, n, window):
        chunk = order[start:start + window]
        order[start:start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    full = n // batch_size
    batches = order[:full * batch_size].reshape(full, batch_size)[rng.permutation(full)]
    return np.concatenate([batches.reshape(-1), order[full * batch_size:]])
