"""Linear relaxations of relu(a) and of the ReLU difference relu(a^f) - relu(a^g), per hidden layer.

Back-substitution (`backsub.py`) replaces every hidden ReLU output by a linear function of its
pre-activation, chosen by the sign of its coefficient: an upper line where the coefficient is
positive, a lower line where it is negative. Everything here is *valid in exact arithmetic for the
floating-point numbers it returns*: slopes are any floats in [0, 1], intercepts are rounded upward
(`docs/theory.md`, "Differential linear bounds"), so no rounding of the lines can cut off a point.

For one network (CROWN, Zhang et al. 2018): relu(a) <= s a + t (the chord over [l, u]) and
relu(a) >= alpha a for any alpha in [0, 1] (alpha-CROWN optimises alpha).

For the difference Delta h = relu(a^f) - relu(a^g), as a function of (a^f, Delta a) with
a^g = a^f - Delta a (NeuroDiff, Paulsen et al. ASE 2020), two families, mixed by theta in [0, 1]:
- *separate*: Delta h <= U_f(a^f) - alpha_g a^g and Delta h >= alpha_f a^f - U_g(a^g), exact when both
  sides are stable, and containing ReluDiff's "f active: Delta h <= Delta" (alpha_g = 1) and
  "g active: Delta h >= Delta" (alpha_f = 1);
- *chord*: relu is monotone and 1-Lipschitz, so min(0, Delta a) <= Delta h <= max(0, Delta a), and the
  chords of max(0, .) / min(0, .) over [l_Delta, u_Delta] bound those; exact zero when Delta a = 0.
theta is kept on a 2^-30 grid so that 1 - theta is exact and the mix is a true convex combination.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prunecert.certify.layout import DENSE, Layout
from prunecert.core.interval import Bounds
from prunecert.core.rounding import TINY, UNIT_ROUNDOFF

THETA_GRID = 2.0 ** 30


def round_up_nonneg(x: torch.Tensor) -> torch.Tensor:
    """An upper bound of the exact value of a non-negative quantity computed with <= 2 roundings."""
    return x * (1.0 + 4 * UNIT_ROUNDOFF) + TINY


def upper_line(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with relu(a) <= s a + t for every real a in [lower, upper]; s in [0, 1], t >= 0.

    Active (lower >= 0): (1, 0); inactive (upper <= 0): (0, 0); unstable: the chord, whose intercept
    t >= max(-s l, (1 - s) u) makes the line lie above relu at both ends, hence (relu being convex)
    on the whole interval, for the float s actually used.
    """
    unstable = (lower < 0) & (upper > 0)
    active = lower >= 0
    den = torch.where(unstable, upper - lower, torch.ones_like(upper))
    s = torch.where(unstable, (upper / den).clamp(0.0, 1.0), active.to(upper.dtype))
    t = torch.maximum(-s * lower, (1.0 - s) * upper)
    t = torch.where(unstable, round_up_nonneg(t), torch.zeros_like(t))
    return s, t


