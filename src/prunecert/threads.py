"""The thread policy of every command: parallelism comes from worker processes, not torch's threads.

- `usable_cores()`: the cores this process may use (`os.sched_getaffinity`, so taskset/cgroup
  limits count), not the machine's total; the default number of workers (`--workers`).
- Every worker process, and the calling process with `--workers 1`, runs torch on ONE thread unless
  `--threads T` says otherwise (keep workers x T <= cores). Why one:
  * results are bit-identical across executors only for equal thread counts: BLAS splits a float64
    matmul differently with 2 threads (one local bound of a LeNet-300-100 region differed in the last
    bit between `--workers 1` with torch's 2 default threads and a 1-thread Dask worker);
  * measured on a loaded 2-core machine: certify with torch's default 2 threads was 4-9x slower than
    with 1 (235 vs 31 s for 100 regions), and attacks / input-split BaB leaves / mini-batch training
    (thousands of tiny ops) were 7-20x slower with 2 threads on small nets (see `one_torch_thread`);
  * with the default `--workers` (every core) one thread per worker already uses every core.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from prunecert.errors import ConfigError


def usable_cores() -> int:
    """Cores this process may use (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int = 1, threads: int | None = None) -> int:
    """torch threads for each worker process: `threads` if given (>= 1), else 1 (see the module docstring)."""
    if threads is not None:
        if int(threads) < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        return int(threads)
    return 1


def apply_thread_policy(workers: int = 1, threads: int | None = None) -> int:
    """Set this process's torch threads by the policy (see the module docstring); returns the number."""
    n = threads_per_worker(workers, threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block on one torch thread, restoring the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
