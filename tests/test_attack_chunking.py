"""Attack chunks sized by a memory budget: the size follows the networks' activations, never the results.

The chunk size decides how many regions share one gradient batch. Results must be the same for any
chunking (each region has its own generator; no batch op mixes elements), so a memory-driven size is
safe to change with the network. The runs here are small enough never to hit their time budget.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pairs import random_conv_pair, random_pair
from prunecert.adversarial import attack_many, get_attack
from prunecert.adversarial import api, batching
from prunecert.adversarial.batching import MAX_CHUNK, attack_chunk_size, evaluation_batch
from prunecert.audit import measure_data
from prunecert.core.pair import Pair
from prunecert.core.regions import Box, Domain, L2Ball
from prunecert.io.torch_io import network_from_module
from prunecert.train import small_vgg

BUDGET = 120.0  # seconds per region: far above what these runs need, so nothing is cut short


def _regions(pair, n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    lo, hi = pair.domain()
    out = [Box.around(rng.random(lo.shape), 0.1, lo, hi, source=f"p{i}") for i in range(n - 2)]
    return out + [L2Ball(rng.random(lo.shape), 0.3, lo, hi, source="ball"), Domain(lo, hi)]


def _run(pair, regions, chunk_size, method: str, objective: str) -> list[tuple]:
    found = attack_many(pair, None, regions, objective, method=method, restarts=2, iterations=6, seed=11,
                        budget_seconds=BUDGET, progress=False, chunk_size=chunk_size)
    assert not any(r.truncated for r in found)
    return [(r.value, r.x.tolist(), r.trace, r.evaluations, r.sub_objective) for r in found]


@pytest.mark.parametrize("method, objective", [("apgd", "max-logit-deviation"), ("auto", "disagreement"),
                                               ("pgd", "layer:0:neuron:3:min")])
def test_results_do_not_depend_on_the_chunking(method, objective):
    """Boxes, an L2 ball (auto walks the boxes only) and the domain, one region per chunk up to all in one."""
    pair = random_conv_pair(np.random.default_rng(5), twin="prune")
    regions = _regions(pair, 7, seed=6)
    reference = _run(pair, regions, 1, method, objective)
    for size in (3, None):  # None: by the memory budget (all 7 in one chunk on this small pair)
        assert _run(pair, regions, size, method, objective) == reference, size


def test_a_tiny_memory_budget_splits_the_chunks_and_keeps_the_results(monkeypatch):
    pair = random_pair(np.random.default_rng(7), 6, (10, 8), 4, twin="prune")
    regions = _regions(pair, 6, seed=8)
    reference = _run(pair, regions, None, "apgd", "max-logit-deviation")
    sizes = []
    real_chunk_slices = api.chunk_slices

    def spy(n, size):
        sizes.append(size)
        return real_chunk_slices(n, size)

    per_region = 2 * 8 * pair.activations_per_input() * batching.BYTES_PER_ACTIVATION  # restarts x 2 logits x 4
    monkeypatch.setattr(batching, "MEMORY_BUDGET", per_region * 2)
    monkeypatch.setattr(api, "chunk_slices", spy)
    assert _run(pair, regions, None, "apgd", "max-logit-deviation") == reference
    assert sizes[-1] == 2


def test_chunk_size_follows_the_activations():
    pair = random_conv_pair(np.random.default_rng(1), in_shape=(1, 6, 6))
    expected = math.prod(pair.input_shape) + sum(
        sum(math.prod(op.out_shape) for op in layer.ops) + (math.prod(layer.out_shape) if layer.relu else 0)
        for layers in (pair.layers_f, pair.layers_g) for layer in layers)
    assert pair.activations_per_input() == expected
    apgd = get_attack("apgd")
    per_region = 5 * 6 * expected * batching.BYTES_PER_ACTIVATION
    assert attack_chunk_size(pair, apgd, 5, 6, budget=per_region * 3 + 1) == 3
    assert attack_chunk_size(pair, apgd, 5, 6, budget=1) == 1  # a region always fits, alone
    assert attack_chunk_size(pair, apgd, 5, 6, budget=10**12) == MAX_CHUNK
    assert attack_chunk_size(pair, get_attack("random"), 5, 6, budget=1) == MAX_CHUNK  # no gradient batch


def test_vgg_sized_attacks_get_small_chunks():
    """A vgg-small-shaped pair (16/16/32-channel 3x3 convs on 28x28, avgpools, 100, 10): one
    max-logit-deviation region under apgd holds 100 elements of ~1.1 MB of activations each."""

    torch.manual_seed(0)
    net = network_from_module(small_vgg((1, 28, 28), 10), (1, 28, 28))
    pair = Pair(net, net)
    assert 130_000 < pair.activations_per_input() < 150_000
    assert attack_chunk_size(pair, get_attack("apgd"), 5, 20) == 1
    assert attack_chunk_size(pair, get_attack("auto"), 3, 20) == 2
    assert attack_chunk_size(pair, get_attack("auto"), 3, 1) == MAX_CHUNK  # a neuron objective: 3 elements


def test_the_audit_test_set_pass_does_not_depend_on_its_batch():
    pair = random_conv_pair(np.random.default_rng(9), twin="prune")
    rng = np.random.default_rng(10)
    x = rng.random((40, *pair.input_shape)).astype(np.float32)
    y = rng.integers(0, pair.n_classes, 40)
    reference = measure_data(pair, x, y, batch=1)
    for batch in (7, None):
        got = measure_data(pair, x, y, batch=batch)
        assert got.keys() == reference.keys()
        for k, v in reference.items():
            assert np.array_equal(got[k], v), k
    assert evaluation_batch(pair) == 512  # a small pair: the cap
    big = Pair(*(network_from_module(small_vgg((1, 28, 28), 10), (1, 28, 28)) for _ in range(2)))
    assert 100 < evaluation_batch(big) < 150  # vgg-small: ~2.2 MB per point within 256 MB
