"""Encoder features computed once per document (frozen-encoder training) and cached on disk.

``embed_texts(model, texts)`` runs ``model.encode`` over every text without gradients, in eval mode, in batches
of texts sorted by token count (so each batch pads to about its own length; the results go back to input
order) and returns float32 ``[N, S, H]``. ``cached_features`` stores that array as ``<key>.npy``, the key a hash
of everything the features depend on: the encoder's weights and class, the tokenizer's vocabulary,
``feature_layers``, ``pooling``, ``max_length`` and the texts themselves; any change makes a new key (and file).
Files are written to a temporary name and renamed, so a crash never leaves a truncated cache file behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

FEATURES_VERSION = 1


def default_cache_root() -> Path:
    """``$CASCADEXML_FAST_CACHE``, else ``$XDG_CACHE_HOME/cascadexml_fast``, else ``~/.cache/cascadexml_fast``
    (the WN-Nouns cache lives under the same root)."""
    root = os.environ.get("CASCADEXML_FAST_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "cascadexml_fast"


def hash_texts(texts: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(len(texts)).encode())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def hash_module(module: torch.nn.Module) -> str:
    """A hash of a module's class and every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tokenizer_id(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        h.update(f"{index}:{token}\n".encode("utf-8", "surrogatepass"))
    h.update(repr(getattr(tokenizer, "do_lower_case", None)).encode())
    return h.hexdigest()


def feature_key(model, texts: Sequence[str], *, encoder_hash: Optional[str] = None) -> str:
    """The cache key of `model.encode`'s features of `texts`."""
    parts = dict(
        version=FEATURES_VERSION,
        encoder=encoder_hash or hash_module(model.encoder),
        tokenizer=_tokenizer_id(model.tokenizer),
        layers=list(model.feature_layers),
        pooling=model.config.pooling,
        max_length=model.config.max_length,
        model_type=getattr(model, "MODEL_TYPE", type(model).__name__),
        texts=hash_texts(texts),
    )
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def token_lengths(model, texts: Sequence[str], chunk: int = 4096) -> np.ndarray:
    """Tokens per text after truncation (only used to order the batches)."""
    out = np.zeros(len(texts), dtype=np.int64)
    for start in range(0, len(texts), chunk):
        encoded = model.tokenizer(list(texts[start:start + chunk]), truncation=True,
                                  max_length=model.config.max_length)["input_ids"]
        out[start:start + chunk] = [len(ids) for ids in encoded]
    return out


@torch.no_grad()
def embed_texts(model, texts: Sequence[str], batch_size: int = 128,
                progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """float32 ``[N, S, H]`` = ``model.encode(model.tokenize(...))`` of every text, in input order.

    Runs in eval mode (the caller's mode is restored) on the model's device, in batches of length-sorted texts.
    `progress(n)` is called with the number of documents finished by each batch."""
    texts = list(texts)
    S, H = len(model.feature_layers), model.hidden_size
    out = np.zeros((len(texts), S, H), dtype=np.float32)
    if not texts:
        return out
    order = np.argsort(token_lengths(model, texts), kind="stable")
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            features = model.encode(model.tokenize([texts[i] for i in rows]))
            out[rows] = features.float().cpu().numpy()
            if progress is not None:
                progress(len(rows))
    finally:
        model.train(was_training)
    return out


def _write_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cached_features(model, texts: Sequence[str], cache_dir, *, batch_size: int = 128, desc: str = "embed",
                    show_progress: bool = True, encoder_hash: Optional[str] = None):
    """(features [N, S, H] float32 (memory-mapped from the cache), info) where info = {"key", "path",
    "cache": "hit" | "miss", "seconds"}; computes and stores them on a miss."""
    t0 = time.perf_counter()
    key = feature_key(model, texts, encoder_hash=encoder_hash)
    path = Path(cache_dir) / f"features-{key}.npy"
    expected = (len(texts), len(model.feature_layers), model.hidden_size)
    if path.is_file():
        try:
            features = np.load(path, mmap_mode="r")
            if features.shape == expected and features.dtype == np.float32:
                return features, dict(key=key, path=str(path), cache="hit", seconds=time.perf_counter() - t0)
        except (ValueError, OSError):
            pass  # unreadable: recompute below and overwrite it
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=desc, unit="doc", dynamic_ncols=True)
    try:
        features = embed_texts(model, texts, batch_size=batch_size, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    _write_atomic(path, features)
    return features, dict(key=key, path=str(path), cache="miss", seconds=time.perf_counter() - t0)
