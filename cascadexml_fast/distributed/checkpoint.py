"""Sharded checkpoints of a ShardedCascadeHead (and its sparse optimizer's state), re-loadable on any number of
ranks.

Layout of a checkpoint directory:

    index.json                          format, version, world size, level sizes, dims, dtype, beams, combine,
                                        the row boundaries of every level (shard r holds rows [b[r], b[r+1])),
                                        every tensor's global shape and dtype, the shard files, and the optimizer's
                                        replicated state (class, hyper-parameters, per-table step counts)
    tree.safetensors                    offsets.<level>, perm (the tree; written by rank 0)
    shard-<r>-of-<R>.safetensors        rank r's rows: weights.<level>, biases.<level>, and optimizer state that
                                        has one row per table row: optim.<param>.<state> (exp_avg, exp_avg_sq,
                                        8-bit codes and scales, last_step, row-wise sums)
    replicated.safetensors              optimizer state tensors that are not per row (lr_history), rank 0's copy

Every rank writes its shard to a temporary name and renames it; after a barrier rank 0 writes the tree and, last,
index.json, so a directory with an index is complete. Loading on R' ranks computes the R' boundaries (the same
rule, `shard_boundaries`) and reads, for each level, only the row slices of the old shards that overlap the new
range (safetensors slices: the whole table is never read by one rank).
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Union

import torch

from ..layers import CascadeHead
from .head import ShardedCascadeHead

FORMAT_NAME = "cascadexml_fast.ShardedCascadeHead"
FORMAT_VERSION = 1
INDEX = "index.json"
TREE_FILE = "tree.safetensors"
REPLICATED_FILE = "replicated.safetensors"
# Optimizer state with one entry (row) per table row: sharded like the table. Anything else is replicated.
ROW_STATE = ("exp_avg", "exp_avg_sq", "last_step", "exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes",
             "exp_avg_sq_scales", "sum")


def shard_file(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a sharded checkpoint")
    return value


def _param_names(head: ShardedCascadeHead) -> Dict[int, str]:
    names = {id(w): f"weights.{level}" for level, w in enumerate(head.weights)}
    if head.biases is not None:
        names.update({id(b): f"biases.{level}" for level, b in enumerate(head.biases)})
    return names


def _level_of(name: str) -> int:
    return int(name.rsplit(".", 1)[1])


def _write_safetensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_sharded(head: ShardedCascadeHead, directory: Union[str, os.PathLike], optimizer=None) -> Path:
    """Write `head` (and the state `optimizer` holds for its parameters: SparseAdamW or SparseRowwiseAdagrad) as a
    sharded checkpoint. Collective: every rank calls it with the same directory (a filesystem all ranks see)."""
    comm = head.comm
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with comm.guard("save_sharded"):
        names = _param_names(head)
        tensors: Dict[str, torch.Tensor] = {}
        for level, w in enumerate(head.weights):
            tensors[f"weights.{level}"] = w
            if head.biases is not None:
                tensors[f"biases.{level}"] = head.biases[level]
        optim_info = None
        replicated: Dict[str, torch.Tensor] = {}
        if optimizer is not None:
            groups = []
            for group in optimizer.param_groups:
                hyper = {k: v for k, v in group.items() if k != "params"}
                hyper = json.loads(json.dumps(hyper, default=str))
                groups.append(dict(hyper, params=[names[id(p)] for p in group["params"] if id(p) in names]))
            scalars: Dict[str, dict] = {}
            for p, state in optimizer.state.items():
                name = names.get(id(p))
                if name is None:
                    continue
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and key in ROW_STATE:
                        tensors[f"optim.{name}.{key}"] = value
                    elif isinstance(value, torch.Tensor):
                        replicated[f"{name}.{key}"] = value
                    else:
                        scalars.setdefault(name, {})[key] = value
            optim_info = dict(cls=type(optimizer).__name__, param_groups=groups, scalars=scalars,
                              row_state=sorted({k.split(".")[-1] for k in tensors if k.startswith("optim.")}))
        _write_safetensors(d / shard_file(comm.rank, comm.world_size), tensors)
        comm.barrier()
        if comm.rank == 0:
            tree = {f"offsets.{level}": o for level, o in enumerate(head.offsets)}
            tree["perm"] = head.perm
            _write_safetensors(d / TREE_FILE, tree)
            if replicated:
                _write_safetensors(d / REPLICATED_FILE, replicated)
            elif (d / REPLICATED_FILE).exists():
                (d / REPLICATED_FILE).unlink()
            shapes = {}
            for level in range(head.num_levels):
                n, dim = head.level_sizes[level], head.dims[level]
                shapes[f"weights.{level}"] = dict(shape=[n, dim], dtype=_dtype_name(head.weights[level].dtype))
                if head.biases is not None:
                    shapes[f"biases.{level}"] = dict(shape=[n], dtype=_dtype_name(head.biases[level].dtype))
            index = dict(format=FORMAT_NAME, version=FORMAT_VERSION, world_size=comm.world_size,
                         level_sizes=head.level_sizes, dims=head.dims, beams=head.beams, combine=head.combine,
                         bias=head.biases is not None, sparse_grad=head.sparse_grad,
                         dtype=_dtype_name(head.weights[0].dtype), boundaries=head.boundaries, tensors=shapes,
                         files=[shard_file(r, comm.world_size) for r in range(comm.world_size)],
                         optimizer=optim_info)
            from ..training.checkpoint import write_text_atomic

            write_text_atomic(d / INDEX, json.dumps(index, indent=1))
            keep = set(index["files"])
            for stale in d.glob("shard-*-of-*.safetensors"):
                if stale.name not in keep:
                    stale.unlink()
        comm.barrier()
    return d


def read_index(directory: Union[str, os.PathLike]) -> dict:
    path = Path(directory) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete sharded checkpoint (no {INDEX})")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} checkpoint (format {index.get('format')!r})")
    if not isinstance(index.get("version"), int) or index["version"] > FORMAT_VERSION:
        raise ValueError(f"{path} has version {index.get('version')!r}; this package reads <= {FORMAT_VERSION}")
    return index


def _read_tree(directory: Path, index: dict) -> SimpleNamespace:
    from safetensors.torch import load_file

    tree = load_file(str(directory / TREE_FILE))
    offsets = [tree[f"offsets.{level}"] for level in range(len(index["level_sizes"]) - 1)]
    return SimpleNamespace(offsets=offsets, perm=tree["perm"])


def read_rows(directory: Union[str, os.PathLike], index: dict, name: str, level: int, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of the sharded tensor `name` (a table, a bias or a per-row optimizer state of `level`), read
    from the old shards that overlap them (and only those rows of them)."""
    from safetensors import safe_open

    d = Path(directory)
    old = index["boundaries"][level]
    parts: List[torch.Tensor] = []
    for r, file in enumerate(index["files"]):
        a, b = old[r], old[r + 1]
        start, end = max(lo, a), min(hi, b)
        if start >= end and (parts or r + 1 < len(index["files"])):
            continue  # no overlap (the last shard is opened anyway if nothing was read, for an empty result)
        with safe_open(str(d / file), framework="pt") as f:
            if name not in f.keys():
                raise KeyError(f"{d / file} holds no tensor {name!r}")
            piece = f.get_slice(name)
            parts.append(piece[start - a:end - a] if start < end else piece[0:0])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def load_sharded(directory: Union[str, os.PathLike], group=None, *, device=None, boundaries=None,
                 sparse_grad: Optional[bool] = None) -> ShardedCascadeHead:
    """This rank's ShardedCascadeHead from a sharded checkpoint written on any number of ranks (collective only
    in that every rank of `group` builds its shard; nothing is exchanged)."""
    d = Path(directory)
    index = read_index(d)
    tree = _read_tree(d, index)
    head = ShardedCascadeHead(tree, index["dims"], index["beams"], group=group, combine=index["combine"],
                              bias=index["bias"],
                              sparse_grad=index["sparse_grad"] if sparse_grad is None else sparse_grad,
                              dtype=_dtype(index["dtype"]), device=device, boundaries=boundaries, _initialize=False)
    with torch.no_grad():
        for level in range(head.num_levels):
            lo, hi = head.local_range(level)
            head.weights[level].copy_(read_rows(d, index, f"weights.{level}", level, lo, hi))
            if head.biases is not None:
                head.biases[level].copy_(read_rows(d, index, f"biases.{level}", level, lo, hi))
    return head


