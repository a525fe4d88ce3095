"""Executors: one interface to run `fn(shared, item)` over items, in order, with few items in flight.

    with open_executor(workers=4) as ex:          # or scheduler="tcp://host:8786", or "local"
        handle = ex.share(pair)                   # shipped once per worker, not once per item
        for result in ex.map(certify_chunk, handle, chunks):
            ...                                   # results arrive in the order of `chunks`

- `InProcessExecutor` (`--workers 1`): a plain loop; tests and debugging.
- `LocalProcessExecutor` (`--workers N`): N spawned processes (spawn: no forked torch state, works
  the same on every OS). `share` pickles the object once into a private temporary file; each worker
  loads it the first time an item needs it and keeps it, so models cross the process boundary once
  per worker. A worker that dies (killed, out of memory) fails the run with `WorkerError`.
- `DaskExecutor` (`--scheduler ADDRESS`, `prunecert.scale.cluster`): tasks on a Dask distributed
  cluster; `share` broadcasts the object to every worker; a task lost with its worker is re-run
  elsewhere by the scheduler. `scheduler="local"` starts an embedded `LocalCluster`.

`map` keeps at most `window` items in flight and yields in order, so memory is bounded by the
window, not by the number of items: a caller that writes each result as it comes stays flat.
`fn` must be a module-level function (it is sent by reference).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

from prunecert.errors import ConfigError, PrunecertError
from prunecert.threads import threads_per_worker, usable_cores


T = TypeVar("T")  # an item
R = TypeVar("R")  # fn's result on one item
# fn's first argument is the object given to `share`; `map` receives the handle `share` returned (the
# object itself, a pickle's path, or a Dask future), which becomes that object again on the worker:
# no static type relates the two, hence Any
Task = Callable[[Any, T], R]
R_co = TypeVar("R_co", covariant=True)


class Pending(Protocol[R_co]):
    """A submitted item: a concurrent.futures or a Dask future."""

    def result(self) -> R_co: ...

    def cancel(self) -> bool: ...


class WorkerError(PrunecertError):
    """A worker process died (killed, out of memory) or could not start; the run stopped, nothing was written."""


class Executor:
    """Base: `share` an object with every worker, `map` a function over items in order."""

    kind = "base"
    workers = 1
    threads = 1

    def share(self, obj: object) -> object:
        """A handle `map` turns back into `obj` on the worker (each worker receives it once)."""
        return obj

    def map(self, fn: Task[T, R], shared: object, items: Iterable[T]) -> Iterator[R]:
        raise NotImplementedError

    def describe(self) -> dict[str, str | int]:
        return {"kind": self.kind, "workers": self.workers, "threads_per_worker": self.threads}

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessExecutor(Executor):
    """Items one after another in this process (`--workers 1`), on `threads` torch threads (default 1,
    as every worker: see prunecert.threads) for the duration of each map."""

    kind = "in-process"

    def __init__(self, threads: int | None = None):
        self.threads = threads_per_worker(1, threads)

    def map(self, fn: Task[T, R], shared: object, items: Iterable[T]) -> Iterator[R]:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            for item in items:
                yield fn(shared, item)
        finally:
            torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- local processes
_WORKER_CACHE: dict[str, Any] = {}


def _worker_start(threads: int, parent: int) -> None:
    keep_freed_memory()
    import torch
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (SIGKILL, the OOM killer) would wait for work forever: leave."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


MALLOC_KEEP = 2 ** 30     # bytes: blocks below this come from glibc's heap, and this much freed heap is kept
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (glibc malloc.h)


def keep_freed_memory() -> None:
    """Let glibc serve tensors below MALLOC_KEEP from its heap and keep the heap they free for the next
    ones (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD). By default a block over 32 MB gets fresh
    mmap'd pages, which the kernel zeroes and faults in on first touch, on each of the bound methods'
    thousands of calls: on the vgg-small pair (diff-linear, 8 boxes, one process; interleaved runs)
    this cut minor page faults 270k -> 40k and CPU per region ~10 %, at the same peak RSS
    (benchmarks/results/malloc.md). Process-wide, so called once at process start: the `prunecert`
    command, worker processes, benchmarks; library users may call it too. Nothing happens where
    glibc's mallopt is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_KEEP)
        libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_KEEP)
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Hand the heap that freed tensors left behind back to the system (glibc keeps it otherwise: the
    audit's main process kept 85 MB of its pass over the test data). Once per stage, not per chunk:
    trimming after every chunk in the workers lowered the vgg-small audit's peak by 0.17 GB (2.04 ->
    1.87 GB) but cost 14 % more worker CPU (the next chunk faults the pages back in). Nothing happens
    where glibc's malloc_trim is missing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _run_shared(fn: Task[T, R], path: str, item: T) -> R:
    """In a worker: load the shared object of `path` once (our own file, written by `share`), run fn."""
    obj = _WORKER_CACHE.get(path)
    if obj is None:
        _WORKER_CACHE.clear()  # one shared object at a time: a worker does not hoard old models
        with open(path, "rb") as fh:
            obj = pickle.load(fh)
        _WORKER_CACHE[path] = obj
    return fn(obj, item)


