"""The network's first op in float32 (`firstop.py`): the split bound lam . (A c + b) + |A^T lam| . r
with float32 transposes stays above the exact value for coefficients spanning 1e-44 .. 1e4 (float32
underflow, rows with many zeros, difference ops, windows), and the float32 error it covers is real
(a float64 margin in its place would not be sound); whole pairs whose first op is a Linear or a conv
(with or without an input normalisation before it) stay sound with the path on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pairs import assert_contains, extremes, random_box, random_conv_pair, random_pair, sample_deltas

import prunecert.certify.backsub as bs
import prunecert.certify.firstop as fo
from prunecert.certify.backsub import Engine, Form, OpCtx, concretise
from prunecert.certify.diff_interval import difference_op
from prunecert.certify.diff_linear import crown_diff_bounds, diff_linear_bounds
from prunecert.certify.layout import Patches, unit_patches
from prunecert.core.interval import Bounds, centre_radius
from prunecert.core.region_batch import RegionBatch
from prunecert.network import Conv2d, Linear

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# the exact values are computed in long double: it must be wider than float64 (x86: 64-bit significand)
extended = pytest.mark.skipif(np.finfo(np.longdouble).nmant < 60, reason="long double is float64 on this platform")


def _ops(rng: np.random.Generator, conv: bool, twin: bool, narrow: bool = False):
    """f's op, g's op (a perturbed copy, or the same op) and their difference op, on the input."""
    scale = 10.0 ** rng.uniform(-3, 2)
    if conv:
        c_in, c_out, h = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(5, 10))
        w = rng.normal(size=(c_out, c_in, 3, 3)) * scale
        make = lambda w, b: Conv2d(w, b, (c_in, h, h), stride=int(rng.integers(1, 3)), padding=int(rng.integers(0, 2)))  # noqa: E731
        b = rng.normal(size=c_out)
    else:
        n_in, n_out = (2, 400) if narrow else (int(rng.integers(2, 60)), int(rng.integers(1, 400)))
        w, b = rng.normal(size=(n_out, n_in)) * scale, rng.normal(size=n_out)
        make = Linear
    opf = make(w, b)
    if not twin:
        return opf, opf, None
    opg = Conv2d(w + rng.normal(size=w.shape) * scale * 0.01, b, opf.in_shape, opf.stride, opf.padding) \
        if conv else Linear(w + rng.normal(size=w.shape) * scale * 0.01, b)
    return opf, opg, difference_op(opf, opg)


def _setup(seed: int, conv: bool, twin: bool, windows: bool, zeros: float, wide: bool = False):
    rng = np.random.default_rng(seed)
    opf, opg, dop = _ops(rng, conv, twin, narrow=wide)
    batch = 2
    c = torch.as_tensor(rng.uniform(-10, 10, size=(batch, *opf.in_shape)))
    r = torch.as_tensor(rng.uniform(0, 1, size=(batch, *opf.in_shape)) * 10.0 ** rng.uniform(-6 * (not wide), 0))
    box = Bounds(c - r, c + r)
    m = torch.maximum(box.lower.abs(), box.upper.abs())
    cf = OpCtx(opf, opf.abs_linear(m) + opf.bias.abs(), dop, opg,
               None if dop is None else dop.abs_linear(m) + dop.bias.abs(), dx_zero=True)
    cg = OpCtx(opg, opg.abs_linear(m) + opg.bias.abs())
    fo.attach_first([cf], [cg], [box])
    assert cf.first is not None and cg.first is not None
    shape = opf.out_shape
    n = int(np.prod(shape))
    if windows:
        lam, lay = unit_patches(torch.arange(n).reshape(1, n).expand(batch, n), torch.ones(batch, n), shape)
    else:
        lam, lay = torch.zeros(batch, 7, *shape, dtype=torch.float64), bs.DENSE
    def coefficients():
        spread = 0.0 if wide else rng.uniform(-44, 4, size=lam.shape)   # wide: entries of one size
        out = lam + torch.as_tensor(rng.normal(size=lam.shape) * 10.0 ** spread)
        out[torch.as_tensor(rng.random(lam.shape) < zeros)] = 0.0
        return out
    lam_f, lam_d = coefficients(), coefficients() if dop is not None else None
    return opf, dop, cf, box, lam_f, lam_d, lay


def _dense(op) -> np.ndarray:
    """op's matrix (out, in), exact: each column is op applied to a unit vector (one weight per entry)."""
    n = int(np.prod(op.in_shape))
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *op.in_shape)
    return op.linear(eye).reshape(n, -1).T.numpy()


