"""The walk engine's cheaper steps (fewer passes over the row tensors) against the formulas they
replace: the relaxation coefficients are the same floats, the rounding magnitudes are at least the
old sums, conv biases summed per channel are the same products, and float64 conv transposes taken
in pieces are bit-for-bit the one-call result. Rows on windows (`layout.Patches`) and dense."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunecert.certify.layout as layout
from prunecert.certify.backsub import Engine, Form, bias_dot
from prunecert.certify.diff_interval import difference_op
from prunecert.certify.diff_linear import _contexts, _Memo
from prunecert.certify.layout import DENSE, Layout, Patches, abs_dot, dense_backward, dot
from prunecert.certify.relax import DeltaParams, DeltaRelax, SideRelax, quantise_theta, relax_delta, relax_side
from prunecert.core.interval import Bounds
from prunecert.network import AffineOp, AvgPool2d, Conv2d, Linear

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bounds(rng: np.random.Generator, shape: tuple[int, ...], b: int) -> Bounds:
    """Random bounds with stable (active, inactive) and unstable neurons."""
    c = rng.normal(size=(b, *shape)) * rng.choice([0.1, 1.0, 3.0])
    w = rng.uniform(0, 2, size=(b, *shape)) * (rng.random((b, *shape)) < 0.8)
    return Bounds(torch.as_tensor(c - w), torch.as_tensor(c + w))


def _rows(rng: np.random.Generator, shape: tuple[int, ...], b: int, r: int, windows: bool
          ) -> tuple[torch.Tensor, Layout]:
    """Random rows (some entries 0) over a (C, H, W) level: windows at random corners (zero off the
    level, as the walk keeps them), or dense."""
    if windows:
        c, h, w = shape
        k = int(rng.integers(1, h + 1))
        corner = torch.as_tensor(rng.integers(-k + 1, h, size=(b, r, 2)))
        lay: Layout = Patches(corner, (k, k), shape)
        lam = torch.as_tensor(rng.normal(size=(b, r, c, k, k))) * lay.inside()
    else:
        lay = DENSE
        lam = torch.as_tensor(rng.normal(size=(b, r, *shape)))
    lam = lam * torch.as_tensor(rng.random(lam.shape) < 0.7)
    return lam, lay


def _old_side(side: SideRelax, lam: torch.Tensor, alpha: torch.Tensor | None, lay: Layout
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """relax_side as it was written before: split lam, two products, two magnitude sums."""
    at = lay.at
    lower = at(side.alpha) if alpha is None else torch.where(at(side.unstable), alpha.clamp(0, 1), at(side.alpha))
    pos = lam.clamp_min(0.0)
    neg = lam - pos
    mu = pos * at(side.s) + neg * lower
    mag = lay.dot(pos, side.s * side.amax + side.t) + dot(-neg, lower * at(side.amax))
    return mu, lay.dot(pos, side.t), mag


@settings(max_examples=40, **SLOW)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_relu_step_keeps_its_coefficients_and_covers_the_old_magnitude(seed, windows, free_alpha):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 4)), int(rng.integers(3, 8)), int(rng.integers(3, 8)))
    shape = (shape[0], shape[1], shape[1])
    b, r = int(rng.integers(1, 4)), int(rng.integers(1, 6))
    side = SideRelax.of(_bounds(rng, shape, b))
    lam, lay = _rows(rng, shape, b, r, windows)
    alpha = None
    if free_alpha:
        rows_shape = lam.shape
        alpha = torch.as_tensor(rng.uniform(-0.5, 1.5, size=rows_shape))
    mu, bias, mag = relax_side(side, lam, alpha, True, lay)
    mu0, bias0, mag0 = _old_side(side, lam, alpha, lay)
    assert torch.equal(mu, mu0)                  # the same floats: soundness argument untouched
    assert torch.equal(bias, bias0)
    assert mag is not None
    assert (mag >= mag0 * (1 - 1e-12)).all()     # the rounding magnitude is at least the old sum


def _old_delta(rel: DeltaRelax, lam: torch.Tensor, p: DeltaParams, lay: Layout
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """relax_delta as it was written before (per-row lines, split lam); also sum |terms| of the bias."""
    f, g, at = rel.f, rel.g, lay.at

    def theta(default: torch.Tensor, free: torch.Tensor | None) -> torch.Tensor:
        if free is None:
            return at(default)
        return torch.where(at(rel.both_stable), torch.ones_like(free), quantise_theta(free))

    th_u, th_l = theta(rel.theta_up, p.theta_up), theta(rel.theta_lo, p.theta_lo)
    ag = at(g.alpha) if p.alpha_g_up is None else torch.where(at(g.unstable), p.alpha_g_up.clamp(0, 1), at(g.alpha))
    af = at(f.alpha) if p.alpha_f_lo is None else torch.where(at(f.unstable), p.alpha_f_lo.clamp(0, 1), at(f.alpha))
    fs, ft, gs, gt = at(f.s), at(f.t), at(g.s), at(g.t)
    wu, wl = 1.0 - th_u, 1.0 - th_l
    pos = lam.clamp_min(0.0)
    neg = lam - pos
    mu_f = pos * (th_u * (fs - ag)) + neg * (th_l * (af - gs))
    mu_d = pos * (th_u * ag + wu * at(rel.sd)) + neg * (th_l * gs + wl * at(rel.sl))
    bu, bl = th_u * ft + wu * at(rel.td), th_l * gt + wl * at(rel.tl)
    bias = dot(pos, bu.expand_as(lam)) - dot(neg, bl.expand_as(lam))
    terms = dot(pos, bu.abs().expand_as(lam)) - dot(neg, bl.abs().expand_as(lam))
    amax, dmax = at(f.amax), at(rel.dmax)
    size_u = th_u * ((fs + ag) * amax + ag * dmax + ft) + wu * (at(rel.sd) * dmax + at(rel.td))
    size_l = th_l * ((af + gs) * amax + gs * dmax + gt) + wl * (at(rel.sl) * dmax + at(rel.tl))
    mag = dot(pos, size_u.expand_as(lam)) - dot(neg, size_l.expand_as(lam))
    return mu_f, mu_d, bias, mag, terms


@settings(max_examples=40, **SLOW)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_delta_step_keeps_its_coefficients_and_covers_the_old_magnitude(seed, windows, free):
    rng = np.random.default_rng(seed)
    h = int(rng.integers(3, 7))
    shape = (int(rng.integers(1, 4)), h, h)
    b, r = int(rng.integers(1, 4)), int(rng.integers(1, 6))
    af, d = _bounds(rng, shape, b), _bounds(rng, shape, b)
    ag = Bounds(af.lower - d.upper, af.upper - d.lower)
    rel = DeltaRelax.of(af, ag, d)
    lam, lay = _rows(rng, shape, b, r, windows)
    p = DeltaParams()
    if free:
        p = DeltaParams(None, *[torch.as_tensor(rng.uniform(-0.2, 1.2, size=lam.shape)) for _ in range(4)])
    mu_f, mu_d, bias, mag = relax_delta(rel, lam, p, True, lay)
    mu_f0, mu_d0, bias0, mag0, terms = _old_delta(rel, lam, p, lay)
    assert torch.equal(mu_f, mu_f0) and torch.equal(mu_d, mu_d0)
    # the bias is the same sum of products in another order: within gamma_n of their absolute sum
    n = lam[0, 0].numel()
    assert ((bias - bias0).abs() <= 2 * (n + 2) * 2.0 ** -53 * terms + 1e-300).all()
    assert mag is not None
    assert (mag >= mag0 * (1 - 1e-12)).all()


@settings(max_examples=30, **SLOW)
@given(st.integers(0, 2**32 - 1))
def test_conv_bias_per_channel_is_the_same_sum(seed):
    rng = np.random.default_rng(seed)
    c_in, c_out, h = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(4, 9))
    op = Conv2d(rng.normal(size=(c_out, c_in, 3, 3)), rng.normal(size=c_out) * 10.0 ** rng.uniform(-3, 3),
                (c_in, h, h), padding=1)
    lam, lay = _rows(rng, op.out_shape, 2, 5, True)
    got, want = bias_dot(lay, lam, op), lay.dot(lam, op.bias)
    terms = lay.dot(lam.abs(), op.bias.abs())
    assert ((got - want).abs() <= 2 * (lam[0, 0].numel() + 2) * 2.0 ** -53 * terms).all()
    pool = AvgPool2d(2, (c_out, h, h))
    assert torch.equal(bias_dot(lay, lam, pool), torch.zeros(2, 5, dtype=torch.float64))


def test_float64_conv_transposes_in_pieces_are_bit_for_bit(monkeypatch):
    rng = np.random.default_rng(3)
    op = Conv2d(rng.normal(size=(6, 4, 3, 3)), rng.normal(size=6), (4, 9, 9), padding=1)
    lam = torch.as_tensor(rng.normal(size=(3, 7, *op.out_shape)))
    whole = dense_backward(op, lam)
    monkeypatch.setattr(layout, "COLUMN_BUDGET", 4 * 9 * 81 * 2)   # two rows per call
    assert torch.equal(dense_backward(op, lam), whole)



def _op_pair(rng: np.random.Generator, conv: bool, near: bool) -> tuple[AffineOp, AffineOp]:
    """f's and g's op: g = f plus a perturbation, tiny when `near` (a distilled twin)."""
    scale = 1e-6 if near else 0.5
    if conv:
        w, b, shape = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4), (3, 6, 6)
        return Conv2d(w, b, shape, 1, 1), Conv2d(w + scale * rng.normal(size=w.shape), b + scale * rng.normal(size=4),
                                                 shape, 1, 1)
    w, b = rng.normal(size=(7, 9)), rng.normal(size=7)
    return Linear(w, b), Linear(w + scale * rng.normal(size=w.shape), b + scale * rng.normal(size=7))


def _pair_step(rng: np.random.Generator, conv: bool, near: bool, windows: bool):
    """A pair form over a differing op's output (one region), the op's input magnitudes m_f, m_D, its
    context (`diff_linear._contexts`), and the form after the step with two and with three transposes."""
    opf, opg = _op_pair(rng, conv, near)
    m_f = torch.as_tensor(rng.uniform(0, 2, size=(1, *opf.in_shape)))
    m_d = torch.as_tensor(rng.uniform(0, 0.1, size=(1, *opf.in_shape)))
    xf, dx = Bounds(-m_f, m_f), Bounds(-m_d, m_d)
    ctx = _contexts([(opf, opg, difference_op(opf, opg))], [(xf, xf, dx)], _Memo())[0][0]
    lam_f, lay = _rows(rng, opf.out_shape, 1, 3, windows and conv)
    lam_d = torch.as_tensor(rng.normal(size=lam_f.shape)) * (lam_f != 0)
    form = Form(lam_f, lam_d, torch.as_tensor(rng.normal(size=(1, 3))), torch.zeros(1, 3, dtype=torch.float64), lay)
    out = {}
    for merge in (True, False):
        engine = Engine([[ctx]], [])
        engine.merge = merge
        out[merge] = engine.through_op(ctx, form)
    return (opf, opg), (m_f, m_d), ctx, form, out


def _fractions(t: torch.Tensor) -> np.ndarray:
    return np.vectorize(Fraction)(t.numpy())


@settings(max_examples=25, **SLOW)
@given(st.integers(0, 2**32 - 1), st.booleans())
def test_two_transpose_pair_step_is_sound_in_exact_arithmetic(seed, near):
    """A^fT (lam_f + lam_d) - A^gT lam_d (`Engine._through_merged`, a dense op): for every x^f, Delta x
    within the op's input magnitudes, the exact old form exceeds the new one (its computed
    coefficients and bias, evaluated exactly) by at most the error the step added (rational
    arithmetic; the worst point is a box vertex); and the magnitude it is derived with is covered:
    gmag >= |A^g| (m_f + m_D) + |b^g| entrywise."""
    rng = np.random.default_rng(seed)
    (opf, opg), (m_f, m_d), ctx, form, out = _pair_step(rng, False, near, False)
    new = out[True]
    assert not torch.equal(new.lam_f, out[False].lam_f) or near   # a different computation, not the old one
    wf, wg, bf, bg = (_fractions(t) for t in (opf.weight, opg.weight, opf.bias, opg.bias))
    lf, ld, mf, md = (_fractions(t) for t in (form.lam_f[0], form.lam_d[0], m_f[0], m_d[0]))
    nf, nd = _fractions(new.lam_f[0]), _fractions(new.lam_d[0])
    for r in range(3):
        # old(x) = lf.(Wf x + bf) + ld.((Wf - Wg) x + Wg dx + bf - bg) + bias; new(x) = nf.x + nd.dx + bias'
        cf = lf[r] @ wf + ld[r] @ (wf - wg) - nf[r]
        cd = ld[r] @ wg - nd[r]
        const = lf[r] @ bf + ld[r] @ (bf - bg) + Fraction(float(form.bias[0, r])) - Fraction(float(new.bias[0, r]))
        worst = sum(abs(c) * m for c, m in zip(cf, mf)) + sum(abs(c) * m for c, m in zip(cd, md)) + const
        assert worst <= Fraction(float(new.err[0, r])) - Fraction(float(form.err[0, r])), (seed, r)
    exact_g = opg.abs_linear(m_f + m_d) + opg.bias.abs()
    assert (ctx.gmag >= exact_g).all()


@settings(max_examples=25, **SLOW)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans(), st.booleans())
def test_two_and_three_transpose_pair_steps_agree_within_their_errors(seed, conv, near, windows):
    """The two-transpose step and the three-transpose one bound the same real form: at every point
    their values differ by at most the sum of the errors they added (dense and windowed conv rows,
    and dense ops); their margins differ by the magnitude terms of docs/theory.md only."""
    rng = np.random.default_rng(seed)
    (_, opg), (m_f, m_d), ctx, form, out = _pair_step(rng, conv, near, windows)
    two, three = out[True], out[False]
    assert two.layout.dense == three.layout.dense
    lay = two.layout
    gap = abs_dot(lay, two.lam_f - three.lam_f, m_f[0]) + abs_dot(lay, two.lam_d - three.lam_d, m_d[0])
    slack = (two.err - form.err) + (three.err - form.err)
    assert (gap + (two.bias - three.bias).abs() <= slack * (1 + 1e-9)).all()
    # the new lam_d is A^gT lam_d either way; the three-transpose step takes a conv's stacked with D^T lam_d
    # (`layout.stackable`): the same sums, perhaps in another order, within twice one transpose's rounding
    if not isinstance(opg, Conv2d):
        assert torch.equal(two.lam_d, three.lam_d)
    else:
        k = opg.weight.shape[0] * opg.weight.shape[2] * opg.weight.shape[3] + 2
        absolute = Conv2d(opg.weight.abs(), None, opg.in_shape, opg.stride, opg.padding)
        mag = form.layout.backward(absolute, form.lam_d.abs())[0]
        assert ((two.lam_d - three.lam_d).abs() <= 2.02 * k * 2.0 ** -53 * mag).all()