class LocalProcessExecutor(Executor):
    """`workers` spawned processes on this machine, each with `threads` torch threads."""

    kind = "local"

    def __init__(self, workers: int, threads: int | None = None, window: int | None = None):
        import multiprocessing
        self.workers = int(workers)
        self.threads = threads_per_worker(self.workers, threads)
        self.window = window or 2 * self.workers
        self._dir = Path(tempfile.mkdtemp(prefix="prunecert-shared-"))
        self._count = 0
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_worker_start, initargs=(self.threads, os.getpid()))

    def share(self, obj: object) -> str:
        """Pickle `obj` once into the private folder; workers load it on their first item that needs it.
        Only the two latest shared objects are kept (an audit shares one per attack objective): a
        handle older than that must not be mapped again."""
        self._count += 1
        path = self._dir / f"shared-{self._count}.pickle"
        with open(path, "wb") as fh:  # 0600 in a private mkdtemp folder: only this user's workers read it
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
        (self._dir / f"shared-{self._count - 2}.pickle").unlink(missing_ok=True)
        return str(path)

    def map(self, fn: Task[T, R], shared: object, items: Iterable[T]) -> Iterator[R]:
        def submit(item: T) -> Future[R]:
            return self._pool.submit(_run_shared, fn, str(shared), item)
        try:
            yield from _ordered(submit, items, self.window)
        except BrokenProcessPool as exc:
            raise WorkerError(f"a worker process died (killed, or out of memory?) while {self.workers} local "
                              f"workers were running; the run stopped and nothing was written") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._dir, ignore_errors=True)


def _ordered(submit: Callable[[T], Pending[R]], items: Iterable[T], window: int) -> Iterator[R]:
    """Results of `submit(item)` in item order, with at most `window` futures pending."""
    pending: deque[Pending[R]] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(submit(item))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(submit(item))
                break
            yield result
    finally:
        for fut in pending:
            fut.cancel()


# ----------------------------------------------------------------------------- choosing one
def default_workers() -> int:
    """`--workers` when not given: the cores this process may use."""
    return usable_cores()


def open_executor(workers: int | None = None, scheduler: str | None = None, threads: int | None = None,
                  n_items: int | None = None) -> Executor:
    """The executor the options ask for (use it as a context manager).

    `scheduler`: a Dask scheduler address (`tcp://host:8786`), or "local" for an embedded LocalCluster
    of `workers` processes. Without it, `workers` (default: usable cores) local processes, or this
    process when `workers` is 1 or there is at most one item (`n_items`): spawning would only cost.
    """
    if workers is not None and int(workers) < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if scheduler:
        # imported here, not at the top: cluster imports dask.distributed, 0.7-1.1 s (measured with
        # python -X importtime at load 8) that runs without --scheduler should not pay
        from prunecert.scale.cluster import DaskExecutor
        return DaskExecutor(scheduler, workers, threads)
    n = default_workers() if workers is None else int(workers)
    if n_items is not None:
        n = min(n, max(1, int(n_items)))
    if n == 1:
        return InProcessExecutor(threads)
    return LocalProcessExecutor(n, threads)