def _truth(opf, dop, box, lam_f, lam_d, lay):
    """(B, R) max over the box ([c - r, c + r] covering it) of lam_f . (A x + b) + lam_d . (D x + b_D),
    in long double (64-bit significand on x86), and a bound on that value's own error."""
    ld = np.longdouble
    c, r = (t.flatten(1).numpy().astype(ld) for t in centre_radius(box))
    value = size = 0.0
    y = 0.0
    n = 0
    for op, lam in ((opf, lam_f), (dop, lam_d)):
        if lam is None:
            continue
        dense = lam if lay.dense else lay.to_dense(lam)
        lamn = dense.flatten(2).numpy().astype(ld)                         # (B, R, out)
        a, b = _dense(op).astype(ld), op.bias.flatten().numpy().astype(ld)
        s = c @ a.T + b                                                     # (B, out)
        value = value + np.einsum("bro,bo->br", lamn, s)
        size = size + np.einsum("bro,bo->br", np.abs(lamn), np.abs(c) @ np.abs(a).T + np.abs(b) + r @ np.abs(a).T)
        y = y + lamn @ a                                                    # (B, R, in)
        n += a.shape[0] + a.shape[1]
    radius = np.einsum("bri,bi->br", np.abs(y), r)
    u = float(np.finfo(ld).eps) / 2
    value = torch.as_tensor((value + radius).astype(np.float64))
    slack = torch.as_tensor((2 * (n + 8) * u * size).astype(np.float64)) * (1 + 1e-10) + 1e-300
    return value, slack + value.abs() * 2.0 ** -52, torch.as_tensor(size.astype(np.float64))   # + float64 conversion


@extended
@settings(max_examples=60, **SLOW)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans(), st.booleans(), st.sampled_from([0.0, 0.5, 0.95]))
def test_split_bound_contains_the_exact_value(seed, conv, twin, windows, zeros):
    """Float32 radius parts (and float64 ones, for coefficients too large for float32) are sound."""
    opf, dop, cf, box, lam_f, lam_d, lay = _setup(seed, conv, twin, windows and conv, zeros)
    form = Engine([[cf]], [], exact=True)
    form.fast = True
    got = concretise(form.through_layer(0, Form.rows_of(lam_f, lam_d, lay)), RegionBatch(box.lower, box.upper))
    truth, slack, _ = _truth(opf, dop, box, lam_f, lam_d, lay)
    assert (got >= truth + slack).all()


@extended
@settings(max_examples=40, **SLOW)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans(), st.booleans(), st.sampled_from([0.0, 0.5, 0.95]))
def test_transposes_within_their_error_bound(seed, conv, twin, windows, zeros):
    """sum_j |y*_j - y^_j| r_j of the float32 transposes (against long double) never exceeds
    `firstop.transpose`'s bound, and exceeds what gamma^64 in its place would give on some rows."""
    opf, dop, cf, box, lam_f, lam_d, lay = _setup(seed, conv, twin, windows and conv, zeros)
    first = cf.first
    parts = first.parts(lam_f, lam_d)
    ma = sum(fo._abs_dots(lay, p.lam, p.mag, p.a)[..., 1] for p in parts)
    y, new_lay, bound, _ = fo.transpose(parts, lay, ma, first.rsum, fast=True)
    assert y.dtype == torch.float32
    y = (y if new_lay.dense else new_lay.to_dense(y)).flatten(2).numpy().astype(np.longdouble)
    exact = 0.0
    for p in parts:
        dense = p.lam if lay.dense else lay.to_dense(p.lam)
        exact = exact + dense.flatten(2).numpy().astype(np.longdouble) @ _dense(p.op).astype(np.longdouble)
    r = centre_radius(box)[1].flatten(1).numpy().astype(np.longdouble)
    seen = torch.as_tensor(np.einsum("bri,bi->br", np.abs(exact - y), r).astype(np.float64)) * (1 + 1e-15)
    assert (seen <= bound).all()
    assert (seen[ma > 0] > 1e-12 * ma[ma > 0]).any() or not bool((ma > 1e-30).any())   # gamma^64_4000 < 1e-12


