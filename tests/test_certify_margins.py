"""The agreement margins of the CROWN pass (`diff_linear._margins`): back-substituted for the class c
predicted at each region's centre, over the C - 1 rows e_j - e_c (j != c), in batches whose regions
predict different classes: sound against sampling, the same per region as walked alone, and tighter
than the interval margins where the walk helps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pairs import random_conv_pair, sample_points

from prunecert.certify.diff_linear import crown_diff_bounds
from prunecert.certify.naive import naive_bounds
from prunecert.core.region_batch import RegionBatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("seed", [8, 16, 29])   # random pairs whose predictions vary over the domain
def test_margins_of_the_predicted_class_are_sound_and_per_region(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pair = random_conv_pair(rng, twin="perturb", in_shape=(1, 8, 8))
    # centres picked from random candidates so that the batch predicts several classes
    cand = rng.uniform(0.0, 1.0, size=(400, 1, 8, 8))
    cls = pair.f.forward(torch.as_tensor(cand)).reshape(400, -1).argmax(1).numpy()
    picks = [i for k in range(3) for i in np.flatnonzero(cls == k)[:4].tolist()]
    centres = cand[sorted(picks)[:8]] if len(picks) >= 8 else cand[picks + list(range(8 - len(picks)))]
    eps = 0.02
    lo, hi = np.clip(centres - eps, 0, 1), np.clip(centres + eps, 0, 1)
    region = RegionBatch.of_boxes(pair.input_shape, lo, hi)
    out = crown_diff_bounds(pair, region)
    m = out.margin_lower
    assert m is not None and m.shape == (8, 3, 3)
    pred = pair.f.forward((region.lo + region.hi) / 2).reshape(8, -1).argmax(1)
    off = ~torch.eye(3, dtype=torch.bool)
    walked = torch.zeros(8, dtype=torch.bool)
    for b in range(8):
        x = sample_points(lo[b], hi[b], 300, seed=b)
        for net in (pair.f, pair.g):
            logits = net.forward(x).reshape(len(x), -1)
            low = (logits.unsqueeze(2) - logits.unsqueeze(1)).min(0).values      # min over x of out_c - out_j
            assert (m[b][off] <= low[off] + 1e-9 * (1 + low[off].abs())).all(), f"region {b}: margin above a sample"
        alone = crown_diff_bounds(pair, RegionBatch(region.lo[b:b + 1], region.hi[b:b + 1])).margin_lower
        assert alone is not None
        torch.testing.assert_close(m[b][off], alone[0][off], rtol=1e-12, atol=1e-12)
        c = int(pred[b])
        interval = naive_bounds(pair, lo[b], hi[b]).margin_lower
        assert interval is not None
        others = [j for j in range(3) if j != c]
        assert (m[b, c, others] >= interval[0, c, others]).all()
        walked[b] = bool((m[b, c, others] > interval[0, c, others]).any())
    assert len(set(pred.tolist())) > 1, "the batch should predict more than one class"
    assert bool(walked.any()), "the back-substituted margins should beat the interval ones somewhere"
