"""diff-linear's passes share what they would compute again (`diff_linear._Memo`: each network's
interval steps, the walks' magnitudes |A| m, Delta's structural zeros, the local chains) without
changing a single bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pairs import random_box, random_conv_pair

import prunecert.certify.diff_linear as dl
from prunecert.core.region_batch import RegionBatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("twin", ["prune", "perturb"])
def test_passes_sharing_results_change_no_bound(twin, monkeypatch):
    """diff-linear with its memo against the same call computing everything: every bound bit for bit
    equal, and the memo was used (looked-up results of the CROWN pass reused by the Delta pass)."""
    rng = np.random.default_rng(5)
    pair = random_conv_pair(rng, twin=twin, in_shape=(2, 8, 8))
    boxes = [random_box(rng, (2, 8, 8), 0.1, 0.3) for _ in range(2)]
    region = RegionBatch(torch.as_tensor(np.stack([b[0] for b in boxes])), torch.as_tensor(np.stack([b[1] for b in boxes])))
    hits = []
    real_get = dl._Memo.get

    def counting(self, kind, op, args, compute):
        fresh = []
        out = real_get(self, kind, op, args, lambda: fresh.append(1) or compute())
        hits.append(not fresh)
        return out

    monkeypatch.setattr(dl._Memo, "get", counting)
    shared = dl.diff_linear_bounds(pair, region)
    assert any(hits) and not all(hits)
    monkeypatch.setattr(dl._Memo, "get", lambda self, kind, op, args, compute: compute())
    alone = dl.diff_linear_bounds(pair, region)
    for name in ("f", "g", "delta", "local"):
        for l, (a, b) in enumerate(zip(getattr(shared, name), getattr(alone, name))):
            assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper), f"{name} layer {l}"
    assert torch.equal(shared.margin_lower, alone.margin_lower)
