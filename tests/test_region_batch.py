"""RegionBatch (core.region_batch): the one batch of regions every bound method takes, checked once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pairs import random_pair

from prunecert.certify.naive import naive_bounds
from prunecert.certify.verdicts import ClassTally
from prunecert.core.interval import Bounds, centre_radius
from prunecert.core.region_batch import RegionBatch, boxes_or_batch
from prunecert.core.regions import Box, Domain, L2Ball
from prunecert.errors import RegionError

F64 = torch.float64


def test_of_regions_stacks_bounding_boxes_in_the_input_shape():
    dlo, dhi = np.zeros((1, 2, 2)), np.ones((1, 2, 2))
    regions = [Box.around(np.full((1, 2, 2), 0.5), 0.1, dlo, dhi), Domain(dlo, dhi)]
    batch = RegionBatch.of_regions(regions, (1, 2, 2))
    assert batch.lo.shape == (2, 1, 2, 2) and batch.lo.dtype == F64 and batch.l2 is None
    for b, r in enumerate(regions):
        lo, hi = r.bounding_box()
        assert torch.equal(batch.lo[b], torch.from_numpy(lo)) and torch.equal(batch.hi[b], torch.from_numpy(hi))
    # flat regions of a conv input are reshaped to it
    flat = RegionBatch.of_regions([Domain(np.zeros(4), np.ones(4))], (1, 2, 2))
    assert flat.input_shape == (1, 2, 2) and flat.batch == 1


def test_of_regions_carries_balls_only_when_every_region_is_one():
    dlo, dhi = np.zeros(3), np.ones(3)
    balls = [L2Ball(np.full(3, c), 0.2, dlo, dhi) for c in (0.3, 0.6)]
    batch = RegionBatch.of_regions(balls, (3,))
    assert batch.l2 is not None
    torch.testing.assert_close(batch.l2[0][1], torch.full((3,), 0.6, dtype=F64))
    assert batch.l2[1].tolist() == [0.2, 0.2]
    mixed = RegionBatch.of_regions([balls[0], Box(np.zeros(3), np.ones(3))], (3,))
    assert mixed.l2 is None   # certify cuts chunks so that this does not happen; the boxes stay sound
    assert batch.bounding_boxes().l2 is None and torch.equal(batch.bounding_boxes().lo, batch.lo)


@pytest.mark.parametrize("make, message", [
    (lambda: RegionBatch(torch.zeros(1, 2), torch.ones(1, 2, dtype=F64)), "float64"),
    (lambda: RegionBatch(torch.zeros(1, 2, dtype=F64), torch.ones(1, 3, dtype=F64)), "not one batch"),
    (lambda: RegionBatch(torch.zeros(0, 2, dtype=F64), torch.ones(0, 2, dtype=F64)), "not one batch"),
    (lambda: RegionBatch(torch.ones(1, 2, dtype=F64), torch.tensor([[2.0, 0.5]], dtype=F64)),
     r"region 0: lower 1.0 > upper 0.5 at input \[1\]"),
    (lambda: RegionBatch(torch.tensor([[0.0, float("nan")]], dtype=F64), torch.ones(1, 2, dtype=F64)),
     r"non-finite lower bound nan at input \[1\]"),
    (lambda: RegionBatch(torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64),
                         (torch.zeros(1, 3, dtype=F64), torch.ones(1, dtype=F64))), "centres of shape"),
    (lambda: RegionBatch(torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64),
                         (torch.zeros(1, 2, dtype=F64), torch.tensor([-0.1], dtype=F64))), "radii"),
    (lambda: RegionBatch.of_boxes((3,), np.zeros(4), np.ones(4)), r"do not match \(B, 3\)"),
    (lambda: RegionBatch.of_boxes((3,), np.zeros(3), np.ones(3), l2=(torch.zeros(1, 5), torch.tensor([0.1]))),
     "centres"),
])
def test_the_constructor_checks_every_invariant(make, message):
    with pytest.raises(RegionError, match=message):
        make()


def test_frozen_and_concretisation_form_holds_the_box():
    lo = torch.tensor([[0.1, -3.0, 1e-300]], dtype=F64)
    hi = torch.tensor([[0.3, 7.0, 2e-300]], dtype=F64)
    batch = RegionBatch(lo, hi)
    with pytest.raises(AttributeError):
        batch.lo = hi  # type: ignore[misc]
    c, r = centre_radius(Bounds(lo, hi))
    assert torch.equal(batch.c, c) and torch.equal(batch.r, r)
    assert bool(((batch.c - batch.r) <= lo).all() and ((batch.c + batch.r) >= hi).all())
    assert batch.rc.shape == (1, 3, 2)
    assert batch.to(torch.float32).lo.dtype == torch.float32   # for searches only, not re-checked
    assert batch.select(slice(0, 1)).batch == 1


def test_a_batch_goes_straight_through_and_raw_boxes_are_batched_once():
    seen = []

    @boxes_or_batch
    def method(pair, region, scale=1.0):
        seen.append(region)
        return region.batch * scale

    pair = random_pair(np.random.default_rng(0), 3, (4,), 2)
    batch = RegionBatch.of_boxes(pair.input_shape, np.zeros(3), np.ones(3))
    assert method(pair, batch, scale=2.0) == 2.0 and seen[-1] is batch
    assert method(pair, np.zeros((2, 3)), np.ones((2, 3))) == 2 and isinstance(seen[-1], RegionBatch)
    ball = method(pair, np.zeros(3), np.ones(3), l2=(np.full(3, 0.5), [0.1]))
    assert ball == 1 and seen[-1].l2 is not None
    with pytest.raises(TypeError, match="carries its own"):
        method(pair, batch, np.ones(3))
    with pytest.raises(TypeError, match="upper bounds are missing"):
        method(pair, np.zeros(3))
    # the registered methods keep their (pair, region, ...) signature and give the same bounds either way
    a = naive_bounds(pair, np.zeros(3), np.ones(3))
    b = naive_bounds(pair, batch)
    assert torch.equal(a.delta[-1].upper, b.delta[-1].upper)


def test_class_tally_is_the_one_overall_rule():
    assert ClassTally.of([]).to_json() == {"verdict": "proved"}
    assert ClassTally.of([{"verdict": "proved"}, {"verdict": "unknown"}]).to_json() == {"verdict": "unknown"}
    tally = ClassTally.of([{"verdict": "proved"}, {"verdict": "refuted", "point": [0.5]},
                           {"verdict": "refuted", "point": [0.7]}])
    assert tally.to_json() == {"verdict": "refuted", "region": 1, "point": [0.5]}
    assert tally.counts == {"proved": 1, "refuted": 2, "unknown": 0}
