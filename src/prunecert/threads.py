"""One torch thread for work made of thousands of tiny tensor ops (attack searches, input-split leaves).

torch's intra-op pool synchronises more than it gains there: measured 7-20x slower with 2 threads
than with 1 on a busy 2-core machine (tiny nets), and no faster for LeNet-300-100 batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block on one torch thread, restoring the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
