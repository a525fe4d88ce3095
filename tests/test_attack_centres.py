"""Choosing the centres to attack by the pruned model's margin for the original's class."""

import numpy as np
import pytest
import torch
from pairs import random_pair

from prunecert.adversarial import agreement_margin, lowest_margin
from prunecert.core.regions import Box
from prunecert.errors import ConfigError


@pytest.fixture(scope="module")
def pair():
    return random_pair(np.random.default_rng(7), 4, (8, 6), 4, twin="prune")


def test_margin_is_g_own_class_minus_its_best_other_class(pair):
    x = torch.rand(200, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = agreement_margin(pair, x).numpy()
    yf, yg = pair.f.forward(x).numpy(), pair.g.forward(x).numpy()
    for i in range(len(x)):
        y = int(yf[i].argmax())
        assert m[i] == pytest.approx(yg[i, y] - np.delete(yg[i], y).max(), abs=1e-12)
    # negative exactly where the two top classes differ
    assert ((m < 0) == (yf.argmax(1) != yg.argmax(1))).all()


def test_lowest_margin_keeps_the_k_smallest_in_order(pair):
    rng = np.random.default_rng(1)
    regions = [Box.around(rng.uniform(0.1, 0.9, 4), 0.05, np.zeros(4), np.ones(4), source=str(i)) for i in range(20)]
    margins = agreement_margin(pair, torch.from_numpy(np.stack([r.center for r in regions]))).numpy()
    picked = lowest_margin(pair, regions, 5)
    assert [r.source for r in picked] == [str(i) for i in np.argsort(margins, kind="stable")[:5]]
    chosen = {r.source for r in picked}
    worst_chosen = max(margins[int(s)] for s in chosen)
    assert all(margins[i] >= worst_chosen for i in range(20) if str(i) not in chosen)
    assert len(lowest_margin(pair, regions, 20)) == 20


@pytest.mark.parametrize("k", [0, 21, -1])
def test_lowest_margin_rejects_a_count_outside_the_regions(pair, k):
    regions = [Box.around(np.full(4, 0.5), 0.05, np.zeros(4), np.ones(4))] * 20
    with pytest.raises(ConfigError, match=f"between 1 and the number of regions \\(20\\), got {k}"):
        lowest_margin(pair, regions, k)
