"""A small multi-process world for the distributed tests: N spawned processes, each in a gloo process group over
a FileStore, running module-level functions sent to them and sending back results or tracebacks, with timeouts
everywhere (a test can never hang: a world that does not answer in time is killed and the test fails)."""
from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback

import torch.multiprocessing as mp

_STOP = "stop"


def _serve(rank: int, world_size: int, root: str, pg_timeout_s: float, inbox, outbox) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    generation = 0

    def init(timeout_s: float) -> None:
        nonlocal generation
        if dist.is_initialized():
            dist.destroy_process_group()
        generation += 1
        store = dist.FileStore(os.path.join(root, f"store-{generation}"), world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))

    try:
        init(pg_timeout_s)
        outbox.put((rank, True, "ready"))
    except BaseException:  # noqa: BLE001
        outbox.put((rank, False, traceback.format_exc()))
        return
    while True:
        task = inbox.get()
        if task == _STOP:
            break
        kind, fn, args = task
        try:
            if kind == "reinit":
                init(*args)
                value = "ready"
            else:
                value = fn(rank, world_size, *args)
            outbox.put((rank, True, value))
        except BaseException:  # noqa: BLE001 - reported to the test
            outbox.put((rank, False, traceback.format_exc()))
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


class World:
    """`World(n)` starts n ranks; `world.run(fn, *args)` runs fn(rank, n, *args) on every rank and returns the
    results in rank order (raising AssertionError with the remote tracebacks if any rank raised)."""

    def __init__(self, n: int, *, pg_timeout_s: float = 30.0, start_timeout_s: float = 120.0):
        self.n = n
        self.root = tempfile.mkdtemp(prefix="cxf-dist-")
        ctx = mp.get_context("spawn")
        self.inboxes = [ctx.Queue() for _ in range(n)]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(r, n, self.root, pg_timeout_s, self.inboxes[r], self.outbox),
                                  daemon=True) for r in range(n)]
        for p in self.procs:
            p.start()
        self._collect(start_timeout_s, "start-up")

    def _collect(self, timeout_s: float, what: str, allow_errors: bool = False):
        deadline = time.monotonic() + timeout_s
        results = {}
        while len(results) < self.n:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise AssertionError(f"{what}: ranks {sorted(set(range(self.n)) - set(results))} did not answer "
                                     f"within {timeout_s:.0f} s (world killed)")
            try:
                rank, ok, value = self.outbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in results]
                if dead:
                    for r in dead:
                        results[r] = (False, f"process exited with code {self.procs[r].exitcode}")
                continue
            results[rank] = (ok, value)
        if not allow_errors:
            errors = {r: v for r, (ok, v) in results.items() if not ok}
            if errors:
                text = "\n".join(f"--- rank {r}:\n{v}" for r, v in sorted(errors.items()))
                raise AssertionError(f"{what} failed:\n{text}")
            return [results[r][1] for r in range(self.n)]
        return [results[r] for r in range(self.n)]

    def run(self, fn, *args, timeout_s: float = 60.0):
        for box in self.inboxes:
            box.put(("run", fn, args))
        return self._collect(timeout_s, fn.__name__)

    def run_allow_errors(self, fn, *args, timeout_s: float = 60.0):
        """Like run, but returns [(ok, value or traceback)] per rank."""
        for box in self.inboxes:
            box.put(("run", fn, args))
        return self._collect(timeout_s, fn.__name__, allow_errors=True)

    def reinit(self, pg_timeout_s: float = 30.0, timeout_s: float = 60.0):
        """A fresh process group (new store) on every rank, e.g. after a test that broke the old one."""
        for box in self.inboxes:
            box.put(("reinit", None, (pg_timeout_s,)))
        return self._collect(timeout_s, "reinit")

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)

    def close(self) -> None:
        for box in self.inboxes:
            try:
                box.put(_STOP)
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        self.kill()
