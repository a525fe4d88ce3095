"""The thread policy of every command: how many cores a run may use and how torch's threads share them.

- `usable_cores()`: the cores this process may run on (`os.sched_getaffinity`, so taskset/cgroup
  limits count), not the machine's total.
- `--workers N` processes each get `threads_per_worker(N)` = usable cores // N torch threads (at
  least 1), so workers x threads <= cores and nothing is oversubscribed; `--threads T` overrides it.
- Work made of thousands of tiny tensor ops (attack searches, input-split BaB leaves, mini-batch
  training) runs on one thread regardless (`one_torch_thread`): torch's intra-op pool synchronises
  more than it gains there, measured 7-20x slower with 2 threads than with 1 on a busy 2-core
  machine (tiny nets), and no faster for LeNet-300-100 batches.
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


def threads_per_worker(workers: int, threads: int | None = None) -> int:
    """torch threads for each of `workers` processes: `threads` if given, else usable cores // workers."""
    if threads is not None:
        if int(threads) < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        return int(threads)
    return max(1, usable_cores() // max(1, int(workers)))


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