@extended
def test_the_float32_error_is_real():
    """Rows whose float32 radius part, without its margin, falls below the exact value by more than a
    float64 margin could cover: the float32 margins (the transposes' and the radius sum's) are what
    keep the bound above it."""
    below = 0
    for seed in range(6):
        opf, dop, cf, box, lam_f, lam_d, lay = _setup(seed, conv=False, twin=True, windows=False, zeros=0.3, wide=True)
        engine = Engine([[cf]], [], exact=True)
        engine.fast = True
        form = engine.through_layer(0, Form.rows_of(lam_f, lam_d, lay))
        got = concretise(form, RegionBatch(box.lower, box.upper))
        truth, slack, size = _truth(opf, dop, box, lam_f, lam_d, lay)
        r = centre_radius(box)[1]
        y = sum(lay.backward(op, lam)[0] for op, lam in ((opf, lam_f), (dop, lam_d)))
        y32 = sum(lay.backward(op, lam.to(torch.float32))[0] for op, lam in ((opf, lam_f), (dop, lam_d)))
        drop = ((y.abs() - y32.abs().to(torch.float64)) * r.unsqueeze(1)).flatten(2).sum(-1)   # what float32 loses
        below += int((drop > 1e-12 * size + slack).sum())   # above any float64 margin (gamma_4000 < 1e-12)
        assert (got >= truth + slack).all()
    assert below > 0


def _count(monkeypatch) -> list[int]:
    calls = [0]
    real = bs.concretise_terms

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(bs, "concretise_terms", counted)
    return calls


@settings(max_examples=8, **SLOW)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["prune", "quantise", "perturb"]), st.booleans())
def test_pairs_sound_with_the_first_op_in_float32(seed, twin, conv):
    """Dense and conv pairs (first op on the input: Linear / Conv2d, after an input normalisation or
    not; quantised and perturbed twins add the difference op's term): crown-diff and diff-linear contain sampled and ascended Delta
    with the path on (and it ran); the reported maximum stays near the float64 walk's."""
    rng = np.random.default_rng(seed)
    if conv:
        in_shape = (1, 10, 10)
        pair = random_conv_pair(rng, twin=twin, in_shape=in_shape, norm=bool(rng.integers(2)))
    else:
        in_shape = (int(rng.integers(2, 8)),)
        pair = random_pair(rng, in_shape[0], (12, 8), 3, twin=twin)
    boxes = [random_box(rng, in_shape) for _ in range(2)]
    lo, hi = np.stack([b[0] for b in boxes]), np.stack([b[1] for b in boxes])
    with pytest.MonkeyPatch.context() as m:
        calls = _count(m)
        m.setattr(fo, "FAST_LOGITS", True)    # every row through the float32 path
        cd, dl = crown_diff_bounds(pair, lo, hi), diff_linear_bounds(pair, lo, hi)
        assert calls[0] > 0
        m.setattr(fo, "FAST_FIRST", False)
        ref = diff_linear_bounds(pair, lo, hi)
    for r in range(2):
        e2e = sample_deltas(pair, lo[r], hi[r], 300, seed=r)
        ascended = extremes(pair, lo[r], hi[r], 40, layers=[-1], seed=seed)[-1]
        for name, res in (("crown-diff", cd.select(slice(r, r + 1))), ("diff-linear", dl.select(slice(r, r + 1)))):
            for l in range(pair.n_layers):
                assert_contains(res.delta[l].lower, res.delta[l].upper, e2e[l], f"{name} end-to-end {l}, box {r}")
            assert_contains(res.delta[-1].lower, res.delta[-1].upper, ascended, f"{name} ascended, box {r}")
    # the same walks up to rounding; tighter or looser hidden bounds can flip CROWN's adaptive lower
    # slopes, so the reported maximum is compared with room for that, not for a lost term
    amax = lambda b: torch.maximum(b.lower.abs(), b.upper.abs()).flatten(1).max(1).values  # noqa: E731
    assert (amax(dl.delta[-1]) <= 1.05 * amax(ref.delta[-1]) + 1e-9).all()


