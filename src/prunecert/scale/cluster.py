"""`DaskExecutor`: chunks as tasks on a Dask distributed cluster (`--scheduler ADDRESS` or "local").

Start a cluster by hand (see docs/scale.md):

    dask scheduler                       # prints the address, e.g. tcp://10.0.0.5:8786
    dask worker tcp://10.0.0.5:8786 --nworkers 8 --nthreads 1    # on every machine

Every worker needs prunecert installed (the same version). `share` broadcasts the models to every
worker once; each task then carries only its chunk of regions. A worker lost mid-task (killed, out of
memory, machine gone) is noticed by the scheduler, which re-runs its tasks on the other workers
(up to Dask's `distributed.scheduler.allowed-failures`, 3 by default); `retries` also re-runs a task
that raised.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from prunecert.errors import ConfigError
from prunecert.scale.executor import Executor, Pending, Task, WorkerError, _ordered
from prunecert.threads import threads_per_worker, usable_cores

T = TypeVar("T")
R = TypeVar("R")


def _run_task(fn: Task[T, R], shared: Any, item: T, threads: int) -> R:
    """On a worker: Dask has replaced the future `shared` by the object it holds (hence Any)."""
    import torch
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(shared, item)


class DaskExecutor(Executor):
    """Tasks on the cluster at `scheduler` ("local": an embedded LocalCluster of `workers` processes)."""

    kind = "dask"

    def __init__(self, scheduler: str, workers: int | None = None, threads: int | None = None,
                 retries: int = 2, timeout: float = 30.0):
        try:
            import dask
            from distributed import Client, LocalCluster
        except ImportError as exc:  # pragma: no cover - dask is a dependency
            raise ConfigError(f"--scheduler needs dask[distributed] ({exc})") from exc
        self.threads = threads_per_worker(1, threads)  # per task; start workers with --nthreads <= cores/threads
        self.retries = retries
        self._cluster: LocalCluster | None = None
        try:
            if scheduler == "local":
                n = int(workers) if workers else usable_cores()
                # the statistical profiler samples the task thread 100 times a second for the dashboard,
                # which an embedded cluster never shows
                with dask.config.set({"distributed.worker.profile.enabled": False}):
                    self._cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                 scheduler_kwargs={"dashboard": False}, silence_logs=logging.ERROR)
                self.client = Client(self._cluster, timeout=max(timeout, 120))  # workers start slowly under load
            else:
                self.client = Client(scheduler, timeout=timeout)
        except OSError as exc:
            self.close()
            raise ConfigError(f"--scheduler {scheduler}: cannot reach a Dask scheduler there ({exc})") from exc
        slots = sum(w.get("nthreads", 1) for w in self.client.scheduler_info()["workers"].values())
        self.workers = max(1, slots)
        self.scheduler = "local" if self._cluster is not None else scheduler

    def describe(self) -> dict[str, str | int]:
        return {**super().describe(), "scheduler": self.scheduler}

    def share(self, obj: object) -> object:
        return self.client.scatter(obj, broadcast=True, hash=False)

    def map(self, fn: Task[T, R], shared: object, items: Iterable[T]) -> Iterator[R]:
        def submit(item: T) -> Pending[R]:
            return self.client.submit(_run_task, fn, shared, item, self.threads, pure=False, retries=self.retries)
        try:
            yield from _ordered(submit, items, 2 * self.workers)
        except Exception as exc:
            from distributed.scheduler import KilledWorker
            if isinstance(exc, KilledWorker):
                raise WorkerError(f"Dask gave up on a chunk after its workers died repeatedly ({exc}); "
                                  f"nothing was written") from exc
            raise

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self._cluster is not None:
            self._cluster.close()
