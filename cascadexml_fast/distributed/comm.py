"""The collectives the sharded head uses, on torch.distributed (gloo on CPU, NCCL on GPU), and nothing else.

- ``Comm``: one process group (or none: a single process, every collective a no-op) with the few collectives the
  head needs: all-gather of rows of different lengths, the same with autograd (backward = reduce-scatter),
  all-gather of fixed-size candidate lists, sum all-reduce. Every call goes through ``torch.distributed.<name>``
  looked up at call time (so a benchmark can wrap those functions to measure the bytes moved) and is counted in
  ``Comm.meter`` (op, payload bytes).
- Failures (``guard``): a rank that raises inside a guarded block (every collective method of the sharded head
  is one) publishes "rank r: what: error" in the process group's store, tries to tear its process group down and
  re-raises. Its peers may be blocked in a collective with it, and with gloo an alive process keeps its sockets
  open (tearing the group down does not close them while e.g. a DDP still references it), so once the first
  guard has agreed the group's report key, gloo collectives are issued asynchronously and waited for while the
  store is polled (every 50 ms; a reduce-scatter becomes an all-reduce, as gloo's only progresses in wait()): the
  peers see the report and raise ``PeerFailure`` naming the failed rank and its error within a fraction of a
  second. A rank that dies without a word (killed, segfault) closes its connections, and one that hangs makes the
  collective time out (``init_process_group(timeout=...)``; ``init_distributed`` sets it): both surface as a
  ``PeerFailure`` that says no rank reported an error. Collectives outside our control (DDP's gradient
  all-reduce) are bounded by the process group's timeout only. On NCCL the collectives run synchronously on the
  stream (no polling: it would sync the host), and NCCL's watchdog enforces the timeout.
- ``sum_gradients_hook``: a DDP communication hook that sums gradients instead of averaging them. The sharded
  head computes the loss of the *global* batch, split by label ownership over the ranks, so the gradient of a
  replicated (data-parallel) parameter is the sum of the ranks' gradients, not their mean.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

FAILURE_KEY = "cascadexml_fast/failure"
_COLLECTIVE_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "broken pipe",
                     "collective", "process group", "processgroup", "watchdog")


# (process group, failure-report key) pairs; a list, not a dict: process groups are compared by identity
_FAILURE_TOKENS: List[Tuple[object, str]] = []


class PeerFailure(RuntimeError):
    """Raised on every rank whose collective failed because another rank failed (or hung, or died)."""


class CollectiveError(RuntimeError):
    """A torch.distributed call raised (wrapped so that guards can tell it from a local error)."""


@dataclass
class CommMeter:
    """Bytes moved by the collectives, per op: `payload` is the bytes this rank contributes plus the bytes it
    receives as the collective's result (what the op's tensors hold), `wire` the bytes one rank sends under the
    standard ring algorithms ((R-1)/R of the gathered or scattered whole; 2 (R-1)/R of an all-reduced buffer)."""

    calls: Dict[str, int] = field(default_factory=dict)
    payload: Dict[str, int] = field(default_factory=dict)
    wire: Dict[str, float] = field(default_factory=dict)

    def add(self, op: str, payload: int, wire: float) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        self.payload[op] = self.payload.get(op, 0) + int(payload)
        self.wire[op] = self.wire.get(op, 0.0) + float(wire)

    def reset(self) -> None:
        self.calls.clear()
        self.payload.clear()
        self.wire.clear()

    def total_wire(self) -> float:
        return float(sum(self.wire.values()))

    def as_dict(self) -> dict:
        return dict(calls=dict(self.calls), payload=dict(self.payload), wire=dict(self.wire))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """Collectives over `group` (None: the default group if torch.distributed is initialised, else a single
    process)."""

    def __init__(self, group=None):
        self.initialized = dist.is_available() and dist.is_initialized()
        if group is not None and not self.initialized:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        self.group = group
        self.world_size = dist.get_world_size(group) if self.initialized else 1
        self.rank = dist.get_rank(group) if self.initialized else 0
        self.global_rank = dist.get_rank() if self.initialized else 0
        self.backend = dist.get_backend(group) if self.initialized else None
        self.meter = CommMeter()
        self._failure_token: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.initialized and self.world_size > 1

    # ---- raw collectives (each wrapped so that a failure is a CollectiveError)
    def _call(self, name: str, fn, *args, **kwargs):
        """Run torch.distributed.<name> (`fn`). On gloo, once a guard has agreed the group's report key, it runs
        asynchronously and is waited for while the store is polled for a failure report, so that a peer that
        raised (and is still alive, so its sockets stay open) stops this rank at once instead of after the
        process group's timeout (also outside a guard, e.g. the feature-gradient exchange in backward)."""
        try:
            if not self._polling():
                return fn(*args, **kwargs)
            work = fn(*args, async_op=True, **kwargs)
            self._wait(work)
            return None
        except PeerFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with its origin
            raise CollectiveError(f"torch.distributed.{name} failed on rank {self.rank}: {exc}") from exc

    def _polling(self) -> bool:
        return self._failure_token is not None and self.backend == "gloo" and self._store() is not None

    def _wait(self, work) -> None:
        started = time.monotonic()
        next_check = started + 0.02
        nap = 0.0
        while not work.is_completed():
            now = time.monotonic()
            if now >= next_check:
                report = self.read_failure(wait_s=0.0)
                if report is not None:
                    error = PeerFailure(f"rank {self.rank} stopped because another rank failed: {report}")
                    error._cxf_reported = True
                    raise error
                next_check = now + 0.05
            time.sleep(nap)
            nap = min(0.002, nap * 2 if nap else 1e-5)
        work.wait()  # raises the collective's own error (e.g. gloo's timeout or a closed connection)

    def all_gather_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """[R * n, ...]: every rank's x (same shape everywhere), in rank order."""
        x = x.contiguous()
        if not self.distributed:
            return x.clone()
        out = x.new_empty((self.world_size * x.shape[0],) + tuple(x.shape[1:]))
        name, fn = _dist_fn("all_gather_single", "all_gather_into_tensor")
        self._call(name, fn, out, x, group=self.group)
        R = self.world_size
        self.meter.add("all_gather", _nbytes(x) + _nbytes(out), (R - 1) * _nbytes(x))
        return out

    def reduce_scatter_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """x [R * n, ...] summed over ranks; this rank's block [n, ...]. On gloo under a guard this is an all-reduce
        and a slice: gloo's reduce-scatter only progresses inside wait(), so it could not be interrupted by a
        peer's failure report (twice the bytes, on the small feature gradients only)."""
        x = x.contiguous()
        if not self.distributed:
            return x.clone()
        R = self.world_size
        n = x.shape[0] // R
        if self._polling():
            summed = self.all_reduce_sum(x.clone())
            return summed[self.rank * n:(self.rank + 1) * n].clone()
        out = x.new_empty((n,) + tuple(x.shape[1:]))
        name, fn = _dist_fn("reduce_scatter_single", "reduce_scatter_tensor")
        self._call(name, fn, out, x, group=self.group)
        self.meter.add("reduce_scatter", _nbytes(x) + _nbytes(out), (R - 1) * _nbytes(out))
        return out

    def all_to_all_rows(self, x: torch.Tensor, send_rows: List[int], recv_rows: List[int]) -> torch.Tensor:
        """Rows [sum(send_rows[:r]), sum(send_rows[:r+1])) of x go to rank r; returns what the ranks sent here,
        [sum(recv_rows), ...] in rank order."""
        x = x.contiguous()
        if not self.distributed:
            return x.clone()
        out = x.new_empty((sum(recv_rows),) + tuple(x.shape[1:]))
        self._call("all_to_all_single", dist.all_to_all_single, out, x, list(recv_rows), list(send_rows),
                   group=self.group)
        row = _nbytes(x) // max(x.shape[0], 1) if x.shape[0] else 0
        sent = sum(n for r, n in enumerate(send_rows) if r != self.rank) * row
        self.meter.add("all_to_all", _nbytes(x) + _nbytes(out), sent)
        return out

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """In place, and returned."""
        if not self.distributed:
            return x
        self._call("all_reduce", dist.all_reduce, x, group=self.group)
        R = self.world_size
        self.meter.add("all_reduce", 2 * _nbytes(x), 2 * (R - 1) / R * _nbytes(x))
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if not self.distributed:
            return x
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        self._call("broadcast", dist.broadcast, x, src=global_src, group=self.group)
        self.meter.add("broadcast", _nbytes(x), _nbytes(x) if self.rank == src else 0)
        return x

    def barrier(self) -> None:
        if self.distributed:
            self._call("barrier", dist.barrier, group=self.group)

    # ---- composite collectives
    def all_gather_sizes(self, values: Sequence[int], device) -> torch.Tensor:
        """int64 [R, len(values)] of every rank's values."""
        mine = torch.tensor(list(values), dtype=torch.int64, device=device).reshape(1, -1)
        return self.all_gather_tensor(mine)

    def all_gather_rows(self, x: torch.Tensor, sizes: Optional[List[int]] = None) -> Tuple[torch.Tensor, List[int]]:
        """Concatenation over ranks (rank order) of x [n_r, ...], the n_r differing; returns it and the n_r."""
        if not self.distributed:
            return x, [x.shape[0]]
        if sizes is None:
            sizes = self.all_gather_sizes([x.shape[0]], x.device)[:, 0].tolist()
        most = max(sizes)
        padded = x.new_zeros((most,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = self.all_gather_tensor(padded)
        if all(n == most for n in sizes):
            return gathered, sizes
        parts = [gathered[r * most: r * most + n] for r, n in enumerate(sizes)]
        return torch.cat(parts), sizes

    def gather_rows_autograd(self, x: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """all_gather_rows with a gradient: backward sums the global gradient over ranks (reduce-scatter) and
        keeps this rank's rows."""
        if not self.distributed:
            return x
        return _GatherRows.apply(x, self, tuple(sizes))

    # ---- failures
    def _store(self):
        if not self.initialized:
            return None
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - private API; without a store failures are still reported, less precisely
            return None

    def failure_key(self) -> str:
        """The store key of failure reports for this process group (agreed once per group, by a broadcast at the
        first guarded call: every Comm on the group shares it, so a report published under one object's guard,
        e.g. the trainer's, stops a peer waiting under another's, e.g. the head's)."""
        if self._failure_token is None:
            group = self.group if self.group is not None else dist.group.WORLD
            cached = next((token for pg, token in _FAILURE_TOKENS if pg is group), None)
            if cached is None:
                # random, so that a report left in a long-lived store by an earlier run (torchrun restarts keep
                # the store) is never taken for a current one; os.urandom, not torch's generator, which would
                # shift rank 0's random stream
                value = int.from_bytes(os.urandom(7), "little") if self.rank == 0 else 0
                token = torch.tensor([value], dtype=torch.int64)
                if self.distributed:
                    token = token.to(_device_of(self.group))
                    self.broadcast(token, 0)
                cached = f"{FAILURE_KEY}/{int(token.item())}"
                _FAILURE_TOKENS.append((group, cached))
            self._failure_token = cached
        return self._failure_token

    def publish_failure(self, message: str) -> None:
        store = self._store()
        if store is None or self._failure_token is None:
            return
        with contextlib.suppress(Exception):
            store.set(self._failure_token, message)

    def read_failure(self, wait_s: float = 2.0) -> Optional[str]:
        store = self._store()
        if store is None or self._failure_token is None:
            return None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if store.check([self._failure_token]):
                    return store.get(self._failure_token).decode("utf-8", "replace")
            except Exception:  # noqa: BLE001 - the store itself may be gone with the failed rank
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def abort(self) -> None:
        """Tear this rank's process group down, so that peers blocked in a collective with it fail now."""
        if not self.initialized:
            return
        with contextlib.suppress(Exception):
            if self.group is None or self.group == dist.group.WORLD:
                dist.destroy_process_group()
            else:
                dist.destroy_process_group(self.group)
        self.initialized = False

    @contextlib.contextmanager
    def guard(self, what: str, abort: bool = True) -> Iterator[None]:
        """Run a block whose collectives must not hang when one rank fails: see the module doc."""
        if not self.distributed:
            yield
            return
        self.failure_key()
        try:
            yield
        except PeerFailure:
            raise
        except BaseException as exc:
            if getattr(exc, "_cxf_reported", False):
                raise
            if _is_collective_error(exc):
                report = self.read_failure(wait_s=0.5)
                if report is not None:
                    error = PeerFailure(f"{what} on rank {self.rank} stopped because another rank failed: {report}")
                else:
                    error = PeerFailure(
                        f"{what} on rank {self.rank}: a collective failed and no rank reported an error, so a peer "
                        f"died or hung past the process group's timeout ({exc})")
                error._cxf_reported = True
                if abort:
                    self.abort()
                raise error from exc
            self.publish_failure(f"rank {self.rank}: {what}: {type(exc).__name__}: {exc}")
            exc._cxf_reported = True
            if abort:
                self.abort()
            raise


def _dist_fn(*names):
    """(name, torch.distributed.<name>) of the first that exists, looked up now (torch 2.13 renamed
    all_gather_into_tensor / reduce_scatter_tensor to all_gather_single / reduce_scatter_single)."""
    for name in names:
        fn = getattr(dist, name, None)
        if fn is not None:
            return name, fn
    raise RuntimeError(f"torch.distributed has none of {names}")


def _is_collective_error(exc: BaseException) -> bool:
    if isinstance(exc, CollectiveError):
        return True
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in _COLLECTIVE_WORDS)


def _device_of(group) -> torch.device:
    """The device collectives of `group` run on: CUDA for NCCL, CPU otherwise."""
    backend = dist.get_backend(group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm: Comm, sizes):
        ctx.comm, ctx.sizes = comm, sizes
        gathered, _ = comm.all_gather_rows(x.detach(), list(sizes))
        return gathered

    @staticmethod
    def backward(ctx, grad):
        comm, sizes = ctx.comm, ctx.sizes
        most = max(sizes)
        grad = grad.contiguous()
        if all(n == most for n in sizes):
            padded = grad
        else:
            padded = grad.new_zeros((len(sizes) * most,) + tuple(grad.shape[1:]))
            start = 0
            for r, n in enumerate(sizes):
                padded[r * most: r * most + n] = grad[start: start + n]
                start += n
        mine = comm.reduce_scatter_tensor(padded)
        return mine[: sizes[comm.rank]], None, None


def sum_gradients_hook(process_group, bucket):
    """DDP communication hook: all-reduce (sum) the bucket without dividing by the world size (see module doc).
    Use: ``ddp.register_comm_hook(None, sum_gradients_hook)``."""
    group = process_group if process_group is not None else dist.group.WORLD
    future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


def sync_dense_gradients(parameters, comm: Comm, bucket_bytes: int = 25 * 2**20) -> None:
    """Sum the (dense) gradients of replicated parameters over the ranks, in flattened buckets (DDP's job without
    DDP). Parameters without a gradient, and sparse gradients, are skipped."""
    if not comm.distributed:
        return
    grads = [p.grad for p in parameters if p.grad is not None and not p.grad.is_sparse]
    bucket: List[torch.Tensor] = []
    size = 0

    def flush():
        nonlocal bucket, size
        if not bucket:
            return
        by_kind: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
        for g in bucket:
            by_kind.setdefault((g.dtype, g.device), []).append(g)
        for group in by_kind.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            comm.all_reduce_sum(flat)
            start = 0
            for g in group:
                g.copy_(flat[start: start + g.numel()].view_as(g))
                start += g.numel()
        bucket, size = [], 0

    for g in grads:
        bucket.append(g)
        size += _nbytes(g)
        if size >= bucket_bytes:
            flush()
    flush()


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> Tuple[int, int, int]:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); backend defaults to NCCL when CUDA is available, else gloo. On CUDA the rank's
    device is LOCAL_RANK. Returns (rank, world_size, local_rank). A no-op if already initialised."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise ValueError(f"--distributed needs torchrun's environment; missing {', '.join(missing)} (launch "
                             "with `torchrun --nproc-per-node N -m cascadexml_fast train --distributed ...`)")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), local_rank
