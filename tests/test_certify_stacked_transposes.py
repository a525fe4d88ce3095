"""A pair walk's step takes D^T lam_d and A^gT lam_d, two transposes of the same rows; for two convs
of one geometry they run as one transposed conv with the weights stacked along its output channels
(`layout.stackable`, `Patches.backward2`; dense rows keep two, measured faster). Each output channel is a sum over the
same products; the kernels may add them in another order (measured: about a third of random cases
differ in the last bits), so the halves must agree with the separate transposes within twice the
rounding bound of one transpose (gamma_{k+2} |W|^T |lam|, which holds for any order: the walks'
margins stay valid), on dense rows and on windows, in float32 (`fast`) and float64; whole
diff-linear walks stay sound and move by rounding amounts only. A tiling average pool's transpose
(`AvgPool2d.repeat_backward`, one product per entry) is bit for bit the transposed conv's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pairs import assert_contains, random_box, random_conv_pair, sample_deltas

import prunecert.certify.diff_linear as dl
import prunecert.certify.layout as layout
from prunecert.certify.layout import DENSE, Dense, Patches, stackable
from prunecert.network import AvgPool2d, Conv2d

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _convs(rng: np.random.Generator) -> tuple[Conv2d, Conv2d]:
    """Two random convs of the same geometry (f's op and a twin's, or the difference op)."""
    c_in, c_out = int(rng.integers(1, 5)), int(rng.integers(1, 6))
    k, s, p = int(rng.integers(1, 4)), int(rng.integers(1, 3)), int(rng.integers(0, 2))
    h = int(rng.integers(k + 2, 11))
    w1 = rng.normal(size=(c_out, c_in, k, k))
    w2 = w1 * (rng.random(w1.shape) < 0.6) + 1e-3 * rng.normal(size=w1.shape)
    return (Conv2d(w1, rng.normal(size=c_out), (c_in, h, h), s, p),
            Conv2d(w2, rng.normal(size=c_out), (c_in, h, h), s, p))


def _rows(rng: np.random.Generator, op: Conv2d, windows: bool, dtype: torch.dtype
          ) -> tuple[torch.Tensor, Dense | Patches]:
    """Random rows (2 regions, 3 rows) over op's output level, dense or on windows with random corners
    (some hanging over the padding)."""
    c, h, w = op.out_shape
    if not windows:
        return torch.as_tensor(rng.normal(size=(2, 3, c, h, w)), dtype=dtype), DENSE
    k = int(rng.integers(1, h + 1))
    corner = torch.as_tensor(rng.integers(-k + 1, h, size=(int(rng.choice([1, 2])), 3, 2)))
    lay = Patches(corner, (k, k), (c, h, w))
    lam = torch.as_tensor(rng.normal(size=(2, 3, c, k, k)), dtype=dtype) * lay.inside()
    return lam, lay


@settings(max_examples=60, **SLOW)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.sampled_from(["fast", "float64", "float32"]))
def test_stacked_transposes_agree_with_the_separate_ones_within_rounding(seed, windows, kind):
    rng = np.random.default_rng(seed)
    op, op2 = _convs(rng)
    assert stackable(op, op2)
    dtype = torch.float32 if kind == "float32" else torch.float64
    lam, lay = _rows(rng, op, windows, dtype)
    fast = kind == "fast"
    a, b, lay2 = lay.backward2(op, op2, lam, fast)
    a0, lay0 = lay.backward(op, lam, fast)
    b0, _ = lay.backward(op2, lam, fast)
    unit = 2.0 ** -24 if fast or dtype == torch.float32 else 2.0 ** -53
    for o, got, want in ((op, a, a0), (op2, b, b0)):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert got.is_contiguous()
        k = o.weight.shape[0] * o.weight.shape[2] * o.weight.shape[3] + 2
        gamma = k * unit / (1 - k * unit)
        absolute = Conv2d(o.weight.abs(), None, o.in_shape, o.stride, o.padding)
        mag = lay.backward(absolute, lam.abs().double())[0]
        assert bool(((got.double() - want.double()).abs() <= 2 * gamma * mag * 1.01 + 1e-37).all())
    assert type(lay2) is type(lay0)
    if isinstance(lay2, Patches):
        assert isinstance(lay0, Patches)
        assert torch.equal(lay2.corner, lay0.corner) and lay2.size == lay0.size and lay2.shape == lay0.shape


def test_ops_of_other_geometry_or_kind_fall_back_to_separate_transposes():
    rng = np.random.default_rng(0)
    k3 = Conv2d(rng.normal(size=(3, 2, 3, 3)), None, (2, 6, 6), 1, 1)
    k1 = Conv2d(rng.normal(size=(3, 2, 1, 1)), None, (2, 6, 6), 1, 0)     # same levels, other kernel
    pool = AvgPool2d(2, (3, 6, 6))
    assert k3.out_shape == k1.out_shape
    assert not stackable(k3, k1) and not stackable(k3, pool) and not stackable(pool, pool)
    lam = torch.as_tensor(rng.normal(size=(1, 2, *k3.out_shape)))
    a, b, _ = DENSE.backward2(k3, k1, lam)
    assert torch.equal(a, DENSE.backward(k3, lam)[0]) and torch.equal(b, DENSE.backward(k1, lam)[0])


@settings(max_examples=4, **SLOW)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["perturb", "prune", "quantise"]))
def test_diff_linear_walks_within_rounding_of_separate_transposes(seed, twin):
    rng = np.random.default_rng(seed)
    pair = random_conv_pair(rng, twin=twin, in_shape=(1, 12, 12))
    boxes = [random_box(rng, (1, 12, 12)) for _ in range(2)]
    lo, hi = np.stack([x[0] for x in boxes]), np.stack([x[1] for x in boxes])
    stacked = []
    weight = layout.stacked_weight
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dl, "FULL_COST", 0)    # rows on windows
        m.setattr(layout, "stacked_weight", lambda *a: stacked.append(1) or weight(*a))
        new = dl.diff_linear_bounds(pair, lo, hi)
        assert stacked   # the walks took stacked transposes
        m.setattr(layout, "stackable", lambda op, op2: False)
        old = dl.diff_linear_bounds(pair, lo, hi)
    for part in ("f", "g", "delta", "local"):
        for x, y in zip(getattr(new, part), getattr(old, part)):
            width = (y.upper - y.lower).clamp_min(1e-9)
            assert bool(((x.lower - y.lower).abs() <= 1e-9 * width).all()), part
            assert bool(((x.upper - y.upper).abs() <= 1e-9 * width).all()), part
    for r in range(2):
        e2e = sample_deltas(pair, lo[r], hi[r], 300, seed=r)
        for l in range(pair.n_layers):
            assert_contains(new.delta[l].lower[r], new.delta[l].upper[r], e2e[l], f"Delta {l}, box {r}")


@settings(max_examples=40, **SLOW)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.just("float64"))
def test_tiling_pool_transposes_are_the_transposed_convs_bit_for_bit(seed, windows, kind):
    """Odd levels (a last row/column no window covers), subnormal and signed-zero coefficients included."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 4))
    c, h, w = int(rng.integers(1, 4)), int(rng.integers(k, 12)), int(rng.integers(k, 12))
    op = AvgPool2d(k, (c, h, w))
    assert op.tiles
    dtype = torch.float32 if kind == "float32" else torch.float64
    fake = Conv2d(np.zeros((c, c, 1, 1)), None, op.in_shape)   # only for `_rows`' level shape
    fake.out_shape = op.out_shape
    lam, lay = _rows(rng, fake, windows, dtype)
    lam = lam * torch.as_tensor(rng.random(lam.shape) < 0.8)
    lam.view(-1)[0] = -0.0
    lam.view(-1)[-1] = 1e-310 if dtype == torch.float64 else 1e-40
    fast = kind == "fast"
    got, lay2 = lay.backward(op, lam, fast)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(AvgPool2d, "tiles", False)
        want, lay0 = lay.backward(op, lam, fast)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert type(lay2) is type(lay0)