def default_alpha(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The lower slope CROWN picks (1 if the active part dominates, else 0); 1/0 on stable neurons."""
    return (upper > -lower).to(upper.dtype)


def quantise_theta(theta: torch.Tensor) -> torch.Tensor:
    """theta clamped to [0, 1] on a 2^-30 grid, so that 1 - theta is computed exactly."""
    return torch.round(theta.clamp(0.0, 1.0) * THETA_GRID) / THETA_GRID


@dataclass
class SideRelax:
    """The relaxation of relu(a) for one network's hidden layer: tensors (B, *shape)."""

    s: torch.Tensor          # upper slope
    t: torch.Tensor          # upper intercept
    alpha: torch.Tensor      # default lower slope (forced to 1 / 0 where stable)
    unstable: torch.Tensor   # bool: where alpha is free
    amax: torch.Tensor       # max |a| over the bounds (for rounding margins)

    @staticmethod
    def of(b: Bounds) -> "SideRelax":
        s, t = upper_line(b.lower, b.upper)
        return SideRelax(s, t, default_alpha(b.lower, b.upper), (b.lower < 0) & (b.upper > 0),
                         torch.maximum(b.lower.abs(), b.upper.abs()))

    def select(self, idx: slice | torch.Tensor) -> "SideRelax":
        return SideRelax(self.s[idx], self.t[idx], self.alpha[idx], self.unstable[idx], self.amax[idx])

    def to(self, dtype: torch.dtype) -> "SideRelax":
        return SideRelax(self.s.to(dtype), self.t.to(dtype), self.alpha.to(dtype), self.unstable, self.amax.to(dtype))


@dataclass
class DeltaRelax:
    """The relaxation of Delta h = relu(a^f) - relu(a^g) in terms of (a^f, Delta a): tensors (B, *shape)."""

    f: SideRelax
    g: SideRelax
    sd: torch.Tensor         # chord of max(0, Delta): Delta h <= sd Delta + td
    td: torch.Tensor
    sl: torch.Tensor         # chord of min(0, Delta): Delta h >= sl Delta - tl
    tl: torch.Tensor
    dmax: torch.Tensor       # max |Delta a|
    theta_up: torch.Tensor   # default weights of the separate family
    theta_lo: torch.Tensor
    both_stable: torch.Tensor
    zero: bool = False       # Delta a is exactly 0 on the whole layer in every region: Delta h = 0
    _lines: list[torch.Tensor] | None = field(default=None, repr=False, compare=False)   # `_default_lines`

    @staticmethod
    def of(af: Bounds, ag: Bounds, d: Bounds, f: SideRelax | None = None, g: SideRelax | None = None
           ) -> "DeltaRelax":
        f, g = f or SideRelax.of(af), g or SideRelax.of(ag)
        sd, td = upper_line(d.lower, d.upper)
        sl, tl = upper_line(-d.upper, -d.lower)  # min(0, D) = -relu(-D) >= -(sl (-D) + tl)
        dmax = torch.maximum(d.lower.abs(), d.upper.abs())
        both_stable = ~(f.unstable | g.unstable)
        # default theta: the family whose line is lower (upper side) / higher (lower side) at the centre
        cf, cd = (af.lower + af.upper) / 2, (d.lower + d.upper) / 2
        sep_up = (f.s - g.alpha) * cf + g.alpha * cd + f.t
        sep_lo = (f.alpha - g.s) * cf + g.s * cd - g.t
        theta_up = torch.where(both_stable | (sep_up < sd * cd + td), 1.0, 0.0).to(cf.dtype)
        theta_lo = torch.where(both_stable | (sep_lo > sl * cd - tl), 1.0, 0.0).to(cf.dtype)
        zero = bool((d.lower == 0).all()) and bool((d.upper == 0).all())
        return DeltaRelax(f, g, sd, td, sl, tl, dmax, theta_up, theta_lo, both_stable, zero)

    def select(self, idx: slice | torch.Tensor) -> "DeltaRelax":
        return DeltaRelax(self.f.select(idx), self.g.select(idx), self.sd[idx], self.td[idx], self.sl[idx],
                          self.tl[idx], self.dmax[idx], self.theta_up[idx], self.theta_lo[idx], self.both_stable[idx],
                          self.zero)

    def to(self, dtype: torch.dtype) -> "DeltaRelax":
        return DeltaRelax(self.f.to(dtype), self.g.to(dtype), self.sd.to(dtype), self.td.to(dtype), self.sl.to(dtype),
                          self.tl.to(dtype), self.dmax.to(dtype), self.theta_up.to(dtype), self.theta_lo.to(dtype),
                          self.both_stable, self.zero)


@dataclass
class DeltaParams:
    """Free relaxation parameters for one hidden layer (None: the defaults). Shapes (B, R, *shape)."""

    alpha_f: torch.Tensor | None = None      # lower slope of relu(a^f) in the f-part
    theta_up: torch.Tensor | None = None     # upper Delta line: weight of the separate family
    alpha_g_up: torch.Tensor | None = None   # ... its lower slope of relu(a^g)
    theta_lo: torch.Tensor | None = None     # lower Delta line: weight of the separate family
    alpha_f_lo: torch.Tensor | None = None   # ... its lower slope of relu(a^f)

    FIELDS = ("alpha_f", "theta_up", "alpha_g_up", "theta_lo", "alpha_f_lo")

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, k) for k in self.FIELDS if getattr(self, k) is not None]


