"""Scale out: map chunks of regions over an executor (in-process, local processes, or a Dask cluster).

Regions are independent, so certify, attack and audit cut them into fixed-size chunks
(`chunk_slices`) and map one function over the chunks (`open_executor(...).map`). Results never
depend on the executor or the number of workers: chunks are the same whatever runs them, and every
region's random choices come from its own generator (`region_generator(seed, index)`).
"""

from prunecert.scale.executor import (
           Executor,
           InProcessExecutor,
           LocalProcessExecutor,
           WorkerError,
           keep_freed_memory,
           open_executor,
           release_memory,
)
from prunecert.scale.seeds import chunk_slices, region_generator, region_seed

__all__ = ["Executor", "InProcessExecutor", "LocalProcessExecutor", "WorkerError", "chunk_slices",
           "keep_freed_memory", "open_executor", "region_generator", "release_memory", "region_seed"]