def load_sharded_optimizer(directory: Union[str, os.PathLike], head: ShardedCascadeHead, optimizer) -> None:
    """Restore the state the checkpoint holds for `head`'s parameters into `optimizer` (built over them, of the
    saved class): per-row state re-sharded to this rank's rows, replicated state as saved. Hyper-parameters
    (lr, betas, ...) stay as the optimizer was constructed."""
    d = Path(directory)
    index = read_index(d)
    info = index.get("optimizer")
    if info is None:
        raise ValueError(f"{d} holds no optimizer state")
    if info["cls"] != type(optimizer).__name__:
        raise ValueError(f"{d} holds {info['cls']} state, not {type(optimizer).__name__}")
    replicated = {}
    if (d / REPLICATED_FILE).exists():
        from safetensors.torch import load_file

        replicated = load_file(str(d / REPLICATED_FILE))
    names = _param_names(head)
    saved_names = {name for group in info["param_groups"] for name in group["params"]}
    with safe_keys(d / index["files"][0]) as first_keys:
        row_keys = {key for key in first_keys if key.startswith("optim.")}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names.get(id(p))
            if name is None or name not in saved_names:
                continue
            level = _level_of(name)
            lo, hi = head.local_range(level)
            state = dict(info["scalars"].get(name, {}))
            for key in info["row_state"]:
                if f"optim.{name}.{key}" in row_keys:
                    state[key] = read_rows(d, index, f"optim.{name}.{key}", level, lo, hi).to(p.device)
            for key, value in replicated.items():
                owner, _, state_key = key.rpartition(".")
                if owner == name:
                    state[state_key] = value.to(p.device)
            if state:
                optimizer.state[p] = state


class safe_keys:
    """Context manager: the tensor names of a safetensors file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        from safetensors import safe_open

        self._f = safe_open(str(self.path), framework="pt")
        return set(self._f.keys())

    def __exit__(self, *exc):
        self._f = None
        return False


def load_full_head(directory: Union[str, os.PathLike], device=None) -> CascadeHead:
    """A single-process CascadeHead with the full tables of a sharded checkpoint (any number of shards)."""
    d = Path(directory)
    index = read_index(d)
    tree = _read_tree(d, index)
    head = CascadeHead(tree, index["dims"], index["beams"], combine=index["combine"], bias=index["bias"],
                       sparse_grad=index["sparse_grad"], dtype=_dtype(index["dtype"]), device=device)
    with torch.no_grad():
        for level, n in enumerate(index["level_sizes"]):
            head.weights[level].copy_(read_rows(d, index, f"weights.{level}", level, 0, n))
            if head.biases is not None:
                head.biases[level].copy_(read_rows(d, index, f"biases.{level}", level, 0, n))
    return head