@settings(max_examples=25, **SLOW)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.sampled_from([0.0, 0.6]))
def test_faster_float32_transposes_match_the_conv_transpose(seed, windows, zeros):
    """`firstop._backward`'s float32 conv transposes (windows: one matrix product; dense rows with
    stride 1: a conv2d with the flipped kernel on channels-last rows) land on the layout
    `Layout.backward` gives, and both lie within the float32 error bound of the exact (float64, here
    exact: 2-5 products of short float32 values) transpose; float64 rows take `Layout.backward` itself."""
    rng = np.random.default_rng(seed)
    c_in, c_out, h = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(6, 12))
    k, stride, pad = int(rng.integers(2, 4)), int(rng.integers(1, 3)), int(rng.integers(0, 2))
    w = torch.as_tensor(rng.normal(size=(c_out, c_in, k, k))).to(torch.float32).to(torch.float64)
    op = Conv2d(w, torch.zeros(c_out, dtype=torch.float64), (c_in, h, h), stride=stride, padding=pad)
    batch, rows = 2, 5
    if windows:
        size = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        corner = torch.stack([torch.as_tensor(rng.integers(-1, op.out_shape[d + 1] - size[d] + 2, size=(batch, rows)))
                              for d in range(2)], dim=-1)
        lay = Patches(corner, size, op.out_shape)
        shape = (batch, rows, c_out, *size)
    else:
        lay, shape = bs.DENSE, (batch, rows, *op.out_shape)
    lam = torch.as_tensor(rng.normal(size=shape)).to(torch.float32).to(torch.float64)
    lam[torch.as_tensor(rng.random(shape) < zeros)] = 0.0
    exact, lay64 = lay.backward(op, lam)                 # float64: every product and partial sum exact here
    got, lay32, rows32 = fo._backward(lay, op, lam, torch.float32)
    assert got.dtype == torch.float32 and rows32.dtype == torch.float32
    assert lay32.dense == lay64.dense and got.shape == exact.shape
    if not lay32.dense:
        assert torch.equal(lay32.corner, lay64.corner) and lay32.size == lay64.size
    assert (fo._flipped(op) is not None) == (stride == 1)
    mag, _ = lay.backward(op.__class__(w.abs(), op.bias, op.in_shape, op.stride, op.padding), lam.abs())
    kk = fo.backward_terms(op) + 2
    nu = kk * 2.0 ** -24
    assert ((got.to(torch.float64) - exact).abs() <= mag * nu / (1 - nu) + 1e-30).all()
    same, _, _ = fo._backward(lay, op, lam, torch.float64)
    assert torch.equal(same, exact)


@extended
def test_l1_times_max_bounds_the_centre_magnitude():
    """`_l1_times_max` (the windows' |lam| . mag, which only feeds the float64 margin) is >= the exact
    |lam| . mag in long double, for coefficients and magnitudes spanning many orders."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        lam = torch.as_tensor(rng.normal(size=(2, 9, 3, 4, 4)) * 10.0 ** rng.uniform(-30, 30, size=(2, 9, 3, 4, 4)))
        mag = torch.as_tensor(rng.uniform(0, 1, size=(2, 3, 4, 4)) * 10.0 ** rng.uniform(-5, 5))
        got = fo._l1_times_max(lam, mag)
        ld = np.longdouble
        exact = np.abs(lam.flatten(2).numpy().astype(ld)) @ mag.flatten(1).numpy().astype(ld)[:, :, None]
        assert (got.numpy().astype(ld) >= exact[..., 0]).all()
