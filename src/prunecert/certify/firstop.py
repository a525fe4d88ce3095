"""The network's first op in float32, its rounding error measured against the input box's radius.

Every exact walk ends at the op y = A x + b that acts on the network input x (layer 0's first Linear
or Conv2d, after reshapes and input normalisation: x ranges over a box). Over a box [c - r, c + r]
a row's contribution splits as

    lam . (A x + b) = lam . s + (A^T lam) . (x - c) <= lam . s + |A^T lam| . r,    s = A c + b,

so the walk stops *above* that op (`Term`: coefficients over its output) and `concretise_terms`
takes the centre part as a float64 dot product with s (computed once per region, `FirstOp`) and
only the radius part through the transpose, in float32: its error gamma^32_{k+2} |lam| . (|A| r) is
proportional to the box's width, not to |x| as an ordinary float32 transpose's (`layout.fast_ok`)
would be. For the pair's walks the terms of f's op, the difference op and g's op (all on the same x)
add: the centre parts separately, the radius part as one sum of transposes. Proof and measured
cost: docs/theory.md, "The first op in float32". L2 balls keep the float64 walk (not attached).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from prunecert.certify.layout import FLOAT32_TINY, Layout, Patches, abs_dot, float32_weights
from prunecert.core.interval import Bounds, centre_radius
from prunecert.core.rounding import TINY, UNIT_ROUNDOFF, UNIT_ROUNDOFF_32, gamma, margin, up
from prunecert.errors import PairingError
from prunecert.network import AffineOp, AvgPool2d, Conv2d, Flatten, Linear, Scale

if TYPE_CHECKING:
    from prunecert.certify.backsub import OpCtx

FAST_FIRST = True        # False: the first op is walked like the others (float64 transposes), for comparisons
FAST_LOGITS = True       # the logits' rows (the reported bounds) too (False: float64 transposes there)
FIRST_RANGE = 2.0 ** 60  # coefficients at least this large take float64 transposes (no float32 overflow)
RADIUS_RANGE = 2.0 ** 40  # boxes this wide or wider keep the float64 walk
COUNT_WIDTH = 4          # rows this many times wider than the transpose's fan-in take K = fan-in uncounted
FLOAT64_TINY = 2.0 ** -1022


def backward_terms(op: AffineOp) -> int:
    """Most products summed into one entry of `op.backward` (the transpose's fan-in)."""
    if isinstance(op, Linear):
        return int(op.weight.shape[0])
    if isinstance(op, Conv2d):
        return int(op.weight.shape[0] * op.weight.shape[2] * op.weight.shape[3])
    if isinstance(op, AvgPool2d):
        return op.kernel[0] * op.kernel[1]
    if isinstance(op, (Flatten, Scale)):
        return 1
    raise PairingError(f"back-substitution does not support op kind {op.kind!r}")


@dataclass
class FirstOp:
    """The op acting on the network input (and f - g's difference op `dop` there), per region:
    s = fl(A c + b); `mag` >= |A| |x|max + |b| (the op context's, >= |A| |c| + |b|); a >= |A| r;
    r32 >= r in float32; rsum >= sum_j r32_j. Shapes (B, *out) and (B, *in)."""

    op: "Linear | Conv2d"
    s: torch.Tensor
    mag: torch.Tensor
    a: torch.Tensor
    r32: torch.Tensor
    rsum: torch.Tensor
    dop: "Linear | Conv2d | None" = None
    s_d: torch.Tensor | None = None
    mag_d: torch.Tensor | None = None
    a_d: torch.Tensor | None = None

    def select(self, idx: slice | torch.Tensor) -> "FirstOp":
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]
        return FirstOp(self.op, self.s[idx], self.mag[idx], self.a[idx], self.r32[idx], self.rsum[idx], self.dop,
                       pick(self.s_d), pick(self.mag_d), pick(self.a_d))

    def parts(self, lam_f: torch.Tensor | None, lam_d: torch.Tensor | None) -> list["_Part"]:
        """(op, lam, s, mag, a, extra roundings) for each op with coefficients; the difference op's
        weights fl(W^f - W^g) are one rounding off W^f - W^g (counted as two more terms)."""
        out: list[_Part] = []
        if lam_f is not None:
            out.append(_Part(self.op, lam_f, self.s, self.mag, self.a, 0))
        if lam_d is not None and self.dop is not None:
            assert self.s_d is not None and self.mag_d is not None and self.a_d is not None
            out.append(_Part(self.dop, lam_d, self.s_d, self.mag_d, self.a_d, 2))
        return out


