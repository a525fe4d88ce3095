"""Regions: construction, validation errors, soundness of the bounding box, sampling and projection."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunecert.core.region_options import expand_center_specs, regions_from_options
from prunecert.core.region_batch import RegionBatch
from prunecert.core.regions import Box, Domain, L2Ball
from prunecert.errors import DataError, RegionError

ZERO, ONE = np.zeros(3), np.ones(3)


@settings(deadline=None)
@given(st.lists(st.floats(0, 1), min_size=3, max_size=3), st.floats(0, 2))
def test_linf_box_contains_the_real_ball_clipped_to_the_domain(centre, eps):
    box = Box.around(np.array(centre), eps, ZERO, ONE)
    lo, hi = box.bounding_box()
    for c, l, h in zip(centre, lo, hi):
        # exact rational check: the float box covers [c - eps, c + eps] intersected with [0, 1]
        assert Fraction(l) <= max(Fraction(c) - Fraction(eps), Fraction(0))
        assert Fraction(h) >= min(Fraction(c) + Fraction(eps), Fraction(1))
        assert 0 <= l <= c <= h <= 1
    assert box.contains(np.array(centre))


def test_box_around_keeps_centre_eps_and_describes_itself():
    box = Box.around([0.2, 0.5, 0.9], 0.25, 0.0, 1.0, source="c.npy")
    assert box.shape == (3,) and box.eps == 0.25
    np.testing.assert_array_equal(box.center, [0.2, 0.5, 0.9])
    lo, hi = box.bounding_box()
    assert lo[0] == 0.0 and hi[2] == 1.0  # clipped to the domain
    d = box.describe()
    json.dumps(d)
    assert d["kind"] == "linf_ball" and d["eps"] == 0.25 and d["source"] == "c.npy" and d["center"] == [0.2, 0.5, 0.9]


@pytest.mark.parametrize("make, message", [
    (lambda: Box.around(np.full(3, 0.5), -0.1, ZERO, ONE), "eps must be a finite number >= 0"),
    (lambda: Box.around(np.full(3, 0.5), float("nan"), ZERO, ONE), "eps must be a finite number >= 0"),
    (lambda: Box.around(np.full(3, 0.5), float("inf"), ZERO, ONE), "eps must be a finite number >= 0"),
    (lambda: Box.around(np.full(4, 0.5), 0.1, ZERO, ONE), "shape (4,)"),
    (lambda: Box.around(np.array([0.5, np.nan, 0.5]), 0.1, ZERO, ONE), "non-finite value nan at index [1]"),
    (lambda: Box.around(np.array([0.5, 1.5, 0.5]), 0.1, ZERO, ONE), "above the domain"),
    (lambda: Box([0.0, 0.5, 0.2], [0.1, 0.4, 0.3]), "lower 0.5 > upper 0.4 at input [1]"),
    (lambda: Box([-0.5, 0.0, 0.0], [0.1, 0.4, 0.3], ZERO, ONE), "below the domain"),
    (lambda: L2Ball(np.full(3, 0.5), -1.0, ZERO, ONE), "radius must be a finite number >= 0"),
    (lambda: L2Ball(np.full(2, 0.5), 1.0, ZERO, ONE), "does not match the input shape"),
    (lambda: Domain([0.0, 1.0], [1.0, 0.0]), "lower 1.0 > upper 0.0 at input [1]"),
])
def test_invalid_regions_raise_a_region_error_naming_the_problem(make, message):
    with pytest.raises(RegionError, match=None) as info:
        make()
    assert message in str(info.value)


def test_centre_is_reshaped_when_sizes_match():
    box = Box.around(np.full((1, 2, 2), 0.5), 0.1, np.zeros(4), np.ones(4))
    assert box.shape == (4,)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 0.8), st.sampled_from(["box", "l2", "domain"]))
def test_samples_and_projections_lie_in_the_region(seed, eps, kind):
    rng = np.random.default_rng(seed)
    shape = (2, 3)
    centre = rng.uniform(0, 1, size=shape)
    lo, hi = np.zeros(shape), np.ones(shape)
    region = {"box": lambda: Box.around(centre, eps, lo, hi), "l2": lambda: L2Ball(centre, eps, lo, hi),
              "domain": lambda: Domain(lo, hi)}[kind]()
    x = region.sample(64, torch.Generator().manual_seed(seed))
    assert x.shape == (64, *shape) and x.dtype == torch.float64
    assert region.contains(x)
    far = torch.from_numpy(rng.normal(0.5, 3.0, size=(16, *shape)))
    p = region.project(far)
    assert region.contains(p)
    torch.testing.assert_close(region.project(p), p, rtol=0, atol=1e-12)  # projection is idempotent
    blo, bhi = region.bounding_box()
    assert (blo <= region.center).all() and (region.center <= bhi).all()


def test_sampling_is_reproducible_and_reaches_corners():
    box = Box.around(np.full(4, 0.5), 0.2, np.zeros(4), np.ones(4))
    a, b = box.sample(40, 7), box.sample(40, 7)
    torch.testing.assert_close(a, b)
    lo, hi = box.bounding_box()
    corners = ((a == torch.from_numpy(lo)) | (a == torch.from_numpy(hi))).all(dim=1)
    assert corners.sum() >= 10


def test_l2_ball_membership_is_the_euclidean_norm():
    ball = L2Ball(np.full(2, 0.5), 0.1, np.zeros(2), np.ones(2))
    assert ball.contains(np.array([0.5 + 0.06, 0.5 + 0.06]))  # norm 0.0849
    assert not ball.contains(np.array([0.5 + 0.08, 0.5 + 0.08]))  # norm 0.113, inside the bounding box
    lo, hi = ball.bounding_box()
    assert np.all(lo <= 0.4) and np.all(hi >= 0.6)
    assert ball.describe()["kind"] == "l2_ball"


def test_domain_region_is_the_whole_input_box():
    d = Domain(np.zeros((1, 2, 2)), np.ones((1, 2, 2)))
    lo, hi = d.bounding_box()
    assert lo.shape == (1, 2, 2) and (lo == 0).all() and (hi == 1).all()
    assert d.describe() == {"kind": "domain", "shape": [1, 2, 2],
                            "domain": {"lower": 0.0, "upper": 1.0, "uniform": True}}


def test_a_region_batch_stacks_the_bounding_boxes():
    regions = [Box.around(np.full(3, c), 0.1, ZERO, ONE) for c in (0.2, 0.5)] + [Domain(ZERO, ONE)]
    batch = RegionBatch.of_regions(regions, (3,))
    lo, hi = batch.lo, batch.hi
    assert lo.shape == (3, 3) and lo.dtype == torch.float64
    assert float(lo[2].max()) == 0.0 and float(hi[2].min()) == 1.0


def test_center_ranges_expand_inclusively():
    assert expand_center_specs(["mnist5k:test:3-5", "x.npy"]) == [
        "mnist5k:test:3", "mnist5k:test:4", "mnist5k:test:5", "x.npy"]
    with pytest.raises(RegionError, match="before start"):
        expand_center_specs(["mnist5k:test:5-3"])


def test_regions_from_cli_options(tmp_path):
    point = tmp_path / "c.npy"
    np.save(point, np.full((1, 2, 2), 0.5))
    shape, lo, hi = (4,), np.zeros(4), np.ones(4)
    (box,) = regions_from_options(shape, lo, hi, centers=[str(point)], eps=0.1)
    assert isinstance(box, Box) and box.source == str(point) and box.shape == (4,)
    (ball,) = regions_from_options(shape, lo, hi, centers=[str(point)], eps=0.1, norm="2")
    assert isinstance(ball, L2Ball)
    (dom,) = regions_from_options(shape, lo, hi, region="domain")
    assert isinstance(dom, Domain)
    with pytest.raises(RegionError, match="exactly one region"):
        regions_from_options(shape, lo, hi)
    with pytest.raises(RegionError, match="exactly one region"):
        regions_from_options(shape, lo, hi, centers=[str(point)], eps=0.1, region="domain")
    with pytest.raises(RegionError, match="needs --eps"):
        regions_from_options(shape, lo, hi, centers=[str(point)])
    with pytest.raises(RegionError, match="--norm '1'"):
        regions_from_options(shape, lo, hi, centers=[str(point)], eps=0.1, norm="1")
    with pytest.raises(RegionError, match="only 'domain'"):
        regions_from_options(shape, lo, hi, region="everything")
    bad = tmp_path / "nan.npy"
    np.save(bad, np.array([0.5, np.nan, 0.5, 0.5]))
    with pytest.raises((RegionError, DataError), match="NaN|non-finite"):
        regions_from_options(shape, lo, hi, centers=[str(bad)], eps=0.1)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.full(5, 0.5))
    with pytest.raises(RegionError, match=r"shape \(5,\)"):
        regions_from_options(shape, lo, hi, centers=[str(wrong)], eps=0.1)


def test_regions_from_a_dataset_range():
    regions = regions_from_options((784,), 0.0, 1.0, centers=["mnist5k:test:0-2"], eps=0.02)
    assert [r.source for r in regions] == ["mnist5k:test:0", "mnist5k:test:1", "mnist5k:test:2"]
    assert all(r.shape == (784,) for r in regions)
    assert not np.array_equal(regions[0].center, regions[1].center)


def test_regions_from_vnnlib(tmp_path):
    vnnlib = pytest.importorskip("prunecert.io.vnnlib", reason="prunecert.io.vnnlib (VNN-LIB reader) not built yet")
    path = tmp_path / "prop.vnnlib"
    lines = [f"(declare-const X_{i} Real)" for i in range(3)] + ["(declare-const Y_0 Real)"]
    for i, (a, b) in enumerate([(0.1, 0.2), (0.3, 0.4), (0.5, 0.6)]):
        lines += [f"(assert (>= X_{i} {a}))", f"(assert (<= X_{i} {b}))"]
    lines.append("(assert (>= Y_0 0.0))")
    path.write_text("\n".join(lines) + "\n")
    assert hasattr(vnnlib, "read_vnnlib_box")
    (box,) = regions_from_options((3,), ZERO, ONE, vnnlib=str(path))
    lo, hi = box.bounding_box()
    np.testing.assert_allclose(lo, [0.1, 0.3, 0.5])
    np.testing.assert_allclose(hi, [0.2, 0.4, 0.6])
    path.write_text(path.read_text().replace("(<= X_2 0.6)", "(<= X_2 1.5)"))
    with pytest.raises(RegionError, match="above the domain"):
        regions_from_options((3,), ZERO, ONE, vnnlib=str(path))
