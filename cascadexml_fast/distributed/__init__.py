"""Past one GPU: label-sharded CascadeXML heads and data-parallel training on torch.distributed.

- `ShardedCascadeHead`: every level's table split by contiguous node ranges over the ranks; distributed top-k
  merges make `search` identical to the single-process CascadeHead.search, and `loss` the single-process loss of
  the global batch, with row-sparse gradients that stay on the owning rank (see head.py).
- `save_sharded` / `load_sharded` / `load_full_head`: per-rank safetensors + a json index, re-loadable on any
  number of ranks (checkpoint.py).
- `Comm`, `PeerFailure`, `sum_gradients_hook`, `sync_dense_gradients`, `init_distributed` (comm.py).

    torchrun --nproc-per-node 2 -m cascadexml_fast train --distributed --config run.yaml
"""
from .comm import (
    Comm, CommMeter, PeerFailure, init_distributed, sum_gradients_hook, sync_dense_gradients,
)
from .head import ShardedCascadeHead, backend_sigmoid, shard_boundaries
from .checkpoint import load_full_head, load_sharded, load_sharded_optimizer, save_sharded

__all__ = [
    "Comm",
    "CommMeter",
    "PeerFailure",
    "ShardedCascadeHead",
    "backend_sigmoid",
    "init_distributed",
    "load_full_head",
    "load_sharded",
    "load_sharded_optimizer",
    "save_sharded",
    "shard_boundaries",
    "sum_gradients_hook",
    "sync_dense_gradients",
]