class _Part(NamedTuple):
    op: "Linear | Conv2d"
    lam: torch.Tensor
    s: torch.Tensor
    mag: torch.Tensor
    a: torch.Tensor
    extra: int


def _centre_parts(op: "Linear | Conv2d", c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fl(A c + b) and an upper bound on |A| r (its float64 rounding, gamma_{k+1} relative, and
    underflow covered)."""
    s = op.linear(c) + op.bias
    a = op.abs_linear(r)
    return s, up(a * (1 + 2 * gamma(op.fan_in + 2)) + TINY)


def attach_first(cf: "Sequence[OpCtx]", cg: "Sequence[OpCtx]", inputs: Sequence[Bounds]) -> None:
    """Give layer 0's op contexts (f's walk with the difference ops, g's walk) the per-region data of
    the first Linear or Conv2d, where the float32 split applies: the ops before it are reshapes or
    elementwise affine maps (input normalisation) the same in f and g, so its input ranges over a box
    (their interval bounds, `inputs[i]`, which cover it) with Delta = 0; its (and g's, and the
    difference op's) weights float32 represents without flushing or overflow; the box is not huge.
    `inputs`: the bounds on each op's input. Regions with L2 balls: the caller does not attach."""
    if not FAST_FIRST:
        return
    i = next((k for k, c in enumerate(cf) if not isinstance(c.op, (Flatten, Scale))), None)
    if i is None or not cf[i].dx_zero:    # ops below it that differ in f and g: Delta of its input is not 0
        return
    f, g = cf[i], cg[i]
    ops = [f.op, g.op] + ([f.dop] if f.dop is not None else [])
    if not all(isinstance(op, (Linear, Conv2d)) and float32_weights(op)[0] for op in ops):
        return
    c, r = centre_radius(inputs[i])
    if not bool((r < RADIUS_RANGE).all()):
        return
    r32 = r.to(torch.float32)
    r32 = torch.where(r32.to(torch.float64) < r, up(r32), r32)
    rsum = r32.to(torch.float64).flatten(1).sum(1) * (1 + 2.0 ** -30)
    opf, opg = f.op, g.op
    assert isinstance(opf, (Linear, Conv2d)) and isinstance(opg, (Linear, Conv2d))
    s, a = _centre_parts(opf, c, r)
    first_f = FirstOp(opf, s, f.mag, a, r32, rsum)
    if f.dop is not None:
        assert isinstance(f.dop, (Linear, Conv2d)) and f.dmag is not None
        first_f.dop = f.dop
        first_f.s_d, first_f.a_d = _centre_parts(f.dop, c, r)
        first_f.mag_d = f.dmag
        s_g, a_g = _centre_parts(opg, c, r)
        first_g = FirstOp(opg, s_g, g.mag, a_g, r32, rsum)
    else:   # the same op in f and g: one object, so the two walks' terms add before the transpose
        first_g = first_f
    f.first, g.first = first_f, first_g


@dataclass
class Term:
    """Coefficients over the outputs of a `FirstOp`'s op (`lam_f`) and difference op (`lam_d`),
    stored as the form's layout says: lam_f . (A x + b) + lam_d . (D x + b_D)."""

    first: FirstOp
    lam_f: torch.Tensor | None
    lam_d: torch.Tensor | None
    fast: bool = True     # the transpose may run in float32 (hidden layers' rows; `FAST_LOGITS`)

    def take(self, rows: torch.Tensor) -> "Term":
        return Term(self.first, None if self.lam_f is None else self.lam_f[:, rows],
                    None if self.lam_d is None else self.lam_d[:, rows], self.fast)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def plus_terms(left: Sequence[Term], right: Sequence[Term], lay: Layout, err: torch.Tensor
               ) -> tuple[tuple[Term, ...], torch.Tensor]:
    """The terms of the sum of two forms (`Form.plus`): terms over the same ops add their
    coefficients (each sum one float64 rounding, at most u (|lam| + |lam'|) . |y|max over the
    region, added to `err`), others stay side by side."""
    out = list(left)
    for t in right:
        for i, u in enumerate(out):
            if u.first.op is t.first.op and u.first.dop is t.first.dop:
                size = torch.zeros_like(err)
                for mine, theirs, mag in ((u.lam_f, t.lam_f, u.first.mag), (u.lam_d, t.lam_d, u.first.mag_d)):
                    if mine is not None and theirs is not None:
                        assert mag is not None
                        size = size + abs_dot(lay, mine.abs() + theirs.abs(), mag)
                err = up(err + margin(size, 1))
                out[i] = Term(u.first, _add(u.lam_f, t.lam_f), _add(u.lam_d, t.lam_d), u.fast and t.fast)
                break
        else:
            out.append(t)
    return tuple(out), err


def _abs_dots(lay: Layout, lam: torch.Tensor, mag: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(B, R, 2): |lam| . mag and |lam| . a (dense rows: one pass over |lam|)."""
    if not lay.dense:
        return torch.stack([abs_dot(lay, lam, mag), abs_dot(lay, lam, a)], dim=-1)
    flat = lam.abs().flatten(2)
    both = torch.stack([mag.flatten(1), a.flatten(1)], dim=2).to(lam.dtype)     # (B, n, 2)
    if flat.shape[0] == 1:
        b, n, _ = both.shape
        return (flat[0] @ both.permute(1, 0, 2).reshape(n, 2 * b)).reshape(-1, b, 2).permute(1, 0, 2)
    return torch.bmm(flat, both)


def _l1_times_max(lam: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """(B, R) >= |lam| . mag for rows (Bl, R, ...) and per-neuron mag (B, ...) >= 0: each row's l1
    norm (float64, rounded up by 2 gamma_n) times the region's largest mag (rounded up)."""
    n = lam[0, 0].numel()
    l1 = torch.linalg.vector_norm(lam.flatten(2), 1, dim=2)
    top = mag.flatten(1).amax(1).to(lam.dtype)
    return up(up(l1 * (1 + 2 * gamma(n + 2))) * top.unsqueeze(1))


def _fits32(op: "Linear | Conv2d", lam: torch.Tensor) -> bool:
    """Whether op's transpose of `lam` stays far from float32 overflow (`float32_weights` checked the weights)."""
    lo, hi = torch.aminmax(lam)
    amax = float(torch.maximum(-lo, hi))
    return amax < FIRST_RANGE and amax * float32_weights(op)[1] < 2.0 ** 100


def _radiusup(y: torch.Tensor, lay: Layout, r32: torch.Tensor) -> torch.Tensor:
    """(B, R) an upper bound on |y| . r for y (Bl, R, ...) in float32 or float64 and r <= r32: the
    products in y's dtype, summed in blocks of <= 16 in it, the block sums in float64."""
    rr = r32.to(y.dtype)
    z = y.abs() * (rr.unsqueeze(1) if lay.dense else lay.at(rr))
    z = z.flatten(2)
    n = z.shape[-1]
    b = next((d for d in (16, 14, 12, 10, 8, 7, 6, 5, 4, 3, 2) if n % d == 0), 1)
    blocks = z.view(*z.shape[:2], n // b, b).sum(-1)
    total = blocks.to(torch.float64).sum(-1)
    if y.dtype == torch.float64:   # one float64 sum of n products
        return up(total * (1 + 2 * gamma(n + 2)) + n * TINY)
    # each product u32-relative (+ 2^-126 when it underflows), b - 1 float32 additions, the float64 sum
    return up(up(total + n * 2.0 ** -125) * (1 + 2 * gamma(b + 2, UNIT_ROUNDOFF_32)))


_WINDOW_MATRICES: "weakref.WeakKeyDictionary[AffineOp, dict[tuple[int, int], torch.Tensor]]" = \
    weakref.WeakKeyDictionary()


def _window_matrix(op: Conv2d, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """(C kh kw, C_in kh' kw'): the transpose of op from windows of `size` onto its input's windows,
    as a matrix (each entry one weight or zero: the transposes of unit vectors are exact), per op,
    window size and dtype."""
    cache = _WINDOW_MATRICES.setdefault(op, {})
    key = (size[0] * 4096 + size[1], 32 if dtype == torch.float32 else 64)
    if key not in cache:
        n = op.out_shape[0] * size[0] * size[1]
        eye = torch.eye(n, dtype=dtype).reshape(n, op.out_shape[0], *size)
        cache[key] = F.conv_transpose2d(eye, op.weight.to(dtype), None, op.stride).reshape(n, -1).contiguous()
    return cache[key]


def _flipped(op: Conv2d) -> torch.Tensor | None:
    """op's kernel flipped and transposed (float32), when op.backward equals a stride-1 conv2d with it
    and padding k - 1 - p (no output padding), else None."""
    kh, kw = op.weight.shape[2:]
    (ph, pw), (sh, sw) = op.padding, op.stride
    if (sh, sw) != (1, 1) or ph > kh - 1 or pw > kw - 1 or \
            op.in_shape[1:] != (op.out_shape[1] + kh - 1 - 2 * ph, op.out_shape[2] + kw - 1 - 2 * pw):
        return None
    return op.weight.to(torch.float32).flip(2, 3).transpose(0, 1).contiguous()


def _backward(lay: Layout, op: "Linear | Conv2d", lam: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, Layout, torch.Tensor]:
    """lay.backward(op, lam in `dtype`), its layout, and the rows in `dtype` as they entered it (B R, ...).
    Float32 conv rows take the same products in another order, faster: windows as one matrix product
    (`_window_matrix`), dense rows as a conv2d with the flipped kernel on channels-last rows
    (`_flipped`; ~2-3x faster than conv_transpose2d for 16 -> 1 channel on 28 x 28)."""
    b, r = lam.shape[:2]
    if isinstance(op, Conv2d) and dtype == torch.float32 and lay.dense and (kernel := _flipped(op)) is not None:
        rows = lam.reshape(b * r, *lam.shape[2:]).to(dtype, memory_format=torch.channels_last)
        pad = (kernel.shape[2] - 1 - op.padding[0], kernel.shape[3] - 1 - op.padding[1])
        return F.conv2d(rows, kernel, None, 1, pad).reshape(b, r, *op.in_shape), lay, rows
    flat = lam.reshape(b * r, *lam.shape[2:]).to(dtype)
    if isinstance(op, Conv2d) and isinstance(lay, Patches) and dtype == torch.float32:
        new = flat.reshape(b * r, -1) @ _window_matrix(op, lay.size, dtype)
        y, new_lay = lay.land(op, new.reshape(b * r, op.in_shape[0], *lay.landing_size(op)), b, r)
        return y, new_lay, flat
    y, new_lay = lay.backward(op, flat.reshape(lam.shape))
    return y, new_lay, flat


def transpose(parts: Sequence[_Part], lay: Layout, ma: torch.Tensor, rsum: torch.Tensor, fast: bool
              ) -> tuple[torch.Tensor, Layout, torch.Tensor, int]:
    """y^ = sum_p A_p^T lam_p (float32 transposes when `fast`, else float64), its layout, a (B, R) bound
    e >= sum_j |y*_j - y^_j| r_j against the exact y* for any r <= r32 with sum r <= rsum (`ma` >=
    sum_p |lam_p| . (|A_p| r)), and the largest rounding count K used."""
    dtype = torch.float32 if fast else torch.float64
    unit = UNIT_ROUNDOFF_32 if fast else UNIT_ROUNDOFF
    floor = FLOAT32_TINY if fast else FLOAT64_TINY
    y: torch.Tensor | None = None
    new_lay: Layout = lay
    terms_row = torch.zeros_like(ma)   # per row: most products in one entry of a transpose (+ extra roundings)
    tiny = 0.0
    for p in parts:
        part, new_lay, lam = _backward(lay, p.op, p.lam, dtype)
        y = part if y is None else y + part
        # an entry sums at most k products, and only the row's non-zero coefficients give non-zero
        # ones (adding an exact zero is exact, a zero product too, in any summation order): the
        # rounding count is min(k, non-zeros) + 2 (zeros counted after the rounding to `dtype`: a
        # coefficient that underflows to 0 errs by its 2^-126 term and gives an exact zero product).
        # Rows COUNT_WIDTH times wider than k are not counted (k itself: sparser rows' margins grow,
        # at most to gamma_k |lam| . (|A| r), measured < 1e-5 of a bound's width)
        k = backward_terms(p.op)
        if lam[0].numel() < COUNT_WIDTH * k:
            nonzero = torch.count_nonzero(lam, dim=tuple(range(1, lam.dim()))).view(p.lam.shape[:2]).to(ma.dtype)
            terms_row = torch.maximum(terms_row, nonzero.clamp_max(k) + p.extra)
        else:
            terms_row = terms_row.clamp_min(k + p.extra)
        tiny += floor * (2 * float32_weights(p.op)[1] + 4 * backward_terms(p.op) + 1)
    assert y is not None
    k_row = terms_row + 2 * len(parts) + 2    # lam and W rounded to float32, the parts' sums
    # |A^T lam - y^| . r <= gamma_K |lam| . (|A| r) + tiny sum r (docs/theory.md)
    nu = k_row * unit
    err = up(ma * (nu / (1 - nu)) * (1 + 8 * UNIT_ROUNDOFF) + tiny * rsum.unsqueeze(1) + TINY)
    return y, new_lay, err, int(k_row.max())


def concretise_terms(terms: Sequence[Term], lay: Layout, bias: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """(B, R) sound upper bounds over each box of sum_terms + bias (+ err): the centre parts
    lam . s in float64, the radius part |sum_i A_i^T lam_i| . r from float32 transposes (float64
    where a coefficient is too large for float32) with the error bound of docs/theory.md."""
    parts = [p for t in terms for p in t.first.parts(t.lam_f, t.lam_d)]
    first = terms[0].first
    if not parts:
        return up(bias + err).expand(first.s.shape[0], bias.shape[1])
    fast = all(t.fast for t in terms) and all(_fits32(p.op, p.lam) for p in parts)
    centre = mc = ma = torch.zeros_like(err)
    for p in parts:
        centre = centre + lay.dot(p.lam, p.s)
        if lay.dense:
            sizes = _abs_dots(lay, p.lam, p.mag, p.a)
            mc, ma = mc + sizes[..., 0], ma + sizes[..., 1]
        else:   # |lam| . mag only feeds the float64 margin: ||lam||_1 max(mag) reads no windows
            mc, ma = mc + _l1_times_max(p.lam, p.mag), ma + abs_dot(lay, p.lam, p.a)
    y, new_lay, e32, k = transpose(parts, lay, ma, first.rsum, fast)
    radius = _radiusup(y, new_lay, first.r32)
    # the centre parts: s errs by gamma_{fan+1} (|A| |c| + |b|) <= gamma_{fan+1} mag, the dot products
    # by gamma_n, the sums by one rounding each: all within the final margin on mc
    fan = max(p.op.fan_in + p.extra for p in parts)
    n = math.prod(parts[0].lam.shape[2:])
    out = centre + radius + e32 + bias + err
    size = mc + radius + e32 + bias.abs() + err
    return up(out + margin(size, k + fan + n + 8))
