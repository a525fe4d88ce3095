"""How many regions one attack chunk takes: as many as keep its gradient batch within a memory budget.

A gradient stage (pgd, apgd, and the first stage of auto) ascends restarts x sub-objectives x regions
in one torch batch, and its autograd graph holds every op's output of f and of g for each element.
On LeNet-300-100 that is ~26 kB per element; on the vgg-small CNN ~1.8 MB (float64), so the fixed 16
regions per chunk of a max-logit-deviation attack (20 sub-objectives x 3-5 restarts) needed 1.7-2.9 GB.
The chunk size is therefore computed from the networks' activation sizes, capped at MAX_CHUNK (small
dense nets keep 16 regions per chunk, as before). It never changes a result: every region draws from
its own generator and no batch operation mixes elements (tests/test_attack_chunking.py).
"""

from __future__ import annotations

from prunecert.adversarial.methods import AttackMethod
from prunecert.core.pair import Pair

MEMORY_BUDGET = 256 * 2**20  # bytes for one chunk's gradient batch (forward values and their gradients); per
                             # worker, and an audit runs 2 of them beside its main process: at 512 MB its
                             # attack stage peaked at 2.4 GB on vgg-small (2 workers at 0.93 GB)
MAX_CHUNK = 16               # regions per chunk at most: also the unit of work an executor maps
BYTES_PER_ACTIVATION = 16    # float64 value + its gradient; measured 12.8 on vgg-small (1.77 MB / element)


def attack_chunk_size(pair: Pair, method: AttackMethod, restarts: int, n_sub: int, budget: int | None = None) -> int:
    """Regions per chunk for `method` within `budget` bytes (default MEMORY_BUDGET): gradient stages hold
    restarts x n_sub elements per region at once; sampling, LP walks and the MILP handle one region (or
    one sample batch) at a time."""
    if method.gradient is None:
        return MAX_CHUNK
    budget = MEMORY_BUDGET if budget is None else budget
    per_region = max(1, restarts * n_sub) * pair.activations_per_input() * BYTES_PER_ACTIVATION
    return max(1, min(MAX_CHUNK, budget // per_region))


def evaluation_batch(pair: Pair, cap: int = 512, budget: int | None = None) -> int:
    """Points per batch when every layer of f and g is evaluated (and kept) at once, e.g. an audit's pass
    over the test set: as many as fit `budget` (default MEMORY_BUDGET), at most `cap`, at least 1."""
    budget = MEMORY_BUDGET if budget is None else budget
    return max(1, min(cap, budget // (pair.activations_per_input() * BYTES_PER_ACTIVATION)))
