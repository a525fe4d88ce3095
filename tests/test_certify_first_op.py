"""The network's first op in float32 (`firstop.py`): the split bound lam . (A c + b) + |A^T lam| . r
with float32 transposes stays above the exact value for coefficients spanning 1e-44 .. 1e4 (float32
underflow, rows with many zeros, difference ops, windows), and the float32 error it covers is real
(a float64 margin in its place would not be sound); whole pairs whose first op is a Linear or a conv
stay sound with the path on, and within rounding amounts of the float64 walk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pairs import assert_contains, extremes, random_box, random_conv_pair, random_pair, sample_deltas

import prunecert.certify.backsub as bs
import prunecert.certify.firstop as fo
from prunecert.certify.firstop import backward_terms
from prunecert.certify.backsub import Engine, Form, OpCtx, concretise
from prunecert.certify.diff_interval import difference_op
from prunecert.certify.diff_linear import crown_diff_bounds, diff_linear_bounds
from prunecert.certify.layout import unit_patches
from prunecert.core.interval import Bounds, centre_radius
from prunecert.core.rounding import gamma
from prunecert.core.region_batch import RegionBatch
from prunecert.network import Conv2d, Linear

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ops(rng: np.random.Generator, conv: bool, twin: bool):
    """f's op, g's op (a perturbed copy, or the same op) and their difference op, on the input."""
    scale = 10.0 ** rng.uniform(-3, 2)
    if conv:
        c_in, c_out, h = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(5, 10))
        w = rng.normal(size=(c_out, c_in, 3, 3)) * scale
        make = lambda w, b: Conv2d(w, b, (c_in, h, h), stride=int(rng.integers(1, 3)), padding=int(rng.integers(0, 2)))  # noqa: E731
        b = rng.normal(size=c_out)
    else:
        n_in, n_out = int(rng.integers(2, 60)), int(rng.integers(1, 400))
        w, b = rng.normal(size=(n_out, n_in)) * scale, rng.normal(size=n_out)
        make = Linear
    opf = make(w, b)
    if not twin:
        return opf, opf, None
    opg = Conv2d(w + rng.normal(size=w.shape) * scale * 0.01, b, opf.in_shape, opf.stride, opf.padding) \
        if conv else Linear(w + rng.normal(size=w.shape) * scale * 0.01, b)
    return opf, opg, difference_op(opf, opg)


def _setup(seed: int, conv: bool, twin: bool, windows: bool, zeros: float):
    rng = np.random.default_rng(seed)
    opf, opg, dop = _ops(rng, conv, twin)
    batch = 2
    c = torch.as_tensor(rng.uniform(-10, 10, size=(batch, *opf.in_shape)))
    r = torch.as_tensor(rng.uniform(0, 1, size=(batch, *opf.in_shape)) * 10.0 ** rng.uniform(-6, 0))
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
        out = lam + torch.as_tensor(rng.normal(size=lam.shape) * 10.0 ** rng.uniform(-44, 4, size=lam.shape))
        out[torch.as_tensor(rng.random(lam.shape) < zeros)] = 0.0
        return out
    lam_f, lam_d = coefficients(), coefficients() if dop is not None else None
    return opf, dop, cf, box, lam_f, lam_d, lay


def _truth(opf, dop, box, lam_f, lam_d, lay):
    """(B, R) float64 value of max over the box (the box [c - r, c + r] covering it) of
    lam_f . (A x + b) + lam_d . (D x + b_D), and a bound on that value's own float64 error."""
    c, r = centre_radius(box)
    value = size = 0.0
    y = None
    terms = 0
    for op, lam in ((opf, lam_f), (dop, lam_d)):
        if lam is None:
            continue
        value = value + lay.dot(lam, op.linear(c) + op.bias)
        size = size + lay.dot(lam.abs(), op.abs_linear(c.abs()) + op.bias.abs() + op.abs_linear(r))
        t, new_lay = lay.backward(op, lam)
        y = t if y is None else y + t
        terms += op.fan_in + backward_terms(op) + int(np.prod(lam.shape[2:])) + 4
    rr = r.unsqueeze(1) if new_lay.dense else new_lay.at(r)
    radius = (y.abs() * rr).flatten(2).sum(-1)
    terms += int(np.prod(rr.shape[2:]))
    return value + radius, gamma(terms) * 2 * size + 1e-300, (y, new_lay, rr)


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


def test_the_float32_error_is_real():
    """Rows whose float32 radius part, without its margin, falls below the exact value by more than a
    float64 margin could cover: the float32 margin is what keeps the bound above it."""
    below = 0
    for seed in range(6):
        opf, dop, cf, box, lam_f, lam_d, lay = _setup(seed, conv=seed % 2 == 1, twin=True, windows=False, zeros=0.3)
        lam_f, lam_d = lam_f.clamp(-1e3, 1e3), lam_d.clamp(-1e3, 1e3)   # normal float32 numbers
        engine = Engine([[cf]], [], exact=True)
        engine.fast = True
        form = engine.through_layer(0, Form.rows_of(lam_f, lam_d, lay))
        got = concretise(form, RegionBatch(box.lower, box.upper))
        truth, slack, (y, new_lay, rr) = _truth(opf, dop, box, lam_f, lam_d, lay)
        y32 = sum(lay.backward(op, lam.to(torch.float32))[0] for op, lam in ((opf, lam_f), (dop, lam_d)))
        drop = ((y.abs() - y32.abs().to(torch.float64)) * rr).flatten(2).sum(-1)   # what float32 loses
        below += int((drop > 1e-10 * truth.abs() + slack).sum())
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
    """Dense and conv pairs (first op on the input: Linear / Conv2d; quantised and perturbed twins
    add the difference op's term): crown-diff and diff-linear contain sampled and ascended Delta
    with the path on (and it ran), and stay within 1e-3 of the width of the float64 walk's bounds."""
    rng = np.random.default_rng(seed)
    if conv:
        in_shape = (1, 10, 10)
        pair = random_conv_pair(rng, twin=twin, in_shape=in_shape, norm=False)
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
    for l in range(pair.n_layers):
        a, b = dl.delta[l], ref.delta[l]
        tol = 1e-3 * (b.upper - b.lower) + 1e-9
        assert ((a.upper - b.upper).abs() <= tol).all() and ((a.lower - b.lower).abs() <= tol).all()
