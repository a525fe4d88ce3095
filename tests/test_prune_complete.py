"""Completion: the compact pruned net on the original's shape, and refusal of mismatched pairs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunecert.core.completion import make_pair
from prunecert.errors import PairingError
from prunecert.network import mlp
from prunecert.prune import complete, prune


def _net(seed=0, sizes=(5, 9, 7, 3), name="orig"):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(b, a)) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(size=b) for b in sizes[1:]]
    return mlp(ws, bs, name=name)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10 ** 6), st.sampled_from(["coreset", "uniform", "topk"]),
       st.lists(st.integers(1, 6), min_size=2, max_size=2))
def test_completed_equals_compact(seed, method, keeps):
    f = _net(seed % 7, sizes=(4, 6, 6, 3))
    g = prune(f, method, keep={0: keeps[0], 1: keeps[1]}, seed=seed, progress=False)
    c = complete(g, f)
    x = torch.rand(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(c.forward(x), g.forward(x), rtol=0, atol=1e-12)
    # the completed net has exactly the original's architecture
    assert [tuple(t.shape) for op in c.ops for t in op.tensors().values()] == \
           [tuple(t.shape) for op in f.ops for t in op.tensors().values()]


def test_removed_neurons_keep_incoming_weights_and_lose_outgoing_ones():
    f = _net()
    g = prune(f, keep={0: 4, 1: 3}, seed=1, progress=False)
    c = complete(g, f)
    k0 = g.metadata["pruning"]["layers"][0]["kept"]
    k1 = g.metadata["pruning"]["layers"][1]["kept"]
    gone0 = sorted(set(range(9)) - set(k0))
    gone1 = sorted(set(range(7)) - set(k1))
    torch.testing.assert_close(c.ops[0].weight, f.ops[0].weight)  # layer 0 rows all from the original
    torch.testing.assert_close(c.ops[2].weight[gone1], f.ops[2].weight[gone1])  # removed: incoming kept
    torch.testing.assert_close(c.ops[2].bias[gone1], f.ops[2].bias[gone1])
    assert torch.all(c.ops[2].weight[k1][:, gone0] == 0)  # kept rows: zero on removed inputs
    assert torch.all(c.ops[4].weight[:, gone1] == 0)      # logits: zero outgoing weights of removed
    torch.testing.assert_close(c.ops[4].weight[:, k1], g.ops[4].weight)


def test_make_pair_uses_completion():
    f = _net()
    g = prune(f, keep=0.5, progress=False)
    pair = make_pair(f, g)
    x = torch.rand(20, 5, dtype=torch.float64)
    torch.testing.assert_close(pair.g.forward(x), g.forward(x), rtol=0, atol=1e-12)


def _tampered(g, **changes):
    h = copy.deepcopy(g)
    layer = h.metadata["pruning"]["layers"][changes.pop("layer", 0)]
    layer.update(changes)
    return h


def test_mismatches_are_pairing_errors():
    f = _net()
    g = prune(f, keep={0: 4, 1: 3}, seed=1, progress=False)
    other = _net(seed=5)
    with pytest.raises(PairingError, match="weights sha256"):
        complete(g, other)
    with pytest.raises(PairingError, match="layer 0 kept indices .*out of range"):
        complete(_tampered(g, kept=[0, 1, 2, 9]), f)
    with pytest.raises(PairingError, match="layer 0 kept indices are not strictly increasing"):
        complete(_tampered(g, kept=[3, 1, 2, 4]), f)
    with pytest.raises(PairingError, match="layer 0 has 4 neurons but the pruning record keeps 3"):
        complete(_tampered(g, kept=[0, 1, 2]), f)
    with pytest.raises(PairingError, match="names layer 2"):
        complete(_tampered(g, index=2), f)
    with pytest.raises(PairingError, match="list of ints"):
        complete(_tampered(g, kept="0,1"), f)
    with pytest.raises(PairingError, match="not from orig .*the two models are not a pair"):
        complete(g, _net(sizes=(5, 9, 3)))  # the recorded hash names the mismatch before any shape does
    unhashed = copy.deepcopy(g)
    del unhashed.metadata["pruning"]["original_weights_sha256"]
    with pytest.raises(PairingError, match="has 3 layers but its original orig has 2"):
        complete(unhashed, _net(sizes=(5, 9, 3)))
    bare = copy.deepcopy(g)
    del bare.metadata["pruning"]
    with pytest.raises(PairingError, match="no pruning record"):
        complete(bare, f)


def test_shape_mismatch_without_hash_is_caught():
    """A record without a hash still cannot pair a net of another input size."""
    f = _net()
    g = prune(f, keep={0: 4}, progress=False)
    del g.metadata["pruning"]["original_weights_sha256"]
    with pytest.raises(PairingError, match="does not match"):
        complete(g, _net(sizes=(6, 9, 7, 3)))