def _r(x: torch.Tensor) -> torch.Tensor:
    """(B, *shape) -> (B, 1, *shape): broadcast over the rows of a coefficient tensor."""
    return x.unsqueeze(1)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Drop the broadcast row dim of a per-neuron tensor (B, 1, *s) -> (B, *s), keep real row dims."""
    return x.squeeze(1) if x.shape[1] == 1 else x


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """(B, 1): each region's largest entry of a per-neuron tensor (B, *shape) (0 if none)."""
    return x.reshape(x.shape[0], -1).amax(1, keepdim=True).clamp_min(0.0)


def _l1(lam: torch.Tensor) -> torch.Tensor:
    """(Bl, R): sum_i |lam_i| per row (|.| then a sum: twice as fast as torch's l1 norm, which sums
    in another order; the margin's slack covers either's rounding)."""
    return lam.flatten(2).abs().sum(2)


def relax_side(side: SideRelax, lam: torch.Tensor, alpha: torch.Tensor | None, exact: bool = True,
               lay: Layout = DENSE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Upper-bound lam . relu(a) by mu . a + bias: returns mu (B, R, *shape), bias (B, R), and (if
    `exact`) a magnitude >= sum_i |lam_i| (|slope_i| amax_i + |intercept_i|) that bounds the rounding.
    `lay`: how the rows are stored (per-neuron tensors are read through `lay.at`).

    mu_i = lam_i s_i where lam_i >= 0, lam_i lower_i elsewhere: lam^+ s + lam^- lower, one of the two
    terms exactly 0, so one rounding per entry (fused multiply-add or not); on paired windows each
    per-neuron tensor is read once per pair (`Patches.read`). The magnitude is sum_i |mu_i| max(amax) + bias, at
    least the sum above (slopes are >= 0, intercepts meet only lam^+), from two sums."""
    at, rows = lay.read, lay.split(lam)
    lower = at(side.alpha)
    if alpha is not None:
        lower = torch.where(at(side.unstable), lay.split(alpha).clamp(0.0, 1.0), lower)
    pos, neg = rows.clamp_min(0.0), rows.clamp_max(0.0)
    mu = lay.join((pos * at(side.s)).addcmul_(neg, lower))    # in place: one fresh row tensor fewer
    bias = lay.dot(lay.join(pos), side.t)
    mag = None
    if exact:
        mag = _l1(mu) * _row_max(side.amax).to(mu.dtype) + bias
    return mu, bias, mag


def relax_delta(rel: DeltaRelax, lam: torch.Tensor, p: DeltaParams, exact: bool, lay: Layout = DENSE
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Upper-bound lam . Delta h by mu_f . a^f + mu_d . Delta a + bias; also the rounding magnitude.

    Upper line (where lam >= 0): th (U_f(a^f) - alpha_g a^g) + (1 - th) (sd Delta + td);
    lower line (lam < 0): th (alpha_f a^f - U_g(a^g)) + (1 - th) (sl Delta - tl); a^g = a^f - Delta.
    With the default parameters the lines' coefficients are computed per neuron once per layer
    (`_default_lines`), else per row; either way the same floats. The magnitude: sum_i |lam_i| times
    the region's largest line size (`_lines`), at least sum_i |lam_i| size_i.
    """
    f, g = rel.f, rel.g
    at, sp = lay.read, lay.split
    if p.theta_up is None and p.theta_lo is None and p.alpha_g_up is None and p.alpha_f_lo is None:
        lines = [at(x) for x in _default_lines(rel)[:6]]
    else:
        th_u = at(rel.theta_up) if p.theta_up is None else _theta(at(rel.both_stable), sp(p.theta_up), exact)
        th_l = at(rel.theta_lo) if p.theta_lo is None else _theta(at(rel.both_stable), sp(p.theta_lo), exact)
        ag = at(g.alpha) if p.alpha_g_up is None else torch.where(at(g.unstable), sp(p.alpha_g_up).clamp(0, 1),
                                                                  at(g.alpha))
        af = at(f.alpha) if p.alpha_f_lo is None else torch.where(at(f.unstable), sp(p.alpha_f_lo).clamp(0, 1),
                                                                  at(f.alpha))
        lines = _lines(th_u, th_l, ag, af, at(f.s), at(f.t), at(g.s), at(g.t), at(rel.sd), at(rel.td), at(rel.sl),
                       at(rel.tl), None, None)
    a_up, a_lo, d_up, d_lo, b_up, b_lo = lines[:6]
    # lam^+ x_up + lam^- x_lo, one term exactly 0: the product lam x_up or lam x_lo, one rounding
    rows = sp(lam)
    pos, neg = rows.clamp_min(0.0), rows.clamp_max(0.0)
    mu_f = lay.join((pos * a_up).addcmul_(neg, a_lo))
    mu_d = lay.join((pos * d_up).addcmul_(neg, d_lo))
    # lam^+ b_up - lam^- b_lo: the terms of two dot products summed as one (the same error bound)
    bias = lay.join((pos * b_up).addcmul_(neg, b_lo, value=-1.0)).flatten(2).sum(-1)
    mag = None
    if exact:   # sizes from the per-neuron maxima: upper bounds of the (parameter-dependent) sizes
        mag = _l1(lam) * _default_lines(rel)[6].to(lam.dtype)
    return mu_f, mu_d, bias, mag


def _default_lines(rel: DeltaRelax) -> list[torch.Tensor]:
    """The default relaxation's line coefficients per neuron (`_lines`, B, *shape), and (B, 1) the
    region's largest size any parameters in [0, 1] can give; computed once per layer."""
    if rel._lines is None:
        f, g = rel.f, rel.g
        out = _lines(rel.theta_up, rel.theta_lo, g.alpha, f.alpha, f.s, f.t, g.s, g.t, rel.sd, rel.td, rel.sl,
                     rel.tl, None, None)
        # any theta, alpha in [0, 1]: size_u <= max((s_f + 1) amax + Dmax + t_f, s_D Dmax + t_D), likewise lower
        one = torch.ones_like(f.s)
        worst = _lines(one, one, one, one, f.s, f.t, g.s, g.t, rel.sd, rel.td, rel.sl, rel.tl, f.amax, rel.dmax)
        zero = torch.zeros_like(f.s)
        chord = _lines(zero, zero, one, one, f.s, f.t, g.s, g.t, rel.sd, rel.td, rel.sl, rel.tl, f.amax, rel.dmax)
        size = torch.maximum(torch.maximum(worst[6], worst[7]), torch.maximum(chord[6], chord[7]))
        rel._lines = out + [_row_max(size) * (1.0 + 8 * UNIT_ROUNDOFF)]
    return rel._lines


def _lines(th_u: torch.Tensor, th_l: torch.Tensor, ag: torch.Tensor, af: torch.Tensor, fs: torch.Tensor,
           ft: torch.Tensor, gs: torch.Tensor, gt: torch.Tensor, sd: torch.Tensor, td: torch.Tensor, sl: torch.Tensor,
           tl: torch.Tensor, amax: torch.Tensor | None, dmax: torch.Tensor | None) -> list[torch.Tensor]:
    """The Delta lines' coefficients of a^f, of Delta a and intercepts (upper, lower), elementwise; with
    amax, Dmax also their rounding sizes th ((s_f + alpha_g) amax + alpha_g Dmax + t_f) +
    (1 - th) (s_D Dmax + t_D) (likewise lower)."""
    wu, wl = 1.0 - th_u, 1.0 - th_l   # exact: theta sits on a 2^-30 grid
    out = [th_u * (fs - ag), th_l * (af - gs), th_u * ag + wu * sd, th_l * gs + wl * sl, th_u * ft + wu * td,
           th_l * gt + wl * tl]
    if amax is not None and dmax is not None:
        out += [th_u * ((fs + ag) * amax + ag * dmax + ft) + wu * (sd * dmax + td),
                th_l * ((af + gs) * amax + gs * dmax + gt) + wl * (sl * dmax + tl)]
    return out


def _theta(both_stable: torch.Tensor, theta: torch.Tensor, exact: bool) -> torch.Tensor:
    """Free weights theta (quantised when `exact`), 1 where both sides are stable."""
    theta = quantise_theta(theta) if exact else theta.clamp(0.0, 1.0)
    return torch.where(both_stable, torch.ones_like(theta), theta)
